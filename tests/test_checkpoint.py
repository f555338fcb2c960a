"""checkpoint.py: save/load roundtrip, meta-last atomicity, loading that never runs code, the
one-run-per-folder lock, tags that stay inside the base dir, and clear errors on bad files."""

import json
import multiprocessing
import os
import random
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

import checkpoint
from common import UserError
from model import GPT, config_from_depth
from tokenizer import Tokenizer, save_token_bytes


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def saved(base_dir):
    """A tiny model and AdamW (with state), saved as base d2 step 3; (model, optimizer, folder)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    checkpoint.save_checkpoint("base", "d2", 3, model, [opt], {"model_config": {}})
    return model, opt, base_dir / "checkpoints/base/d2"


def test_roundtrip_model_optimizer_meta_and_rank_state(saved):
    model, opt, _ = saved
    meta = {"model_config": {"n_layer": 2}, "loss": 1.5, "dataloader_state": {"shard": 3, "row": torch.tensor(7)}}
    rank_state = {"rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "batches": [1, (2, 3)]}
    checkpoint.save_checkpoint("base", "d2", 10, model, [opt], meta, rank_state=rank_state)
    model_state, optim_states, loaded = checkpoint.load_checkpoint("base", "d2", 10, "cpu", load_optimizer=True)
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    assert loaded["step"] == 10 and loaded["loss"] == 1.5 and loaded["tag"] == "d2"
    assert loaded["dataloader_state"] == {"shard": 3, "row": 7}  # tensors in meta become JSON numbers
    assert loaded["rank_state"]["rng"]["python"] == random.getstate()
    assert torch.equal(loaded["rank_state"]["rng"]["torch"], torch.get_rng_state())
    s1, s2 = opt.state_dict()["state"], optim_states[0]["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule looks like to state_dict()
    checkpoint.save_checkpoint("base", "d2", 11, wrapped, [opt], {})
    assert set(checkpoint.load_checkpoint("base", "d2", 11, "cpu")[0]) == set(model.state_dict())


def test_a_step_is_complete_once_its_meta_is_written(saved, monkeypatch):
    """The meta is written last: a save that dies while writing it, or an atomic write's leftover,
    is no step; loading takes the latest complete one."""
    model, opt, directory = saved
    checkpoint.save_checkpoint("base", "d2", 20, model, [opt], {"model_config": {}})

    def crash(path, data):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "atomic_write", crash)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_checkpoint("base", "d2", 30, model, [opt], {})
    assert (directory / "model_000030.safetensors").exists() and (directory / "optim_000030_rank0.pt").exists()
    (directory / ".meta_000040.json.abc.tmp").write_text("{}")
    assert checkpoint.list_steps(directory) == [3, 20] and checkpoint.find_last_step(directory) == 20
    meta = checkpoint.load_checkpoint("base", None, None, "cpu")[2]
    assert (meta["step"], meta["tag"]) == (20, "d2")
    assert checkpoint.load_checkpoint("base", "d2", 3, "cpu")[2]["step"] == 3
    for tag, step in (("d2", 30), ("other", None)):
        with pytest.raises(UserError):
            checkpoint.load_checkpoint("base", tag, step, "cpu")
    checkpoint.save_checkpoint("base", "d2", 30, model, [opt], {})
    assert checkpoint.find_last_step(directory) == 30


@pytest.mark.parametrize("name", ["meta_000003.json", "model_000003.safetensors", "optim_000003_rank0.pt",
                                  "optim_000003_rank1.pt"])  # rank 1's: resumed with another world size
def test_bad_files_are_user_errors(saved, name):
    path = saved[2] / name
    if path.exists():
        path.write_bytes(path.read_bytes()[:-100] if path.suffix != ".pt" else b"garbage")
    with pytest.raises(UserError, match=name):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu", rank=int(name.endswith("rank1.pt")), load_optimizer=True)


class Payload:
    """A pickle that creates `marker` when it is loaded: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_pickle_never_runs(saved, base_dir):
    model, _, directory = saved
    marker = base_dir / "pwned"
    torch.save({"optimizers": [Payload(marker)], "rank_state": None}, directory / "optim_000003_rank0.pt")
    with pytest.raises(UserError):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu", load_optimizer=True)
    # a folder of the old pickle format: refused with the command to convert it; converting runs nothing
    old = base_dir / "checkpoints/mid/d2"
    old.mkdir(parents=True)
    (old / "meta_000005.json").write_text("{}")
    torch.save({"w": Payload(marker)}, old / "model_000005.pt")
    with pytest.raises(UserError, match=f"python -m checkpoint --convert {old}"):
        checkpoint.load_checkpoint("mid", None, None, "cpu")
    with pytest.raises(UserError):
        checkpoint.convert(old)
    assert not marker.exists()
    torch.save(model.state_dict(), old / "model_000005.pt")  # an honest old checkpoint converts, then loads
    checkpoint.main(["--convert", str(old)])
    assert sorted(p.name for p in old.iterdir()) == ["meta_000005.json", "model_000005.safetensors"]
    assert torch.equal(checkpoint.load_checkpoint("mid", "d2", 5, "cpu")[0]["0.weight"], model[0].weight)


