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
    """The expression is outside what the calculator will evaluate (the tool then answers nothing)."""


def need(condition):
    """Refuse the expression unless `condition` holds (the reason is never shown: the tool is silent)."""
    if not condition:
        raise Refused


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _sized(value):
    need(not (isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS))
    need(not (isinstance(value, float) and not math.isfinite(value)))
    need(not (isinstance(value, (str, list)) and len(value) > MAX_STR_LEN))
    return value


def _binop(op, a, b):
    kind = type(op)
    need(kind in BIN_OPS)
    if _is_num(a) and _is_num(b):
        # a power is the one operation whose cost explodes: bound its size before computing
        # (everything else works on size-checked operands, so it is cheap)
        if kind is ast.Pow:
            need(not (isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1
                      and b * a.bit_length() > MAX_INT_BITS + 64))
            need(abs(b) <= 10_000 or abs(a) in (0, 1))
        need(not (kind in (ast.Div, ast.FloorDiv, ast.Mod) and b == 0))
        try:
            result = BIN_OPS[kind](a, b)
        except (OverflowError, ZeroDivisionError, ValueError):
            raise Refused from None
        need(not isinstance(result, complex))
        return _sized(result)
    # strings: concatenation and repetition only (% on a string would be formatting)
    if kind is ast.Add and isinstance(a, str) and isinstance(b, str):
        need(len(a) + len(b) <= MAX_STR_LEN)
        return a + b
    need(kind is ast.Mult and {type(a), type(b)} == {str, int})
    s, n = (a, b) if isinstance(a, str) else (b, a)
    need(len(s) * max(n, 0) <= MAX_STR_LEN)  # checked before building it
    return s * n


def _call(node, ev):
    need(not node.keywords)
    func = node.func
    if isinstance(func, ast.Name):
        need(func.id == "len" and len(node.args) == 1)
        obj = ev(node.args[0])
        need(isinstance(obj, (str, list)))
        return len(obj)
    args = [ev(a) for a in node.args]
    need(all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args))
    need(isinstance(func, ast.Attribute) and func.attr in STR_METHODS)
    obj = ev(func.value)
    need(isinstance(obj, str))
    if func.attr == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        # the result length is known in advance: refuse before building a huge string
        need(len(obj) + obj.count(args[0]) * (len(args[1]) - len(args[0])) <= MAX_STR_LEN)
    try:
        return _sized(getattr(obj, func.attr)(*args))
    except (TypeError, ValueError):  # wrong arguments, "empty separator", ...
        raise Refused from None


def safe_eval(expr: str):
    """Evaluate a calculator expression; raise Refused for anything outside the whitelist.
    Allowed: int/float/str literals, + - * / // % **, unary minus/plus, parentheses, len(),
    and the string methods in STR_METHODS. Every intermediate value is size-checked, so the
    work is bounded by MAX_EXPR_CHARS * MAX_NODES small operations."""
    need(isinstance(expr, str) and len(expr) <= MAX_EXPR_CHARS)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise Refused from None
    need(sum(1 for _ in ast.walk(tree)) <= MAX_NODES)

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            need(isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool))
            return _sized(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            need(_is_num(value))
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return _binop(node.op, ev(node.left), ev(node.right))
        need(isinstance(node, ast.Call))
        return _call(node, ev)

    try:
        return ev(tree)
    except RecursionError:
        raise Refused from None


def calculator(expr: str) -> str | None:
    """The tool's answer as text, or None when the expression is refused."""
    try:
        value = safe_eval(expr)
    except Refused:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)  # 6/3 -> "2", which is what a person (and the training data) writes
    return str(value)
