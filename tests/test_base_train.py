"""base_train.py and the training skeleton (training.py): schedules, the recipe's rules, flag ranges,
bits per byte, and tiny real runs on CPU (stdlib-docs): exact resume, the report, the errors users
hit, the device batch's out-of-memory back-off, a corpus read more than once, the frozen
garbage collector, a failing rank under torchrun."""

import gc
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import base_train
import checkpoint
import training
from common import UserError
from model import GPT, config_from_depth, pretraining_recipe
from test_plan import hand_scaling_params

REPO = Path(__file__).resolve().parents[1]

# a ~100k-parameter model: 2 layers of width 64 (4 heads of 16), 64-token context, 2 x 2 rows per step
TINY = ["--device", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
        "--device-batch-size", "2", "--total-batch-size", "256", "--eval-tokens", "1024", "--sample-every", "-1",
        "--run", "dummy"]


def test_schedules():
    lrm = lambda s: base_train.lr_multiplier(s, 1000)  # noqa: E731  (40 warmup steps, 65% warmdown to 5%)
    assert lrm(0) == pytest.approx(1 / 40) and lrm(19) == pytest.approx(0.5) and lrm(39) == lrm(350) == 1.0
    assert lrm(675) == pytest.approx(0.05 + 0.95 * 0.5) and lrm(999) == pytest.approx(0.05, abs=0.002)
    assert base_train.lr_multiplier(10, 20) == 11 / 40  # a short run: the lower of warmup and warmdown
    assert base_train.lr_multiplier(18, 20) == pytest.approx(0.05 + 0.95 * 2 / 13)
    # the chat stages: by progress 0 -> 1; warmdown 1 = linear decay from the start (SFT)
    assert training.lr_multiplier(0.5, 0.2) == 1.0 and training.lr_multiplier(0.9, 0.2) == pytest.approx(0.5)
    assert training.lr_multiplier(0.9, 0.2, final_lr_frac=0.1) == pytest.approx(0.55)
    assert training.lr_multiplier(0.25, 1.0) == pytest.approx(0.75) and training.lr_multiplier(0.99, 0.0) == 1.0
    assert training.muon_momentum(0) == pytest.approx(0.85) and training.muon_momentum(150) == pytest.approx(0.90)
    assert training.muon_momentum(300) == training.muon_momentum(5000) == pytest.approx(0.95)


def test_batch_and_recipe_rules_by_hand():
    assert training.derive_batch(4, 128, 2048, world_size=2) == (2048, 2)
    assert training.derive_batch(4, 128, -1, world_size=3) == (1536, 1)  # -1: one micro-batch, no accumulation
    with pytest.raises(UserError, match="not a multiple"):
        training.derive_batch(3, 100, 1000, world_size=1)
    with torch.device("meta"):  # the session's tiny model: 2 layers of width 64, vocab 512, 128-token rows
        model = GPT(config_from_depth(2, 512, sequence_len=128, aspect_ratio=32, head_dim=16))
    n, n_ref = hand_scaling_params(2, 512, width=64, head_dim=16), hand_scaling_params(12, 512)  # d12: 768 wide
    r = pretraining_recipe(model, 10.5)
    assert r["tokens"] == 10.5 * n and r["reference_tokens"] == 10.5 * n_ref
    assert r["total_batch_size"] == 2**15  # 2^19 x (n / n_ref)^0.383 = 2^15.42
    assert r["num_iterations"] == round(10.5 * n / 2**15) and r["lr_scale"] == 0.25  # sqrt(2^15 / 2^19)
    assert r["weight_decay"] == pytest.approx(0.28 * 0.25 * n_ref / n)
    r = pretraining_recipe(model, 10.5, total_batch_size=1000, tokens_per_micro_step=256, scale_lr=False)
    assert r["total_batch_size"] == 1024 and r["lr_scale"] == 1  # a given batch, rounded; the decay's timescale kept:
    assert r["weight_decay"] == pytest.approx(0.28 * 2**-9 * n_ref / n)  # lr x decay as with the rule


@pytest.mark.parametrize("flags", [["--num-iterations", "-5"], ["--total-batch-size", "0"], ["--keep-last", "0"],
                                   ["--resume-step", "-3"], ["--matrix-lr", "-1"], ["--embedding-lr", "nan"],
                                   ["--warmdown-ratio", "1.5"], ["--window-pattern", "SXL"], ["--depth", "0"]])
def test_out_of_range_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit):  # argparse: one "error: argument ..." line, exit 2
        base_train.get_args(flags)
    assert "error: argument " + flags[0] in capsys.readouterr().err