@pytest.mark.parametrize("tag", ["../../x", "/abs", "a/b", "..", ".hidden", ""])
def test_tags_stay_inside_the_base_dir(saved, tag):
    with pytest.raises(UserError):
        checkpoint.save_checkpoint("base", tag, 1, saved[0], [saved[1]], {})


def _hold_lock(held):
    checkpoint.acquire_lock("base", "d2")
    held.set()
    time.sleep(60)


def test_one_run_per_folder(base_dir):
    directory = base_dir / "checkpoints/base/d2"
    directory.mkdir(parents=True)
    (directory / ".lock").write_text("pid 999999999 on a killed run\n")  # stale: nobody holds it
    (directory / ".model_000010.safetensors.x1y2.tmp").write_bytes(b"half a write")
    fork = multiprocessing.get_context("fork")
    held = fork.Event()
    owner = fork.Process(target=_hold_lock, args=(held,))
    owner.start()
    try:
        assert held.wait(30)
        assert not list(directory.glob(".*.tmp"))  # the stale temp files are removed
        with pytest.raises(UserError, match=f"in use by pid {owner.pid} on "):
            checkpoint.acquire_lock("base", "d2")
    finally:
        owner.kill()
        owner.join()
    assert checkpoint.acquire_lock("base", "d2") == directory  # the dead run's lock is taken over
    assert (directory / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_keep_last_prune_and_clear(saved):
    model, opt, directory = saved
    (directory / "optim_000099_rank0.pt").write_bytes(b"partial")  # a save that died before its meta: pruned too
    for step in (4, 5, 6):
        checkpoint.save_checkpoint("base", "d2", step, model, [opt], {}, keep_last=2)
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta_000005.json", "meta_000006.json", "model_000005.safetensors", "model_000006.safetensors",
        "optim_000005_rank0.pt", "optim_000006_rank0.pt"]
    checkpoint.clear_checkpoints(directory)
    assert list(directory.iterdir()) == []


def save_gpt(base_dir, vocab_size=265, **meta):
    """A bytes-only tokenizer and a tiny GPT with every weight non-zero, saved as base d2 step 5."""
    tok = Tokenizer({bytes([b]): b for b in range(256)})  # bytes only: 256 + 9 specials = 265
    tok.save(base_dir / "tokenizer")
    save_token_bytes(tok, base_dir / "tokenizer")
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, vocab_size, sequence_len=32, aspect_ratio=16, head_dim=16))
    model.init_weights()
    with torch.no_grad():  # make the zero-initialised projections non-trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = {"model_config": asdict(model.config), "tokenizer": tok.fingerprint(), **meta}
    checkpoint.save_checkpoint("base", "d2", 5, model, model.setup_optimizers(), meta)
    return model


def test_load_model_rebuilds_the_same_gpt(base_dir):
    model = save_gpt(base_dir)
    loaded, tokenizer, meta = checkpoint.load_model("base", "cpu")
    assert meta["step"] == 5 and not loaded.training and tokenizer.get_vocab_size() == 265
    x = torch.randint(0, 265, (2, 16))
    assert torch.equal(model(x), loaded(x))
    _, optim_states, _ = checkpoint.load_checkpoint("base", None, None, "cpu", load_optimizer=True)
    assert len(optim_states) == len(model.setup_optimizers())  # Muon + AdamW states load weights-only
    assert checkpoint.load_model("base", "cpu", phase="train")[0].training
    model_state, _, meta = checkpoint.load_checkpoint("base", None, None, "cpu")
    meta["model_config"]["n_layer"] = 3
    with pytest.raises(UserError):
        checkpoint.build_model(meta, "cpu", model_state)


def test_a_checkpoint_refuses_another_tokenizer_and_tokenizer_train_keeps_its_own(base_dir):
    import tokenizer.train

    save_gpt(base_dir)
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\x00"], ranks[b"\x01"] = 1, 0  # same size, other ranks
    Tokenizer(ranks).save(base_dir / "tokenizer")
    with pytest.raises(UserError, match="another tokenizer"):
        checkpoint.load_model("base", "cpu")
    save_gpt(base_dir, vocab_size=200)  # a bigger tokenizer than the model's vocab
    with pytest.raises(UserError, match="another tokenizer"):
        checkpoint.load_model("base", "cpu")
    save_gpt(base_dir)  # tokenizer.train will not replace the tokenizer a checkpoint uses, unless forced
    (base_dir / "text").mkdir()
    (base_dir / "text" / "a.txt").write_text(" ".join(f"word{i % 97} thing{i % 13}" for i in range(3000)))
    flags = ["--data", str(base_dir / "text"), "--vocab-size", "300"]
    with pytest.raises(UserError, match="base/d2"):
        tokenizer.train.main(flags)
    tokenizer.train.main(flags + ["--force"])
    with pytest.raises(UserError, match="another tokenizer"):
        checkpoint.load_model("base", "cpu")
