"""Arithmetic with the calculator tool, generated with a seeded RNG (no download): the
assistant writes the expression as a python call, reads the value from the tool's output and
states the answer. Teaches the tool-use format cheaply (the offline CPU preset uses it).
About a tenth of the expressions (by a hash of the expression) are held out: the test split asks
only about them, the train split never does."""

import random
import zlib

from tasks.common import Task, last_number

QUESTIONS = [
    "What is {e}?",
    "Calculate {e}.",
    "Compute {e}",
    "{e} = ?",
    "What's {e}? Use the calculator.",
    "Can you work out {e} for me?",
]
STORIES = {
    "+": "I have {a} marbles and find {b} more. How many marbles do I have now?",
    "-": "A shop had {a} apples and sold {b}. How many apples are left?",
    "*": "There are {a} boxes with {b} pencils in each. How many pencils are there in total?",
    "/": "{a} cookies are shared equally among {b} children. How many cookies does each child get?",
}


def is_test_expression(expr: str) -> bool:
    """About 1 expression in 10 is held out for the test split, by a stable hash of its text, so
    a test problem's expression never appears in training whatever the seeds and sizes."""
    return zlib.crc32(expr.encode()) % 10 == 0


class Arithmetic(Task):
    """Arithmetic(size=1000, split="train", seed=42, max_digits=3): + - * / on integers (division
    always exact), sometimes as a word problem, sometimes with a second operation."""

    eval_type = "generative"

    def __init__(self, size=1000, split="train", seed=42, max_digits=3, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), split
        self.size, self.split, self.seed, self.max_digits = size, split, seed, max_digits

    def num_examples(self):
        return self.size

    def number(self, rng):
        return rng.randint(1, 10 ** rng.randint(1, self.max_digits) - 1)

    def problem(self, rng):
        """(expression, value, operator, a, b) with an exact integer value."""
        op = rng.choice("+-*/")
        a, b = self.number(rng), self.number(rng)
        if op == "/":
            b = rng.randint(2, 12)
            a = b * self.number(rng)
        if op == "-" and rng.random() < 0.7:
            a, b = max(a, b), min(a, b)  # mostly non-negative results
        expr, value = f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        if op in "+-" and rng.random() < 0.3:  # a second step, e.g. (a + b) * c
            c = rng.randint(2, 9)
            expr, value = f"({expr}) * {c}", value * c
        return expr, value, op, a, b

    def get_example(self, index):
        rng = random.Random(f"arithmetic-{self.seed}-{self.split}-{index}")
        while True:  # draw until the expression is on this split's side (about 10 draws for test)
            expr, value, op, a, b = self.problem(rng)
            if is_test_expression(expr) == (self.split == "test"):
                break
        if "(" not in expr and rng.random() < 0.25:
            question = STORIES[op].format(a=a, b=b)
            intro = f"That is {expr}. Let me calculate: "
        else:
            question = rng.choice(QUESTIONS).format(e=expr)
            intro = "Let me calculate: "
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": [
                    {"type": "text", "text": intro},
                    {"type": "python", "text": expr},
                    {"type": "python_output", "text": str(value)},
                    {"type": "text", "text": f"{expr} = {value}. The answer is {value}."},
                ]},
            ],
            "answer": str(value),
        }

    def evaluate(self, conversation, completion: str) -> bool:
        return last_number(completion) == conversation["answer"]
