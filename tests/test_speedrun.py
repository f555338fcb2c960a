"""End to end: the offline CPU preset of speedrun.sh, into a temporary base dir.

It runs every stage at toy scale (a few minutes on 2 cores, no network) and checks what a
user gets: report.md with every section and the summary table, the training-curve PNGs,
a model that chat_cli.py answers with, and that a second run skips the finished stages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_preset_end_to_end(tmp_path):
    base = tmp_path / "base"
    env = dict(os.environ, SPEEDCHAT_BASE_DIR=str(base), SPEEDCHAT_PRESET="cpu", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run(["bash", str(REPO / "speedrun.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]

    report = (tmp_path / "report.md").read_text()
    for title in ["## Summary", "Tokenizer training", "Tokenizer evaluation", "Base model training",
                  "Base model evaluation", "Mid-training", "Chat SFT", "Chat evaluation"]:
        assert title.lower() in report.lower(), f"report.md lacks {title!r}"
    assert "(not run)" not in report
    assert "| ChatCORE |" in report and "| CORE |" in report
    assert "Total wall clock time" in report
    for stage in ["base", "mid", "sft"]:
        png = tmp_path / f"curve_{stage}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"missing plot {png.name}"

    chat = subprocess.run([sys.executable, "-m", "chat_cli", "-p", "What is 2+3?", "--max-tokens", "16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip(), "chat_cli -p printed no answer"

    # A second run resumes: every stage is already done, nothing is retrained.
    again = subprocess.run(["bash", str(REPO / "speedrun.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "base-train: done in an earlier run, skipped" in again.stdout
