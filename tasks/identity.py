"""Identity: conversations that teach the model who it is. The default file,
tasks/data/identity.jsonl, is plain JSONL in CustomJSON's format: edit it (or pass your
own file) to give your model a different name or personality."""

from pathlib import Path

from tasks.customjson import CustomJSON

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "identity.jsonl"


class Identity(CustomJSON):
    """Identity(path=None): the conversations in `path`, default tasks/data/identity.jsonl."""

    def __init__(self, path=None, **kwargs):
        super().__init__(path or DEFAULT_PATH, **kwargs)

    @property
    def name(self):
        return "Identity"
