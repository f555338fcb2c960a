"""report.py: a report describes one model of one run (side experiments on other tags, resumed
stages, one-task evaluations), opens with what was trained and what it cost, and marks and
explains every figure that is not the standard one and every empty cell."""

import time

import pytest

import report


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("SPEEDCHAT_RUN_ID", raising=False)
    return tmp_path


def chat_eval(tasks, model="sft d2 step 6", acc=0.5, **extra):
    results = {t: {"acc": acc, "se": 0.01, "correct": int(100 * acc), "total": 100} for t in tasks}
    return dict(tag="d2", model=model, step=6, results=results, chatcore=0.3, chatcore_se=0.02,
                chatcore_tasks=list(tasks), num_samples=1, max_problems=None) | extra


def training(tag="d2", steps=20, losses=(3.0, 2.0), **extra):
    return dict(tag=tag, steps=steps, curve={"step": [10, 20], "loss": list(losses)}, depth=2, parameters=1000,
                sequence_length=128, vocab_size=512, training_tokens=20480, tokens_per_scaling_parameter=20.48,
                source="stdlib-docs", device="1 x cpu") | extra


def row(table, metric):
    return next(line for line in table.splitlines() if line.startswith(f"| {metric} |"))


def notes(table):
    return [line[2:] for line in table.splitlines() if line.startswith("- ")]


def test_figures_that_are_not_the_standard_one_are_explained():
    report.write_section("base-eval", "Base", dict(tag="d2", core=0.33, core_se=0.015, core_tasks=["a"] * 19,
                                                   missing_tasks=["hellaswag", "squad", "coqa"], max_per_task=100,
                                                   bpb={"val": 0.81}))
    report.write_section("chat-eval-mid", "MID", chat_eval(["SpellingBee", "Arithmetic"], model="mid d2 step 12",
                                                           skipped={"ARC-Easy": "needs a download (offline preset)"}))
    report.write_section("chat-eval-sft", "SFT", chat_eval(report.CHATCORE_TASKS[::-1], max_problems=50, num_samples=4))
    table = report.summary_table()
    assert row(table, "CORE") == "| CORE | 0.3300 ± 0.0150 | - | - |"
    assert row(table, "val bpb") == "| val bpb | 0.8100 | - | - |"
    assert row(table, "ChatCORE") == "| ChatCORE | - | 0.3000 ± 0.0200 | 0.3000 ± 0.0200 |"
    assert row(table, "Arithmetic") == "| Arithmetic | - | 0.5000 ± 0.0100 | - |"
    found = notes(table)
    assert "CORE is not the full benchmark: mean over 19 of 22 tasks (missing hellaswag, squad, coqa); " \
           "at most 100 items per task." in found
    assert "MID: ARC-Easy skipped: needs a download (offline preset)." in found
    assert any(n.startswith("MID: ChatCORE averages SpellingBee, Arithmetic, not the six") for n in found)
    assert not any(n.startswith("SFT: ChatCORE") for n in found)  # the six tasks, in another order
    assert {"SFT: at most 50 problems per task.", "SFT: generative tasks pass@4."} <= set(found)
    report.write_section("base-eval", "Base", dict(tag="d2", bpb={"val": 0.81}))  # the CPU preset: no CORE
    assert any(n.startswith("CORE (BASE): not measured") for n in notes(report.summary_table()))


