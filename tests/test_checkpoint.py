"""checkpoint.py: save/load roundtrip, meta-last atomicity, clear errors on missing/corrupt files."""

import json

import pytest
import torch
import torch.nn as nn

import checkpoint
from common import UserError


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
    model, opt = tiny_model_and_optimizer()
    meta = {"model_config": {"n_layer": 2}, "loss": 1.5, "dataloader_state": {"shard": 3, "row": torch.tensor(7)}}
    checkpoint.save_checkpoint("base", "d2", 10, model, [opt], meta, rank_state={"rng": torch.get_rng_state()})

    model_state, optim_states, loaded = checkpoint.load_checkpoint("base", "d2", 10, "cpu", load_optimizer=True)
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    assert loaded["step"] == 10 and loaded["loss"] == 1.5 and loaded["tag"] == "d2"
    assert loaded["dataloader_state"] == {"shard": 3, "row": 7}  # tensors in meta become JSON numbers
    assert torch.equal(loaded["rank_state"]["rng"], torch.get_rng_state())

    # the optimizer state loads into a fresh optimizer and matches
    model2, _ = tiny_model_and_optimizer()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(optim_states[0])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])


def test_compile_prefixes_are_stripped():
    model, opt = tiny_model_and_optimizer()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    assert set(checkpoint.clean_state_dict(state)) == set(model.state_dict())
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule looks like to state_dict()
    checkpoint.save_checkpoint("base", "d2", 1, wrapped, [opt], {})
    model_state, _, _ = checkpoint.load_checkpoint("base", "d2", 1, "cpu")
    assert set(model_state) == set(model.state_dict())


def test_latest_step_and_tag_defaults(base_dir):
    model, opt = tiny_model_and_optimizer()
    for step in (5, 20, 100):
        checkpoint.save_checkpoint("base", "d2", step, model, [opt], {"model_config": {}})
    assert checkpoint.find_last_step(base_dir / "checkpoints/base/d2") == 100
    _, _, meta = checkpoint.load_checkpoint("base", None, None, "cpu")
    assert meta["step"] == 100 and meta["tag"] == "d2"
    _, _, meta = checkpoint.load_checkpoint("base", "d2", 20, "cpu")
    assert meta["step"] == 20
    with pytest.raises(UserError, match="no complete checkpoint for step 7"):
        checkpoint.load_checkpoint("base", "d2", 7, "cpu")


def test_step_without_meta_is_ignored(base_dir):
    model, opt = tiny_model_and_optimizer()
    checkpoint.save_checkpoint("mid", "d2", 10, model, [opt], {})
    directory = base_dir / "checkpoints/mid/d2"
    # a save killed after the weights but before the meta: step 20 must not count
    torch.save(model.state_dict(), directory / "model_000020.pt")
    torch.save({"optimizers": [], "rank_state": None}, directory / "optim_000020_rank0.pt")
    assert checkpoint.list_steps(directory) == [10]
    _, _, meta = checkpoint.load_checkpoint("mid", None, None, "cpu")
    assert meta["step"] == 10
    # and leftover temp files from atomic writes are not steps either
    (directory / ".meta_000030.json.abc.tmp").write_text("{}")
    assert checkpoint.find_last_step(directory) == 10


def test_truncated_model_file_is_a_clear_error(base_dir):
    model, opt = tiny_model_and_optimizer()
    checkpoint.save_checkpoint("base", "d2", 3, model, [opt], {})
    path = base_dir / "checkpoints/base/d2/model_000003.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is corrupt"):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu")


def test_corrupt_meta_and_optimizer_are_clear_errors(base_dir):
    model, opt = tiny_model_and_optimizer()
    checkpoint.save_checkpoint("base", "d2", 3, model, [opt], {})
    directory = base_dir / "checkpoints/base/d2"
    (directory / "optim_000003_rank0.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu", load_optimizer=True)
    with pytest.raises(UserError, match="optim_000003_rank1.pt is missing"):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu", rank=1, load_optimizer=True)
    (directory / "meta_000003.json").write_text('{"step": 3, "trunc')
    with pytest.raises(UserError, match="is corrupt"):
        checkpoint.load_checkpoint("base", "d2", 3, "cpu")


def test_missing_checkpoint_says_what_to_run():
    with pytest.raises(UserError, match=r"no base checkpoint under .*python -m base_train` first"):
        checkpoint.load_checkpoint("base", None, None, "cpu")
    with pytest.raises(UserError, match=r"no sft checkpoint under .*d4.*chat_sft"):
        checkpoint.load_checkpoint("sft", "d4", None, "cpu")
    with pytest.raises(UserError, match="unknown checkpoint stage"):
        checkpoint.load_checkpoint("pretrain", None, None, "cpu")


