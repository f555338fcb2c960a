"""CustomJSON: your own conversations from a JSONL file, one per line, either
{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": ...}, ...]}
or just the list of messages. Roles: an optional leading "system", then "user" and
"assistant" alternating, ending with "assistant". Assistant content may be a string or a
list of parts {"type": "text"|"python"|"python_output", "text": "..."}. A bad line stops
loading with an error that names the file and the line."""

import copy
import json
from pathlib import Path

from common import UserError
from tasks.common import Task, check_conversation


def load_conversations(path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"conversations file {path} does not exist")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
            if isinstance(item, dict):
                if "messages" not in item:
                    raise UserError(f'{path} line {lineno}: expected {{"messages": [...]}} or a list of messages')
                messages = item["messages"]
            else:
                messages = item
            problem = check_conversation(messages)
            if problem:
                raise UserError(f"{path} line {lineno}: {problem}")
            conversations.append({"messages": messages})
    if not conversations:
        raise UserError(f"{path} has no conversations")
    return conversations


class CustomJSON(Task):
    """CustomJSON(path): every conversation in a JSONL file, in file order."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.conversations = load_conversations(path)

    @property
    def name(self):
        return f"CustomJSON({self.path.name})"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return copy.deepcopy(self.conversations[index])
