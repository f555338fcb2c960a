"""report.py's summary table: a figure that is not the standard one (CORE over fewer tasks or
items, ChatCORE over another task set, a subset of problems, pass@k) is marked, with a note."""

import os

import pytest

import report


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def chat_eval_data(tasks, **extra):
    results = {t: {"acc": 0.5, "se": 0.01} for t in tasks}
    return dict(results=results, chatcore=0.3, chatcore_se=0.02, chatcore_tasks=list(tasks), num_samples=1,
                max_problems=None) | extra


def row(table, metric):
    return next(line for line in table.splitlines() if line.startswith(f"| {metric} |"))


def test_standard_figures_have_no_notes():
    report.write_section("base-eval", "Base", dict(core=0.21, core_se=0.01, core_tasks=["a"] * 22,
                                                         missing_tasks=[], max_per_task=None, bpb={"val": 0.81}))
    report.write_section("chat-eval-sft", "SFT", chat_eval_data(report.CHATCORE_TASKS))
    table = report.summary_table()
    assert row(table, "CORE") == "| CORE | 0.2100 ± 0.0100 | - | - |"
    assert row(table, "val bpb") == "| val bpb | 0.8100 | - | - |"
    assert row(table, "ChatCORE") == "| ChatCORE | - | - | 0.3000 ± 0.0200 |"
    assert "note" not in table
    report.write_section("chat-eval-sft", "SFT", chat_eval_data(report.CHATCORE_TASKS[::-1]))
    assert "note" not in report.summary_table()  # the same six tasks in another order


def test_partial_figures_are_marked_and_explained():
    report.write_section("base-eval", "Base", dict(core=0.33, core_se=0.015, core_tasks=["a"] * 19,
                                                         missing_tasks=["hellaswag", "squad", "coqa"], max_per_task=100))
    report.write_section("chat-eval-mid", "MID", chat_eval_data(["SpellingBee", "Arithmetic"]))
    report.write_section("chat-eval-sft", "SFT", chat_eval_data(report.CHATCORE_TASKS, max_problems=50,
                                                                                      num_samples=4))
    table = report.summary_table()
    assert row(table, "CORE") == "| CORE | 0.3300 ± 0.0150 (see note) | - | - |"
    assert row(table, "ChatCORE") == "| ChatCORE | - | 0.3000 ± 0.0200 (see note) | 0.3000 ± 0.0200 |"
    assert row(table, "Arithmetic") == "| Arithmetic | - | 0.5000 ± 0.0100 | - |"
    notes = [line for line in table.splitlines() if line.startswith("- ")]
    assert notes == [
        "- CORE is not the full benchmark: mean over 19 of 22 tasks (missing hellaswag, squad, coqa); "
        "at most 100 items per task.",
        "- ChatCORE MID averages SpellingBee, Arithmetic, not the six tasks of the comparable ChatCORE "
        "(ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee).",
        "- SFT chat tasks: at most 50 problems each.",
        "- SFT generative tasks: pass@4.",
    ]


def test_wall_clock_and_cost_are_the_run_not_the_time_of_generate(base_dir, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_GPU_HOUR_USD", "2.5")
    report.main(["reset"])
    header = report.read_data("header")
    assert header["gpu_hour_usd"] == 2.5
    # pretend the run started 8 h ago on 8 GPUs and wrote its last section 2 h 30 min after that
    header.update(start_time=header["start_time"] - 8 * 3600, num_gpus=8)
    report.write_section("header", "speedchat run", header)
    report.write_section("base-train", "Base training", {"steps": 10})
    section = report.report_dir() / "base-train.md"
    os.utime(section, (section.stat().st_atime, header["start_time"] + 9000))
    text = report.generate(None).read_text()
    assert "Total wall clock time: 2h30m" in text
    assert "Estimated cost: $50.00 (8 GPUs x 2.50 h at $2.50 per GPU-hour)" in text
    # generated again later, at another rate: the same time, the new rate; the sections are kept
    monkeypatch.delenv("SPEEDCHAT_GPU_HOUR_USD")
    report.main(["generate", "--gpu-hour-usd", "3", "--out-dir", ""])
    text = (base_dir / "report.md").read_text()
    assert "Total wall clock time: 2h30m" in text and "Estimated cost: $60.00" in text
    assert "- steps: 10" in text
    for argv in (["generate", "--gpu-hour-usd", "-3"], ["generate", "--out-dir", "/nonexistent/dir"]):
        with pytest.raises(SystemExit):  # argparse: one "error: argument ..." line
            report.main(argv)


def test_a_section_shows_its_numbers_and_keeps_them_whole(base_dir):
    data = {"steps": 12000, "val_bpb": 0.81234, "flops": 3.2e18, "training_seconds": 3725.0, "mfu": None,
            "fp8": "on", "bpb": {"train": 0.8, "val": 0.9}, "curve": {"step": [1, 2]}, "tasks": ["a", "b"]}
    report.write_section("base-train", "Base model training", data, text="free text")
    assert (base_dir / "report" / "base-train.md").read_text() == (
        "## Base model training\n\n- steps: 12,000\n- val bpb: 0.8123\n- flops: 3.200e+18\n- training seconds: 1h02m\n"
        "- mfu: -\n- fp8: on\n- train bpb: 0.8000\n- val bpb: 0.9000\n\nfree text\n")
    assert report.read_data("base-train") == data  # lists and nested numbers stay in the JSON


def test_figures_of_an_earlier_model_are_flagged():
    for name in ("base-train", "base-eval", "mid-train", "chat-eval-mid"):  # the speedrun's order
        report.write_section(name, name, {"tag": "d20"})
    assert "earlier model" not in report.summary_table()
    later = report.written("chat-eval-mid") + 60
    os.utime(report.report_dir() / "mid-train.md", (later, later))  # mid-training ran again after its evaluation
    report.write_section("base-train", "Base", {"tag": "d12-fp8"})  # a side experiment of another tag, run later
    os.utime(report.report_dir() / "base-train.md", (later, later))
    notes = [line for line in report.summary_table().splitlines() if "earlier model" in line]
    assert notes == ["- The MID figures were measured before the last run of mid-train: they describe an earlier model."]
    report.write_section("base-train", "Base", {"tag": "d20"})  # the evaluated model, retrained
    os.utime(report.report_dir() / "base-train.md", (later, later))
    assert "The BASE figures were measured before the last run of base-train" in report.summary_table()
