import itertools

import pytest
import torch

# Tests use tiny models: one intra-op thread is much faster than two fighting over a busy
# 2-core machine. This holds for every test in this process; subprocesses set their own.
torch.set_num_threads(1)

# the session's tiny GPT: 2 layers of width 64 (4 heads of 16), a 128-token context
TINY_MODEL = ["--device", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "128"]
CHAT = ["--device", "cpu", "--preset", "offline", "--max-seq-len", "128", "--eval-every", "-1"]


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=""):
    # torch.testing.assert_close's first call costs seconds of imports; this is all we need
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{msg} max abs diff {err:.3g}"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One base dir for the whole test session, made by the real stages: the stdlib-docs shards (built
    where test_dataset.py builds them), a 512-token tokenizer, and a tiny model trained as base "d2"
    (20 steps), then mid (12 steps) and sft (6 steps), with their report sections. Read it; write into
    a `base_dir`."""
    import base_train
    import chat_sft
    import dataset
    import mid_train
    from tokenizer import Tokenizer, save_token_bytes

    root, stdlib = tmp_path_factory.mktemp("trained"), tmp_path_factory.getbasetemp() / "stdlib-docs-base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_BASE_DIR", str(stdlib))
        dataset.ensure_source("stdlib-docs")
        (root / "data").symlink_to(stdlib / "data")
        mp.setenv("SPEEDCHAT_BASE_DIR", str(root))
        tok = Tokenizer.train_from_iterator(itertools.islice(dataset.iter_documents("stdlib-docs", "train"), 1000), 512)
        tok.save(root / "tokenizer")
        save_token_bytes(tok, root / "tokenizer")
        base_train.main(TINY_MODEL + ["--device-batch-size", "4", "--total-batch-size", "1024", "--num-iterations",
                                      "20", "--eval-every", "10", "--eval-tokens", "2048", "--sample-every", "-1"])
        mid_train.main(CHAT + ["--device-batch-size", "4", "--total-batch-size", "1024", "--num-iterations", "12",
                               "--eval-every", "6", "--eval-tokens", "2048"])
        chat_sft.main(CHAT + ["--device-batch-size", "4", "--examples-per-step", "8", "--num-iterations", "6",
                              "--eval-examples", "32"])
    return root


def link_base_dir(trained, tmp_path, monkeypatch, checkpoints=()):
    """A fresh base dir at tmp_path with the session's data and tokenizer, and the given stages'
    checkpoints, linked in: what a test writes there stays its own."""
    for name in ("data", "tokenizer"):
        (tmp_path / name).symlink_to(trained / name)
    for stage in checkpoints:
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / stage).symlink_to(trained / "checkpoints" / stage)
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def base_dir(trained, tmp_path, monkeypatch):
    """A fresh base dir with the session's stdlib-docs shards and tokenizer (no checkpoints)."""
    return link_base_dir(trained, tmp_path, monkeypatch)


@pytest.fixture
def chat_dir(trained, tmp_path, monkeypatch):
    """A fresh base dir with the session's shards, tokenizer and base checkpoint d2 (read-only)."""
    return link_base_dir(trained, tmp_path, monkeypatch, checkpoints=["base"])