def test_keep_last_prunes_old_steps(base_dir):
    model, opt = tiny_model_and_optimizer()
    directory = base_dir / "checkpoints/base/d2"
    for step in (1, 2, 3, 4):
        if step == 3:  # the leftover shard of a save that died before its meta: pruned too
            (directory / "optim_000099_rank0.pt").write_bytes(b"partial")
        checkpoint.save_checkpoint("base", "d2", step, model, [opt], {}, keep_last=2)
    assert checkpoint.list_steps(directory) == [3, 4]
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta_000003.json", "meta_000004.json", "model_000003.pt", "model_000004.pt",
        "optim_000003_rank0.pt", "optim_000004_rank0.pt"]


def test_meta_is_written_last(monkeypatch, base_dir):
    """A crash while writing the meta (the last file) leaves no complete step."""
    model, opt = tiny_model_and_optimizer()
    real = checkpoint.atomic_write

    def crash(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint("base", "d2", 8, model, [opt], {})
    directory = base_dir / "checkpoints/base/d2"
    assert (directory / "model_000008.pt").exists() and (directory / "optim_000008_rank0.pt").exists()
    assert checkpoint.find_last_step(directory) is None
    monkeypatch.setattr(checkpoint, "atomic_write", real)
    checkpoint.save_checkpoint("base", "d2", 8, model, [opt], {})
    assert checkpoint.find_last_step(directory) == 8
    assert json.loads((directory / "meta_000008.json").read_text())["step"] == 8


def test_clear_checkpoints(base_dir):
    model, opt = tiny_model_and_optimizer()
    checkpoint.save_checkpoint("base", "d2", 1, model, [opt], {})
    directory = base_dir / "checkpoints/base/d2"
    checkpoint.clear_checkpoints(directory)
    assert checkpoint.list_steps(directory) == [] and not list(directory.glob("*.pt"))


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
    checkpoint.save_checkpoint(stage, tag, step, model, optimizers, {"model_config": asdict(model.config)})
    return model


def test_load_model_rebuilds_the_same_gpt(base_dir):
    model = save_gpt(base_dir, stage="mid")
    loaded, tokenizer, meta = checkpoint.load_model("mid", "cpu")
    assert meta["step"] == 5 and not loaded.training
    assert tokenizer.get_vocab_size() == 265
    x = torch.randint(0, 265, (2, 16))
    assert torch.equal(model(x), loaded(x))
    # build_model alone, from meta + a state dict with torch.compile's prefixes
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    rebuilt = checkpoint.build_model(meta, "cpu", state)
    assert torch.equal(model(x), rebuilt(x))
    train_model, _, _ = checkpoint.load_model("mid", "cpu", phase="train")
    assert train_model.training


def test_load_model_with_a_bigger_tokenizer_is_a_clear_error(base_dir):
    save_gpt(base_dir, vocab_size=200)  # a model trained with a smaller vocab than the tokenizer now on disk
    with pytest.raises(UserError, match="tokenizer .* has 265 tokens but the base model was trained for 200"):
        checkpoint.load_model("base", "cpu")


def test_state_dict_that_does_not_fit_its_config_is_a_clear_error(base_dir):
    save_gpt(base_dir)
    model_state, _, meta = checkpoint.load_checkpoint("base", None, None, "cpu")
    meta["model_config"]["n_layer"] = 3
    with pytest.raises(UserError, match="does not match its model config"):
        checkpoint.build_model(meta, "cpu", model_state)


def test_load_model_with_another_tokenizer_of_the_same_size_is_a_clear_error(base_dir):
    from tokenizer import Tokenizer

    save_gpt(base_dir)
    tok = Tokenizer.load(base_dir / "tokenizer")
    meta_path = next((base_dir / "checkpoints" / "base" / "d2").glob("meta_*.json"))
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = tok.fingerprint()  # what base_train records
    meta_path.write_text(json.dumps(meta))
    checkpoint.load_model("base", "cpu")  # the same tokenizer: fine
    # same size, other ranks: bytes 0 and 1 swapped
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\x00"], ranks[b"\x01"] = 1, 0
    other = Tokenizer(ranks)
    assert other.get_vocab_size() == tok.get_vocab_size() and other.fingerprint() != tok.fingerprint()
    other.save(base_dir / "tokenizer")
    with pytest.raises(UserError, match="trained with another tokenizer"):
        checkpoint.load_model("base", "cpu")
