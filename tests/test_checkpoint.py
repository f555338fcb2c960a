"""checkpoint.py: save/load roundtrip, meta-last atomicity, loading that never runs code, the
one-run-per-folder lock, tags that stay inside the base dir, and clear errors on bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import checkpoint
from common import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def tiny_model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # so the optimizer has state worth saving
    return model, opt


def test_roundtrip_model_optimizer_meta_and_rank_state():
    import random

    model, opt = tiny_model_and_optimizer()
    meta = {"model_config": {"n_layer": 2}, "loss": 1.5, "dataloader_state": {"shard": 3, "row": torch.tensor(7)}}
    rank_state = {"rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "batches": [1, (2, 3)]}
    checkpoint.save_checkpoint("base", "d2", 10, model, [opt], meta, rank_state=rank_state)

    model_state, optim_states, loaded = checkpoint.load_checkpoint("base", "d2", 10, "cpu", load_optimizer=True)
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    assert loaded["step"] == 10 and loaded["loss"] == 1.5 and loaded["tag"] == "d2"
    assert loaded["dataloader_state"] == {"shard": 3, "row": 7}  # tensors in meta become JSON numbers
    assert loaded["rank_state"]["rng"]["python"] == random.getstate()
    assert torch.equal(loaded["rank_state"]["rng"]["torch"], torch.get_rng_state())

    model2, _ = tiny_model_and_optimizer()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(optim_states[0])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)

    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule looks like to state_dict()
    checkpoint.save_checkpoint("base", "d2", 11, wrapped, [opt], {})
    assert set(checkpoint.load_checkpoint("base", "d2", 11, "cpu")[0]) == set(model.state_dict())


def test_latest_step_and_tag_and_incomplete_steps(base_dir):
    model, opt = tiny_model_and_optimizer()
    for step in (5, 20):
        checkpoint.save_checkpoint("base", "d2", step, model, [opt], {"model_config": {}})
    directory = base_dir / "checkpoints/base/d2"
    # a save killed after the weights but before the meta, and an atomic write's leftover: not steps
    (directory / "model_000030.safetensors").write_bytes((directory / "model_000020.safetensors").read_bytes())
    (directory / ".meta_000040.json.abc.tmp").write_text("{}")
    assert checkpoint.list_steps(directory) == [5, 20] and checkpoint.find_last_step(directory) == 20
    _, _, meta = checkpoint.load_checkpoint("base", None, None, "cpu")
    assert meta["step"] == 20 and meta["tag"] == "d2"
    assert checkpoint.load_checkpoint("base", "d2", 5, "cpu")[2]["step"] == 5
    with pytest.raises(UserError, match="no complete checkpoint for step 7"):
        checkpoint.load_checkpoint("base", "d2", 7, "cpu")


def test_bad_files_are_one_line_errors(base_dir):
    model, opt = tiny_model_and_optimizer()
    checkpoint.save_checkpoint("base", "d2", 3, model, [opt], {})
    directory = base_dir / "checkpoints/base/d2"
    with pytest.raises(UserError, match="optim_000003_rank1.pt is missing"):  # resumed with another world size
        checkpoint.load_checkpoint("base", "d2", 3, "cpu", rank=1, load_optimizer=True)
    corruptions = {"meta_000003.json": lambda p: p.write_text('{"step": 3, "trunc'),
                   "model_000003.safetensors": lambda p: p.write_bytes(p.read_bytes()[:-100]),
                   "optim_000003_rank0.pt": lambda p: p.write_bytes(b"garbage")}
    for name, corrupt in corruptions.items():
        checkpoint.save_checkpoint("base", "d2", 3, model, [opt], {})
        corrupt(directory / name)
        with pytest.raises(UserError, match=f"{name} is corrupt"):
            checkpoint.load_checkpoint("base", "d2", 3, "cpu", load_optimizer=True)
    with pytest.raises(UserError, match="no base checkpoint under .*base_train"):
        checkpoint.load_checkpoint("base", "other", None, "cpu")


class Payload:
    """A pickle that creates `marker` when it is loaded: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_pickle_never_runs(base_dir):
    model, opt = tiny_model_and_optimizer()
    checkpoint.save_checkpoint("base", "d2", 3, model, [opt], {})
    directory = base_dir / "checkpoints/base/d2"
    marker = base_dir / "pwned"
    torch.save({"optimizers": [Payload(marker)], "rank_state": None}, directory / "optim_000003_rank0.pt")
    with pytest.raises(UserError, match="optim_000003_rank0.pt is corrupt"):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu", load_optimizer=True)
    # a folder of the old pickle format: refused with the command to convert it; converting runs nothing
    old = base_dir / "checkpoints/mid/d2"
    old.mkdir(parents=True)
    (old / "meta_000005.json").write_text("{}")
    torch.save({"w": Payload(marker)}, old / "model_000005.pt")
    with pytest.raises(UserError, match=f"old pickle format.*python -m checkpoint --convert {old}"):
        checkpoint.load_checkpoint("mid", None, None, "cpu")
    with pytest.raises(UserError, match="cannot be converted safely"):
        checkpoint.convert(old)
    assert not marker.exists()
    # an honest old checkpoint converts and then loads
    torch.save(model.state_dict(), old / "model_000005.pt")
    checkpoint.main(["--convert", str(old)])
    assert sorted(p.name for p in old.iterdir()) == ["meta_000005.json", "model_000005.safetensors"]
    assert torch.equal(checkpoint.load_checkpoint("mid", "d2", 5, "cpu")[0]["0.weight"], model[0].weight)


