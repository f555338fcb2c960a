"""Continued pretraining (--init-from), your own chat data (--chat-data, CustomJSON) and
`python -m report compare`. Mixtures and schedules of pretraining sources: test_dataloader.py."""

import json

import pytest
from conftest import TINY_MODEL, link_base_dir
from safetensors.torch import load_file

import base_train
import checkpoint
import mid_train
import report
from common import UserError
from tasks.customjson import CustomJSON
from tasks.mixtures import chat_data_arg, data_paths

CONTINUE = TINY_MODEL + ["--device-batch-size", "4", "--total-batch-size", "1024", "--num-iterations", "2",
                         "--eval-every", "-1", "--eval-tokens", "2048", "--sample-every", "-1", "--model-tag", "cont"]


def test_init_from_loads_the_weights_only_and_refuses_another_shape(trained, tmp_path, monkeypatch):
    link_base_dir(trained, tmp_path, monkeypatch)
    (tmp_path / "checkpoints" / "base").mkdir(parents=True)
    (tmp_path / "checkpoints" / "base" / "d2").symlink_to(trained / "checkpoints" / "base" / "d2")  # read-only
    frozen = ["--embedding-lr", "0", "--unembedding-lr", "0", "--matrix-lr", "0", "--num-iterations", "1"]
    base_train.main(CONTINUE + frozen + ["--init-from", "base:d2"])
    weights = lambda tag, step: load_file(checkpoint.checkpoint_dir("base", tag) / f"model_{step:06d}.safetensors")  # noqa: E731
    start, cont = weights("d2", 20), weights("cont", 1)
    big = [k for k in start if start[k].numel() >= 1024]  # embeddings and matrices; not the scalars (own lrs)
    assert len(big) > 10 and all((start[k] == cont[k]).all() for k in big)  # d2's, copied
    base_train.main(CONTINUE + ["--init-from", "base:d2:20"])
    _, optimizers, meta = checkpoint.load_checkpoint("base", "cont", 2, "cpu", load_optimizer=True)
    assert meta["init_from"]["tag"] == "d2" and meta["init_from"]["step"] == 20 and meta["step"] == 2
    assert {s["step"] for opt in optimizers for s in opt["state"].values() if "step" in s} == {2}  # not d2's AdamW
    assert meta["rank_state"]["data"]["batches"] == 4  # its own data position: 2 steps x 2 micro-batches
    section = json.loads((tmp_path / "report" / "base-train.json").read_text())
    assert section["init_from"].startswith("base d2 step 20") and section["tokens"]["stdlib-docs"] > 0
    with pytest.raises(UserError, match="does not fit this run.*3 layers.*pass its --depth"):
        base_train.main(CONTINUE + ["--depth", "3", "--model-tag", "wide", "--init-from", "base:d2"])


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": "4"}]}
TOOL = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [
    {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}, {"type": "text", "text": "4"}]}]


def test_chat_data_skips_bad_lines_by_number(tmp_path, capsys):
    bad = ['{"messages": [', '{"convo": []}', '{"messages": []}', '[{"role": "assistant", "content": "hi"}]',
           '[{"role": "user", "content": "a"}]', '{"conversations": [{"from": "alien", "value": "x"}]}',
           '[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]']
    lines = [json.dumps(GOOD), bad[0], "", json.dumps(SHAREGPT), *bad[1:], json.dumps(TOOL)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    task = CustomJSON(path)
    assert [c["messages"][-1]["content"] for c in task] == ["hello", "4", TOOL[-1]["content"]]
    assert task[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    err = capsys.readouterr().err
    assert f"{path}: skipped 7 bad line(s) of 10" in err and "line 2: not valid JSON" in err
    assert "line 5: expected" in err and "line 6:" in err and "..." in err  # the first three, then ...
    task[0]["messages"].append("mutated")
    assert len(task[0]["messages"]) == 2  # handed out as copies
    assert [c["messages"][-1]["content"] for c in CustomJSON(path, weight=2)][:2] == ["hello"] * 2
    assert len(CustomJSON(path, weight=0.5)) == 2
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(UserError, match=r"no valid conversation \(7 bad lines, first line 1: not valid JSON"):
        CustomJSON(path)
    with pytest.raises(UserError, match="does not exist"):
        CustomJSON(tmp_path / "nope.jsonl")


def test_chat_data_flag_joins_the_training_mixture(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(SHAREGPT) + "\n")
    assert chat_data_arg("a:b.jsonl") == ("a:b.jsonl", 1.0) and chat_data_arg("x.jsonl:2.5") == ("x.jsonl", 2.5)
    with pytest.raises(SystemExit):
        mid_train.get_args(["--chat-data", f"{path}:0"])
    args = mid_train.get_args(["--chat-data", f"{path}:3", "--chat-data", str(path)])
    tasks = mid_train.mid_tasks("offline", "train", data_paths(args))
    assert [len(t) for t in tasks if isinstance(t, CustomJSON) and t.path == path] == [6, 2]
    assert not any(isinstance(t, CustomJSON) and t.path == path for t in mid_train.mid_tasks("offline", "val", data_paths(args)))


def test_compare_two_runs_and_two_tags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    runs = {"a": dict(core=0.20, core_se=0.01, bpb={"val": 0.90}, results={"ARC": {"accuracy": 0.5, "accuracy_se": 0.02}}),
            "b": dict(core=0.25, core_se=0.01, bpb={"val": 0.85}, results={"ARC": {"accuracy": 0.51, "accuracy_se": 0.02}},
                      seconds=3.5)}
    for name, data in runs.items():
        (tmp_path / name / "report").mkdir(parents=True)
        (tmp_path / name / "report" / "base-eval.json").write_text(json.dumps(data))
    report.main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "report")])
    out = capsys.readouterr().out
    assert "3 shared metrics (0 only in A, 0 only in B)" in out
    assert "| base-eval core | 0.2000 ± 0.0100 | 0.2500 ± 0.0100 | +0.0500 | NO |" in out  # 5 SE > 2 * 1.41 SE
    assert "| base-eval results ARC accuracy | 0.5000 ± 0.0200 | 0.5100 ± 0.0200 | +0.0100 | yes |" in out
    assert "| base-eval bpb val | 0.9000 | 0.8500 | -0.0500 | - |" in out and "seconds" not in out
    monkeypatch.setenv("SPEEDCHAT_RUN_ID", "run-1")
    report.reset(3.0)
    for tag, data in runs.items():  # sections of two tags written one after the other: each kept per tag
        report.write_section("base-eval", "Base model evaluation", dict(data, tag=tag))
    assert sorted(report.compare("a", "b")[4:]) == sorted(out.splitlines()[4:])
    # the base dir's own folder: its run's model ("b", written last), not a later side experiment's
    monkeypatch.setenv("SPEEDCHAT_RUN_ID", "side")
    report.write_section("base-eval", "Base model evaluation", dict(runs["a"], tag="side-experiment"))
    same = "| base-eval core | 0.2500 ± 0.0100 | 0.2500 ± 0.0100 | +0.0000 | yes |"
    assert same in report.compare("b", str(tmp_path / "base"))
    with pytest.raises(UserError, match="share no metric"):
        report.compare("a", "nope")
    with pytest.raises(SystemExit):
        report.main(["compare", "a"])
