"""HumanEval: 164 Python functions to complete from a signature and docstring
(openai/openai_humaneval). The user turn is the prompt; the reference answer is the whole
function. evaluate() runs the model's code and the hidden tests in the sandbox of execution.py."""

import re

from tasks.common import Task, load_rows

FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)  # ```Python too


def extract_code(completion: str) -> str:
    """The code in a completion: its first ``` fenced block if it has one, else all of it."""
    match = FENCE.search(completion)
    return match.group(1) if match else completion


def build_program(prompt, completion, test, entry_point) -> str:
    """The program the tests run: the prompt (its imports and helpers), the model's code,
    the tests and the call to check(). A completion that defines the function itself is put
    after the prompt (its def replaces the prompt's docstring-only stub); one that only
    continues the body is appended to the prompt."""
    code = extract_code(completion)
    defines = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M)
    program = prompt + "\n\n" + code if defines else prompt + code
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """HumanEval(path=None, timeout=5.0). Offline: path is HumanEval.jsonl(.gz) (task_id,
    prompt, canonical_solution, test, entry_point), e.g. ../shared/data/humaneval/HumanEval_first40.jsonl."""

    eval_type = "generative"
    path_flag = "--humaneval-path"

    def __init__(self, path=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        self.rows = load_rows("openai/openai_humaneval", "openai_humaneval", "test", path, "HumanEval",
                              self.path_flag, "HumanEval.jsonl with task_id, prompt, canonical_solution, "
                              "test, entry_point")

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "prompt": row["prompt"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, completion: str) -> bool:
        from execution import run_python

        program = build_program(conversation["prompt"], completion, conversation["test"], conversation["entry_point"])
        return run_python(program, timeout=self.timeout).ok