@pytest.mark.parametrize("tag", ["../../x", "/abs", "a/b", "..", ".hidden", ""])
def test_tags_stay_inside_the_base_dir(tag):
    model, opt = tiny_model_and_optimizer()
    with pytest.raises(UserError, match="model tag"):
        checkpoint.save_checkpoint("base", tag, 1, model, [opt], {})


def test_one_run_per_folder(base_dir):
    directory = base_dir / "checkpoints/base/d2"
    directory.mkdir(parents=True)
    (directory / ".lock").write_text("pid 999999999 on a killed run\n")  # stale: nobody holds it
    (directory / ".model_000010.safetensors.x1y2.tmp").write_bytes(b"half a write")
    owner = subprocess.Popen(
        [sys.executable, "-c", "import checkpoint, time; checkpoint.acquire_lock('base', 'd2'); print('held', "
         "flush=True); time.sleep(60)"], cwd=REPO, env=dict(os.environ, RANK="0"), stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline() == "held\n"
        assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp"))  # stale temp files removed
        with pytest.raises(UserError, match=f"in use by pid {owner.pid} on "):
            checkpoint.acquire_lock("base", "d2")
    finally:
        owner.kill()
        owner.wait()
    assert checkpoint.acquire_lock("base", "d2") == directory  # the dead run's lock is taken over
    assert (directory / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_keep_last_prune_and_clear(base_dir):
    model, opt = tiny_model_and_optimizer()
    directory = base_dir / "checkpoints/base/d2"
    for step in (1, 2, 3, 4):
        if step == 3:  # the leftover shard of a save that died before its meta: pruned too
            (directory / "optim_000099_rank0.pt").write_bytes(b"partial")
        checkpoint.save_checkpoint("base", "d2", step, model, [opt], {}, keep_last=2)
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta_000003.json", "meta_000004.json", "model_000003.safetensors", "model_000004.safetensors",
        "optim_000003_rank0.pt", "optim_000004_rank0.pt"]
    checkpoint.clear_checkpoints(directory)
    assert list(directory.iterdir()) == []


def test_meta_is_written_last(monkeypatch, base_dir):
    """A crash while writing the meta (the last file) leaves no complete step."""
    model, opt = tiny_model_and_optimizer()

    def crash(path, data):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "atomic_write", crash)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_checkpoint("base", "d2", 8, model, [opt], {})
    directory = base_dir / "checkpoints/base/d2"
    assert (directory / "model_000008.safetensors").exists() and (directory / "optim_000008_rank0.pt").exists()
    assert checkpoint.find_last_step(directory) is None
    checkpoint.save_checkpoint("base", "d2", 8, model, [opt], {})
    assert json.loads((directory / "meta_000008.json").read_text())["step"] == 8


