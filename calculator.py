"""The calculator tool the model calls during generation (engine.py forces its answer into the
reply): a whitelist interpreter over Python's ast, never eval(). Arithmetic on ints and floats,
len(), and a few string methods; every intermediate value is size-checked, so no expression can
take long or use much memory. calculator(expr) returns the answer as text, or None if refused."""

import ast
import math

MAX_EXPR_CHARS = 400      # longer expressions are refused outright
MAX_NODES = 120           # ast nodes per expression
MAX_INT_BITS = 4000       # ~1200 decimal digits: big enough for homework, small enough to print
MAX_STR_LEN = 10_000      # characters in any intermediate string (and items in a split)
STR_METHODS = {"count", "upper", "lower", "strip", "replace", "split", "startswith", "endswith", "find"}
BIN_OPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a ** b,
}


class Refused(ValueError):
    """The expression is outside what the calculator will evaluate."""


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_size(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused("result is not finite")
    if isinstance(value, (str, list)) and len(value) > MAX_STR_LEN:
        raise Refused("string too long")
    return value


def _binop(op, a, b):
    kind = type(op)
    if kind not in BIN_OPS:
        raise Refused(f"operator {kind.__name__} is not allowed")
    if _is_num(a) and _is_num(b):
        # a power is the one operation whose cost explodes: bound its size before computing
        # (everything else works on size-checked operands, so it is cheap)
        if kind is ast.Pow:
            if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
                if b * a.bit_length() > MAX_INT_BITS + 64:
                    raise Refused("power too large")
            if abs(b) > 10_000 and not (isinstance(a, (int, float)) and abs(a) in (0, 1)):
                raise Refused("exponent too large")
        if kind in (ast.Div, ast.FloorDiv, ast.Mod) and b == 0:
            raise Refused("division by zero")
        try:
            result = BIN_OPS[kind](a, b)
        except (OverflowError, ZeroDivisionError, ValueError) as e:
            raise Refused(str(e))
        if isinstance(result, complex):
            raise Refused("complex result")
        return _check_size(result)
    # strings: concatenation and repetition only (% on a string would be formatting)
    if kind is ast.Add and isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_STR_LEN:
            raise Refused("string too long")
        return a + b
    if kind is ast.Mult and {type(a), type(b)} == {str, int}:
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if len(s) * max(n, 0) > MAX_STR_LEN:  # checked before building it
            raise Refused("string too long")
        return s * n
    raise Refused(f"{kind.__name__} on {type(a).__name__} and {type(b).__name__} is not allowed")


def _call(node, ev):
    if node.keywords:
        raise Refused("keyword arguments are not allowed")
    func = node.func
    if isinstance(func, ast.Name):
        if func.id != "len" or len(node.args) != 1:
            raise Refused(f"function {func.id!r} is not allowed")
        obj = ev(node.args[0])
        if not isinstance(obj, (str, list)):
            raise Refused("len() of a non-string")
        return len(obj)
    args = [ev(a) for a in node.args]
    if any(not isinstance(a, (str, int)) or isinstance(a, bool) for a in args):
        raise Refused("arguments must be strings or integers")
    if not isinstance(func, ast.Attribute) or func.attr not in STR_METHODS:
        raise Refused("only the string methods " + ", ".join(sorted(STR_METHODS)) + " are allowed")
    obj = ev(func.value)
    if not isinstance(obj, str):
        raise Refused(f".{func.attr}() on a {type(obj).__name__}")
    if func.attr == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        # the result length is known in advance: refuse before building a huge string
        grow = obj.count(args[0]) * (len(args[1]) - len(args[0]))
        if len(obj) + grow > MAX_STR_LEN:
            raise Refused("string too long")
    try:
        return _check_size(getattr(obj, func.attr)(*args))
    except (TypeError, ValueError) as e:  # wrong arguments, "empty separator", ...
        raise Refused(str(e))


def safe_eval(expr: str):
    """Evaluate a calculator expression; raise Refused for anything outside the whitelist.
    Allowed: int/float/str literals, + - * / // % **, unary minus/plus, parentheses, len(),
    and the string methods in STR_METHODS. Every intermediate value is size-checked, so the
    work is bounded by MAX_EXPR_CHARS * MAX_NODES small operations."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise Refused("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise Refused(f"not an expression: {e}")
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise Refused("expression too complex")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
                raise Refused(f"literal {node.value!r} is not allowed")
            return _check_size(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            if not _is_num(value):
                raise Refused("unary minus on a non-number")
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return _binop(node.op, ev(node.left), ev(node.right))
        if isinstance(node, ast.Call):
            return _call(node, ev)
        raise Refused(f"{type(node).__name__} is not allowed")

    try:
        return ev(tree)
    except RecursionError:
        raise Refused("expression too deeply nested")


def calculator(expr: str) -> str | None:
    """The tool's answer as text, or None when the expression is refused."""
    try:
        value = safe_eval(expr)
    except Refused:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)  # 6/3 -> "2", which is what a person (and the training data) writes
    return str(value)
