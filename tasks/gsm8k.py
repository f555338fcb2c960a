"""GSM8K: grade-school math word problems (openai/gsm8k). The reference solutions mark each
calculation as <<expr=value>>; those become calculator tool calls, so the model learns to
write <|python_start|>expr<|python_end|> and read the <|output_start|>value<|output_end|>.
The final "#### N" line stays as text; it is what evaluation compares."""

import re

from tasks.common import Task, load_rows, normalize_number

CALC = re.compile(r"<<([^<>]*)>>")
FINAL = re.compile(r"####\s*(-?\s*\$?\s*-?[\d,]*\.?\d+)")


def extract_answer(text):
    """The final answer of a GSM8K-style solution ("#### 1,234" -> "1234"), or None."""
    match = FINAL.search(text or "")
    if match is None:
        return None
    return normalize_number(match.group(1).replace(" ", ""))


def solution_parts(answer: str) -> list[dict]:
    """Split a reference solution into text / python / python_output parts."""
    parts, pos = [], 0
    for match in CALC.finditer(answer):
        if "=" not in match.group(1):
            continue  # not a calculation, leave it in the text
        expr, value = match.group(1).rsplit("=", 1)
        parts.append({"type": "text", "text": answer[pos:match.start()]})
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": value})
        pos = match.end()
    parts.append({"type": "text", "text": answer[pos:]})
    return [p for p in parts if p["type"] != "text" or p["text"]]


class GSM8K(Task):
    """GSM8K(subset="main", split="train"|"test", path=None). Offline: path is the original
    jsonl (question, answer), e.g. ../shared/data/gsm8k/train.jsonl, or the Hub parquet."""

    eval_type = "generative"
    path_flag = "--gsm8k-path"

    def __init__(self, subset="main", split="train", path=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic") and split in ("train", "test"), (subset, split)
        self.rows = load_rows("openai/gsm8k", subset, split, path, "GSM8K", self.path_flag,
                              "the GSM8K jsonl with question and answer fields")

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_parts(row["answer"])},
            ],
            "answer": extract_answer(row["answer"]),
        }

    def evaluate(self, conversation, completion: str) -> bool:
        predicted = extract_answer(completion)
        return predicted is not None and predicted == conversation["answer"]