def save_gpt(base_dir, stage="base", tag="d2", step=5, vocab_size=265):
    from dataclasses import asdict
    from model import GPT, config_from_depth
    from tokenizer import Tokenizer, save_token_bytes

    tok = Tokenizer({bytes([b]): b for b in range(256)})  # bytes only: 256 + 9 specials = 265
    tok.save(base_dir / "tokenizer")
    save_token_bytes(tok, base_dir / "tokenizer")
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, vocab_size, sequence_len=32, aspect_ratio=16, head_dim=16))
    model.init_weights()
    with torch.no_grad():  # make the zero-initialised projections non-trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizers = model.setup_optimizers()
    meta = {"model_config": asdict(model.config), "tokenizer": tok.fingerprint()}
    checkpoint.save_checkpoint(stage, tag, step, model, optimizers, meta)
    return model


def test_load_model_rebuilds_the_same_gpt(base_dir):
    model = save_gpt(base_dir, stage="mid")
    loaded, tokenizer, meta = checkpoint.load_model("mid", "cpu")
    assert meta["step"] == 5 and not loaded.training and tokenizer.get_vocab_size() == 265
    x = torch.randint(0, 265, (2, 16))
    assert torch.equal(model(x), loaded(x))
    _, optim_states, _ = checkpoint.load_checkpoint("mid", None, None, "cpu", load_optimizer=True)
    assert len(optim_states) == len(model.setup_optimizers())  # Muon + AdamW states load weights-only
    assert checkpoint.load_model("mid", "cpu", phase="train")[0].training
    model_state, _, meta = checkpoint.load_checkpoint("mid", None, None, "cpu")
    meta["model_config"]["n_layer"] = 3
    with pytest.raises(UserError, match="does not fit"):
        checkpoint.build_model(meta, "cpu", model_state)


def test_load_model_with_another_tokenizer_is_a_clear_error(base_dir):
    from tokenizer import Tokenizer

    save_gpt(base_dir)
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\x00"], ranks[b"\x01"] = 1, 0  # same size, other ranks
    Tokenizer(ranks).save(base_dir / "tokenizer")
    with pytest.raises(UserError, match="trained with another tokenizer"):
        checkpoint.load_model("base", "cpu")
    save_gpt(base_dir, vocab_size=200)  # a bigger tokenizer than the model's vocab
    with pytest.raises(UserError, match="trained with another tokenizer"):
        checkpoint.load_model("base", "cpu")


def test_tokenizer_train_keeps_the_tokenizer_checkpoints_use(base_dir):
    import tokenizer.train

    save_gpt(base_dir)  # a base checkpoint that records its tokenizer's fingerprint
    (base_dir / "text").mkdir()
    (base_dir / "text" / "a.txt").write_text(" ".join(f"word{i % 97} thing{i % 13}" for i in range(3000)))
    flags = ["--data", str(base_dir / "text"), "--vocab-size", "300"]
    with pytest.raises(UserError, match="checkpoints base/d2 were trained with"):
        tokenizer.train.main(flags)
    with pytest.raises(UserError, match="--vocab-size 100,000,000 is more than"):
        tokenizer.train.main(flags[:3] + ["100000000", "--force"])
    tokenizer.train.main(flags + ["--force"])
    with pytest.raises(UserError, match="another tokenizer"):
        checkpoint.load_model("base", "cpu")
