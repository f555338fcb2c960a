"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk, ~460k train / ~24k test).
Offline it reads a local file of conversations in any of the common shapes: rows with
"messages" (the Hub's format), ShareGPT rows with "conversations" [{"from", "value"}]
(e.g. ../shared/data/chat/dummy_conversation.json), or Self-Instruct rows with
"instruction" and "instances" [{"input", "output"}]."""

from tasks.common import ParquetRows, Task, load_rows

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


def row_messages(row):
    """A row in one of the supported shapes -> raw [{"role", "content"}]."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if "conversations" in row:
        return [{"role": ROLES.get(str(t.get("from", "")).lower(), "?"), "content": t.get("value", "")}
                for t in row["conversations"]]
    if "instruction" in row and row.get("instances"):
        instance = row["instances"][0]
        prompt = row["instruction"] + (f"\n\n{instance['input']}" if instance.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": instance["output"]}]
    raise ValueError(f"unrecognized chat row with keys {sorted(row)}")


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


class SmolTalk(Task):
    """SmolTalk(split="train"|"test", path=None). Offline: path is a .json/.jsonl/.parquet of
    conversations (see the module docstring)."""

    path_flag = "--smoltalk-path"

    def __init__(self, split="train", path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk has splits train/test, not {split!r}")
        rows = load_rows("HuggingFaceTB/smol-smoltalk", "default", split, path, "SmolTalk", self.path_flag,
                         'a .json/.jsonl/.parquet of chats ({"messages"}, ShareGPT or Self-Instruct rows)')
        if not isinstance(rows, ParquetRows):
            # small local files: convert once and drop what cannot be trained on
            rows = [c for c in (tidy(row_messages(r)) for r in rows) if c]
        self.rows = rows

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        if isinstance(row, dict):  # a Hub row, converted on demand
            messages = tidy(row_messages(row))
            if messages is None:
                raise ValueError(f"SmolTalk row {index} has no user/assistant exchange")
        else:
            messages = [dict(m) for m in row]
        return {"messages": messages}