def test_sentinels_and_zero_learning_rate_are_accepted():
    args = base_train.get_args(["--", "--num-iterations", "-1", "--keep-last", "-1", "--total-batch-size", "-1",
                                "--embedding-lr", "0", "--warmdown-ratio", "1"])  # lr 0 freezes the embedding
    assert args.num_iterations == -1 and args.embedding_lr == 0 and args.eval_tokens is None


def test_evaluate_bpb_skips_special_and_masked_targets():
    token_bytes = torch.tensor([0, 1, 2, 3])  # token 0 is a special token
    y = torch.tensor([[1, 2, 0, -1], [3, 3, 1, 2]])
    losses = torch.tensor([[1.0, 2.0, 50.0, 7.0], [3.0, 3.0, 1.0, 2.0]])  # per position, as loss_reduction="none"
    model, batches = lambda x, y, loss_reduction: losses, itertools.repeat((torch.zeros_like(y), y))
    bpb = training.evaluate_bpb(model, batches, 3, token_bytes)
    assert bpb == pytest.approx(1 / math.log(2))  # nats = bytes for the scored targets
    assert training.evaluate_bpb(model, batches, 3, token_bytes * 2) == pytest.approx(bpb / 2)  # 2x bytes: half


def test_training_dtype(monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "bfloat16")
    assert training.training_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "float16")  # no GradScaler: fp16 gradients would underflow
    with pytest.raises(UserError, match="bfloat16 or float32"):
        training.training_dtype("cpu")


# ---------------------------------------------------------------------------
# Tiny real runs


def load_step(tag, step):
    return checkpoint.load_checkpoint("base", tag, step, "cpu", load_optimizer=True)


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, (dict, list, tuple)):
        assert len(a) == len(b) and (not isinstance(a, dict) or a.keys() == b.keys()), where
        for k in (a if isinstance(a, dict) else range(len(a))):
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, f"differs at {where}: {a!r} != {b!r}"


def test_resume_is_bitwise_identical(base_dir):
    # 2 x 2 x 64 per micro-step and 256 tokens per step: gradient accumulation over 2 micro-steps
    flags = TINY + ["--num-iterations", "8", "--save-every", "4", "--eval-every", "4", "--keep-last", "-1"]
    base_train.main(flags)  # uninterrupted: saves steps 4 and 8
    straight = load_step("d2", 8)
    base_train.main(flags + ["--resume", "--resume-step", "4"])  # as if it had died right after step 4
    resumed = load_step("d2", 8)
    assert_same(straight[:2], resumed[:2], "model and optimizers")
    for key in ("loss", "val_bpb", "rank_state"):
        assert_same(straight[2][key], resumed[2][key], key)
    loops = [dict(meta["loop_state"], training_time=0, seconds=0, timed_tokens=0) for meta in (straight[2], resumed[2])]
    assert loops[0] == loops[1] and len(loops[0]["curve"]["loss"]) == 8  # wall-clock time differs, nothing else
    # training moved the weights (else equality would prove nothing)
    assert not torch.equal(load_step("d2", 4)[0]["blocks.0.attn.c_q.weight"], straight[0]["blocks.0.attn.c_q.weight"])


def test_the_session_run_learned_and_reported(trained):
    data = json.loads((trained / "report" / "base-train.json").read_text())
    curve = data["curve"]
    assert curve["val_step"] == [0, 10, 20] and curve["val_bpb"][-1] < curve["val_bpb"][0] - 0.5, curve["val_bpb"]
    assert len(curve["loss"]) == 20 and curve["loss"][-1] < curve["loss"][0] - 1.0
    assert data["min_val_bpb"] == min(curve["val_bpb"]) and data["steps"] == data["num_iterations"] == 20
    section = (trained / "report" / "base-train.md").read_text()
    assert "- parameters: " in section and "- min val bpb: " in section and "- source: stdlib-docs" in section
    meta = json.loads((trained / "checkpoints" / "base" / "d2" / "meta_000020.json").read_text())
    assert meta["source"] == "stdlib-docs" and meta["model_config"]["n_embd"] == 64


