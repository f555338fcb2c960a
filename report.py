"""The run report: each stage writes its own markdown section into
$SPEEDCHAT_BASE_DIR/report/, and `python -m report generate` joins them into report.md."""

import json
from pathlib import Path

from common import get_base_dir, atomic_write

# Sections in the order they appear in report.md.
SECTION_ORDER = [
    "header", "tokenizer-train", "tokenizer-eval", "base-train", "base-eval",
    "mid-train", "chat-eval-mid", "chat-sft", "chat-eval-sft",
]


def report_dir() -> Path:
    path = get_base_dir() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_section(name: str, title: str, items: dict | None = None, text: str = "", data: dict | None = None):
    """Write one stage's section: a title, `- key: value` lines for `items`, free markdown `text`.
    `data` (JSON-serialisable) is saved beside it for the summary table."""
    lines = [f"## {title}", ""]
    for key, value in (items or {}).items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"- {key}: {value}")
    if text:
        lines += ["", text.rstrip()]
    atomic_write(report_dir() / f"{name}.md", "\n".join(lines) + "\n")
    if data is not None:
        atomic_write(report_dir() / f"{name}.json", json.dumps(data, indent=2, sort_keys=True))
