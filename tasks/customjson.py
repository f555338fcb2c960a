"""CustomJSON: your own conversations from a JSONL file, one per line, in the OpenAI form
{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": ...}, ...]}
(or just the list of messages), or ShareGPT's {"conversations": [{"from": "human", "value": "..."},
{"from": "gpt", "value": "..."}, ...]}. Roles: an optional leading "system", then "user" and
"assistant" alternating, ending with "assistant". Assistant content may be a string or a list of
parts {"type": "text"|"python"|"python_output", "text": "..."}.

Each line is checked by the tokenizer's own conversation check (what it cannot render); a bad line
is reported with its number and skipped, and a file without one good line is an error.

    CustomJSON("my_chats.jsonl", weight=2)   # every conversation twice; weight 0.5: every other one
"""

import copy
import json
import sys
from pathlib import Path

from common import UserError
from tasks.common import Task, check_conversation

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMS = 'expected {"messages": [{"role", "content"}, ...]} (OpenAI) or {"conversations": [{"from", "value"}, ...]} (ShareGPT)'


def _messages(item) -> list:
    """The OpenAI-form messages of one line (KeyError, TypeError, ... when it has none)."""
    if isinstance(item, list):
        return item
    if "messages" in item:
        return item["messages"]
    return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in item["conversations"]]


def read_line(line: str):
    """(messages, None) for a usable conversation, else (None, why not)."""
    try:
        messages = _messages(json.loads(line))
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except (KeyError, TypeError, AttributeError):
        return None, FORMS
    problem = check_conversation(messages)
    return (None, problem) if problem else (messages, None)


def load_conversations(path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"conversations file {path} does not exist")
    conversations, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            messages, problem = read_line(line) if line.strip() else ([], None)
            if problem:
                bad.append(f"line {lineno}: {problem}")
            conversations += [{"messages": messages}] if messages else []
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        print(f"warning: {path}: skipped {len(bad)} bad line(s) of {len(bad) + len(conversations)}: {shown}",
              file=sys.stderr, flush=True)
    if not conversations:
        raise UserError(f"{path} has no valid conversation" + (f" ({len(bad)} bad lines, first {bad[0]})" if bad else ""))
    return conversations


class CustomJSON(Task):
    """CustomJSON(path, weight=1): the conversations in a JSONL file, in file order, each about
    `weight` times (2: twice each; 0.5: every other one)."""

    def __init__(self, path, weight=1.0, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.conversations = load_conversations(path)
        self.size = max(1, round(weight * len(self.conversations)))

    @property
    def name(self):
        return f"CustomJSON({self.path.name})"

    def num_examples(self):
        return self.size

    def get_example(self, index):  # spread evenly over the file, whatever the weight
        return copy.deepcopy(self.conversations[index * len(self.conversations) // self.size])