def test_errors_users_hit(base_dir):
    with pytest.raises(UserError, match=r"--resume: no base checkpoint under .*d2"):
        base_train.main(TINY + ["--num-iterations", "2", "--resume"])
    base_train.main(TINY + ["--num-iterations", "4", "--save-every", "2", "--keep-last", "-1", "--eval-every", "-1"])
    with pytest.raises(UserError, match="--resume: .* trained with model_config"):
        base_train.main(TINY + ["--num-iterations", "6", "--resume", "--aspect-ratio", "64", "--model-tag", "d2"])
    # as if another rank's loss were NaN: this rank's own loss is fine, yet it must stop too
    with pytest.MonkeyPatch.context() as mp, pytest.raises(UserError, match="the loss became nan at step 1"):
        mp.setattr(training, "global_mean", lambda value: value * math.nan)
        base_train.main(TINY + ["--num-iterations", "2", "--eval-every", "-1", "--save-every", "-1"])
    # a fresh run replaces the stale checkpoints of the earlier run at its first save
    directory = checkpoint.checkpoint_dir("base", "d2")
    assert checkpoint.list_steps(directory) == [2, 4]
    base_train.main(TINY + ["--num-iterations", "1", "--eval-every", "-1"])
    assert checkpoint.list_steps(directory) == [1]  # not a mix of two runs


def test_a_small_gpu_and_a_small_corpus(base_dir, tmp_path, capsys, monkeypatch):
    """The device batch halves on out-of-memory; the data wraps, says so and the report counts its
    epochs; the garbage collector is frozen from the second step on and thawed at the end."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(8):  # ~8 x 100 tokens, a few of them for validation: 6 steps of 256 read the rest twice or more
        (texts / f"{i}.txt").write_text(f"Note {i}. " + "The river runs past the old mill and the bridge. " * 8)
    forward, frozen = GPT.forward, []

    def small_gpu(self, idx, *args, **kwargs):  # as if 2 rows did not fit in memory, 1 row did
        frozen.append(gc.get_freeze_count() > 0)
        if idx.size(0) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", small_gpu)
    base_train.main(TINY + ["--source", f"dir:{texts}", "--num-iterations", "6", "--eval-every", "-1"])
    meta = load_step("d2", 6)[2]
    assert (meta["device_batch_size"], meta["grad_accum_steps"], meta["total_batch_size"]) == (1, 4, 256)
    assert len(meta["loop_state"]["curve"]["loss"]) == 6
    # the probe at 2 rows (1 row is the floor: not probed) and step 1's 4 micro-steps run unfrozen, the rest frozen
    assert frozen[:5] == [False] * 5 and all(frozen[5:]) and len(frozen) > 5 and gc.get_freeze_count() == 0
    out = capsys.readouterr().out
    assert f"data: dir:{texts}: epoch 2 begins: its documents repeat" in out
    epochs = json.loads((base_dir / "report" / "base-train.json").read_text())["epochs"][f"dir:{texts}"]
    assert epochs > 2 and f"({epochs:.3f} epochs)" in out


FAILING_RANK = """
import os, sys, time
import torch
import base_train, training
from common import run_main

def main():
    with training.Run(base_train.get_args(sys.argv[1:]), "base", "d2"):
        if os.environ["RANK"] == "1":
            print(f"failing at {time.time()}", flush=True)
            raise RuntimeError("rank 1 lost its data")
        torch.distributed.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that never comes

run_main(main)
"""


def test_a_failing_rank_stops_every_rank_in_seconds(base_dir, tmp_path):
    (tmp_path / "failing_rank.py").write_text(FAILING_RANK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "failing_rank.py"), "--"] + TINY,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert result.returncode != 0 and "error: rank 1: RuntimeError: rank 1 lost its data" in result.stderr
    failed_at = float(result.stdout.split("failing at ")[1].split()[0])
    assert ended - failed_at < 15, ended - failed_at  # not the gloo/NCCL timeout (30/10 minutes)


# ---------------------------------------------------------------------------
# CUDA only (run by bench/gpu_check.sh on a GPU machine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8, compiled", [(False, False), (True, False), (False, True)],
                         ids=["bf16", "fp8", "bf16-compiled"])
def test_cuda_training_step_has_no_host_sync(fp8, compiled):
    """Forward, backward and both optimizers queue their kernels without waiting for the GPU: in CUDA's
    sync debug mode "error", any .item(), host copy or data-dependent shape raises (after a first step
    that creates the optimizer state and compiles)."""
    from fp8 import convert_to_fp8, fp8_supported

    if fp8 and not fp8_supported(torch.device("cuda"))[0]:
        pytest.skip(fp8_supported(torch.device("cuda"))[1])
    with torch.device("cuda"):
        model = GPT(config_from_depth(2, 512, sequence_len=64, aspect_ratio=64, head_dim=32))
    model.init_weights()
    assert not fp8 or convert_to_fp8(model) > 0
    optimizers, step_model = model.setup_optimizers(), torch.compile(model, dynamic=False) if compiled else model
    x, y = torch.randint(0, 512, (2, 4, 64), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = torch.stack([step() for _ in range(3)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses).all()
