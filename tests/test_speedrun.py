"""End to end: the offline CPU preset of speedrun.sh, into a temporary base dir, as a new user meets it.

It runs every stage at toy scale (a few minutes on 2 cores, no network) and checks what a user gets:
report.md opening with the run's summary and holding every section, the training-curve PNGs, a chat
command that works as printed in a new login shell, a second run that skips the finished stages, and
a Ctrl-C that says in one line how to resume, after which the interrupted stage runs again."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def speedrun(tmp_path, env, **popen):
    return subprocess.Popen(["bash", str(REPO / "speedrun.sh")], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_cpu_preset_end_to_end(tmp_path):
    env = dict(os.environ, SPEEDCHAT_BASE_DIR=str(tmp_path / "base"), SPEEDCHAT_PRESET="cpu", PYTHONUNBUFFERED="1",
               SPEEDCHAT_SKIP_SETUP="1")  # the suite runs in the environment test.sh made
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out, err = speedrun(tmp_path, env).communicate(timeout=1200)
    assert "done: read" in out, (out + err)[-6000:]

    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# speedchat report\n\n## Summary\n\n- run: ")
    summary = report[:report.index("| metric |")]
    for line in ("preset cpu", "- model: d2, depth 2", "tokens of stdlib-docs", "- wall clock:", "- cost: no GPU time",
                 "- headline:"):
        assert line in summary, f"the summary lacks {line!r}"
    for title in ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
                  "Mid-training", "Chat SFT", "Chat evaluation"]:
        assert title.lower() in report.lower(), f"report.md lacks {title!r}"
    assert "(not run)" not in report and "CORE (BASE): not measured" in report and "What the base model says" in report
    for stage in ["base", "mid", "sft"]:
        png = tmp_path / f"curve_{stage}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"missing plot {png.name}"

    # the command it printed, as typed into a new login shell of a machine with no uv on the PATH
    command = out.rstrip().splitlines()[-1].strip()
    assert "source .venv/bin/activate" in command and "uv " not in command
    home = tmp_path / "home"
    home.mkdir()
    chat = subprocess.run(["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "bash", "-lc",
                           f"{command} -p 'What is 2+3?' --max-tokens 16"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-3000:]

    # a second run, asked to redo base-eval, skips every finished stage before it; Ctrl-C (to the
    # terminal's process group) during base-eval: one line on how to resume, no traceback; the next run
    # does that stage again and skips the rest
    run = speedrun(tmp_path, dict(env, SPEEDCHAT_RERUN="base-eval"), start_new_session=True)
    before = []
    while "== base-eval" not in (line := run.stdout.readline()):
        assert line, "the rerun never reached base-eval: " + "".join(before)[-3000:]
        before.append(line)
    assert "== base-train: done in an earlier run, skipped\n" in before, "".join(before)[-3000:]
    time.sleep(2)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "interrupted: run `bash speedrun.sh` again to resume" in err
    assert "Traceback" not in out + err
    out, err = speedrun(tmp_path, env).communicate(timeout=600)
    assert "== base-eval\n" in out and "mid-train: done in an earlier run, skipped" in out, (out + err)[-3000:]