def test_a_side_experiment_on_another_tag_never_mixes_in(base_dir, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_RUN_ID", "run-1")
    report.main(["reset", "--preset", "cpu"])
    for name, data in (("tokenizer-train", {"vocab_size": 512}), ("base-train", training()),
                       ("base-eval", dict(tag="d2", bpb={"val": 1.5})), ("chat-eval-sft", chat_eval(["SpellingBee"]))):
        report.write_section(name, name, data)
    last = report.read_data("chat-eval-sft")["written"]
    time.sleep(0.05)
    monkeypatch.delenv("SPEEDCHAT_RUN_ID")  # a later experiment by hand: a base model tagged `mine`, one eval
    report.write_section("base-train", "mine", training(tag="mine", depth=4))
    report.write_section("chat-eval-sft", "mine", chat_eval(["GSM8K"], model="sft mine step 6") | {"tag": "mine"})
    text = report.generate(None).read_text()
    assert text.startswith("# speedchat report\n\n## Summary\n\n- run: run-1, preset cpu")
    assert "- model: d2, depth 2, 1,000 parameters" in text and "mine" not in text
    assert row(text, "SpellingBee").endswith("0.5000 ± 0.0100 |") and row(text, "GSM8K") == "| GSM8K | - | - | - |"
    wall = report.read_data("header")["start_time"]
    assert f"- wall clock: {report.format_seconds(last - wall)}" in text  # the run's sections only
    assert report.read_data("base-train")["tag"] == "d2"  # what export.py builds the card from
    mine = report.generate(None, tag="mine").read_text()
    assert "- model: mine, depth 4" in mine and "| GSM8K | - | - | 0.5000 ± 0.0100 |" in mine


def test_a_resumed_stage_is_the_same_model():
    for name, data in (("base-train", training()), ("base-eval", dict(tag="d2", bpb={"val": 1.5})),
                       ("mid-train", training(steps=12)), ("chat-eval-mid", chat_eval(["SpellingBee"]))):
        report.write_section(name, name, data)
    time.sleep(0.05)
    report.write_section("base-train", "again", training())  # resumed at its last step: nothing new trained
    assert "earlier model" not in report.summary_table()
    report.write_section("mid-train", "again", training(steps=12, losses=(3.0, 1.9)))  # trained afresh
    assert [n for n in notes(report.summary_table()) if "earlier model" in n] == [
        "The MID figures were measured before the last run of mid-train: they describe an earlier model."]


def test_a_one_task_evaluation_adds_to_the_section():
    report.write_section("chat-sft", "SFT", training(steps=6))
    report.write_section("chat-eval-sft", "SFT", chat_eval(["SpellingBee", "Arithmetic"], acc=0.5))
    report.write_section("chat-eval-sft", "SFT", chat_eval(["Arithmetic"], acc=1.0))
    data = report.read_data("chat-eval-sft")
    assert set(data["results"]) == {"SpellingBee", "Arithmetic"} and data["results"]["Arithmetic"]["acc"] == 1.0
    assert data["chatcore"] == pytest.approx(0.75) and set(data["chatcore_tasks"]) == {"SpellingBee", "Arithmetic"}
    time.sleep(0.05)
    report.write_section("chat-sft", "SFT", training(steps=6, losses=(2.0, 1.0)))  # a new model: a new section
    report.write_section("chat-eval-sft", "SFT", chat_eval(["Arithmetic"], acc=0.25))
    assert list(report.read_data("chat-eval-sft")["results"]) == ["Arithmetic"]


def test_wall_clock_and_cost_are_the_run_not_the_time_of_generate(base_dir, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_GPU_HOUR_USD", "2.5")
    report.main(["reset"])
    header = report.read_data("header")
    assert header["gpu_hour_usd"] == 2.5
    # pretend the run started 8 h ago on 8 GPUs and wrote its last section 2 h 30 min after that
    report.write_section("header", "speedchat run", header | {"start_time": time.time() - 9000, "num_gpus": 8})
    report.write_section("base-train", "Base training", training())
    text = report.generate(None).read_text()
    assert "- wall clock: 2h30m (base-train 2h30m)" in text
    assert "- cost: $50.00 (8 GPUs x 2.50 h at $2.50 per GPU-hour)" in text
    monkeypatch.delenv("SPEEDCHAT_GPU_HOUR_USD")  # generated again later, at another rate
    report.main(["generate", "--gpu-hour-usd", "3", "--out-dir", ""])
    text = (base_dir / "report.md").read_text()
    assert "- wall clock: 2h30m" in text and "- cost: $60.00" in text and "- steps: 20" in text
    for argv in (["generate", "--gpu-hour-usd", "-3"], ["generate", "--out-dir", "/nonexistent/dir"]):
        with pytest.raises(SystemExit):  # argparse: one "error: argument ..." line
            report.main(argv)


def test_a_section_shows_its_numbers_and_keeps_them_whole(base_dir):
    data = {"steps": 12000, "val_bpb": 0.81234, "flops": 3.2e18, "training_seconds": 3725.0, "mfu": None,
            "fp8": "on", "bpb": {"train": 0.8, "val": 0.9}, "curve": {"step": [1, 2]}, "tasks": ["a", "b"]}
    report.write_section("tokenizer-eval", "Tokenizer evaluation", data, text="free text")
    assert (base_dir / "report" / "tokenizer-eval.md").read_text() == (
        "## Tokenizer evaluation\n\n- steps: 12,000\n- val bpb: 0.8123\n- flops: 3.200e+18\n- training seconds: 1h02m\n"
        "- mfu: -\n- fp8: on\n- train bpb: 0.8000\n- val bpb: 0.9000\n\nfree text\n")
    assert data.items() <= report.read_data("tokenizer-eval").items()  # lists and nested numbers stay in the JSON
