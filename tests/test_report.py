"""report.py's summary table: a figure that is not the standard one (CORE over fewer tasks or
items, ChatCORE over another task set, a subset of problems, pass@k) is marked, with a note."""

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
    report.write_section("base-eval", "Base", data=dict(core=0.21, core_se=0.01, core_tasks=["a"] * 22,
                                                         missing_tasks=[], max_per_task=None, bpb={"val": 0.81}))
    report.write_section("chat-eval-sft", "SFT", data=chat_eval_data(report.CHATCORE_TASKS))
    table = report.summary_table()
    assert row(table, "CORE") == "| CORE | 0.2100 ± 0.0100 | - | - |"
    assert row(table, "val bpb") == "| val bpb | 0.8100 | - | - |"
    assert row(table, "ChatCORE") == "| ChatCORE | - | - | 0.3000 ± 0.0200 |"
    assert "note" not in table


def test_partial_figures_are_marked_and_explained():
    report.write_section("base-eval", "Base", data=dict(core=0.33, core_se=0.015, core_tasks=["a"] * 19,
                                                         missing_tasks=["hellaswag", "squad", "coqa"], max_per_task=100))
    report.write_section("chat-eval-mid", "MID", data=chat_eval_data(["SpellingBee", "Arithmetic"]))
    report.write_section("chat-eval-sft", "SFT", data=chat_eval_data(report.CHATCORE_TASKS, max_problems=50,
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
