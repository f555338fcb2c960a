"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk, ~460k train / ~24k test).
Offline it reads a local file of conversations in any of the common shapes: rows with
"messages" (the Hub's format), ShareGPT rows with "conversations" [{"from", "value"}]
(e.g. ../shared/data/chat/dummy_conversation.json), or Self-Instruct rows with
"instruction" and "instances" [{"input", "output"}]."""

from common import UserError, print0
from tasks.common import ParquetRows, Task, load_rows

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


def row_messages(row):
    """A row in one of the supported shapes -> raw [{"role", "content"}], or None when the row
    has none of them. Missing fields and odd types give None or empty turns, never an exception:
    one bad row among many is dropped, not fatal."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return [{"role": m.get("role"), "content": m.get("content")} for m in _dicts(row["messages"])]
    if "conversations" in row:
        return [{"role": ROLES.get(str(t.get("from", "")).lower(), "?"), "content": t.get("value")}
                for t in _dicts(row["conversations"])]
    instances = _dicts(row.get("instances"))
    if "instruction" in row and instances:
        prompt, extra = row["instruction"], instances[0].get("input")
        if isinstance(prompt, str) and isinstance(extra, str) and extra:
            prompt += f"\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": instances[0].get("output")}]
    return None


def _dicts(value):
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def tidy(messages):
    """Make a usable conversation: an optional leading system message, then user and assistant
    alternating, ending with the assistant. Unknown roles and empty turns are dropped and
    consecutive turns of one role merged. None when nothing trainable is left."""
    system = [m for m in messages[:1] if m["role"] == "system" and isinstance(m["content"], str)]
    out = []
    for m in messages[len(system):]:
        if m["role"] not in ("user", "assistant") or not isinstance(m["content"], str) or not m["content"].strip():
            continue
        if not out and m["role"] == "assistant":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    if out and out[-1]["role"] == "user":
        out.pop()
    return system + out if out else None


FORMATS = 'a .json/.jsonl/.parquet of chats ({"messages"}, ShareGPT or Self-Instruct rows)'


def conversation_of(row):
    """The trainable conversation of a row (see tidy), or None for a row to drop."""
    messages = row_messages(row)
    return tidy(messages) if messages is not None else None


class SmolTalk(Task):
    """SmolTalk(split="train"|"test", path=None). Offline: path is a .json/.jsonl/.parquet of
    conversations (see the module docstring). Rows with nothing to train on (no assistant reply,
    empty turns, an unknown shape) are dropped once, when the data loads, and counted."""

    path_flag = "--smoltalk-path"

    def __init__(self, split="train", path=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), split
        rows = load_rows("HuggingFaceTB/smol-smoltalk", "default", split, path, "SmolTalk", self.path_flag,
                         FORMATS)
        total = len(rows)
        if isinstance(rows, ParquetRows):
            # the Hub table (~460k rows) stays in Arrow: only a keep/drop flag per row is kept here
            rows.keep([conversation_of(row) is not None for row in rows.iter_rows()])
        else:  # small local files: convert once
            rows = [c for c in map(conversation_of, rows) if c]
        if total and not rows:
            raise UserError(f"SmolTalk: no usable conversation in {path or 'the download'}; expected {FORMATS}")
        if len(rows) < total:
            print0(f"SmolTalk {split}: dropped {total - len(rows):,} of {total:,} rows with no usable "
                   f"user/assistant exchange")
        self.rows = rows

    def get_example(self, index):
        row = self.rows[index]
        if isinstance(row, dict):  # a Hub row, converted on demand (the loader kept only usable rows)
            return {"messages": conversation_of(row)}
        return {"messages": [dict(m) for m in row]}
