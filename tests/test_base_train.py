"""base_train.py: schedules, bits-per-byte, and tiny real runs on CPU (stdlib-docs):
exact resume, validation bpb going down, clear errors, the report section."""

import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import base_train
import checkpoint
from common import UserError

REPO = Path(__file__).resolve().parents[1]
# a ~100k-parameter model: 2 layers of width 64 (4 heads of 16), 64-token context, 2 x 2 rows per step
TINY = ["--device", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64",
        "--device-batch-size", "2", "--total-batch-size", "256", "--eval-tokens", "1024", "--sample-every", "-1",
        "--run", "dummy"]



# ---------------------------------------------------------------------------
# Pure functions


def test_lr_schedule():
    lrm = lambda s: base_train.lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.0)
    assert lrm(0) == pytest.approx(0.1) and lrm(9) == pytest.approx(1.0)
    assert lrm(10) == lrm(50) == lrm(80) == 1.0
    assert lrm(90) == pytest.approx(0.5) and lrm(99) == pytest.approx(0.05)
    assert base_train.lr_multiplier(99, 100, 0.0, 0.2, final_lr_frac=0.1) == pytest.approx(0.05 + 0.95 * 0.1)
    assert base_train.lr_multiplier(0, 100, 0.0, 0.2, 0.0) == 1.0  # no warmup by default
    assert base_train.lr_multiplier(5, 10, 0.0, 0.0, 0.0) == 1.0  # no warmdown: constant


def test_muon_momentum_warmup():
    assert base_train.muon_momentum(0) == pytest.approx(0.85)
    assert base_train.muon_momentum(150) == pytest.approx(0.90)
    assert base_train.muon_momentum(300) == base_train.muon_momentum(5000) == pytest.approx(0.95)


def test_batch_derivation_and_divisibility_error():
    def derive(args, world_size):
        return base_train.derive_batch(args.device_batch_size, args.max_seq_len, args.total_batch_size, world_size)

    args = base_train.get_args(["--device-batch-size", "4", "--max-seq-len", "128", "--total-batch-size", "2048"])
    assert derive(args, world_size=2) == (2048, 2)
    args = base_train.get_args(["--device-batch-size", "4", "--max-seq-len", "128", "--total-batch-size", "-1"])
    assert derive(args, world_size=3) == (1536, 1)
    args = base_train.get_args(["--device-batch-size", "3", "--max-seq-len", "100", "--total-batch-size", "1000"])
    with pytest.raises(UserError, match="not a multiple of device batch x seq len x processes"):
        derive(args, world_size=1)
    # the d20 defaults: 32 x 2048 x 8 GPUs = 524288, no accumulation
    assert derive(base_train.get_args([]), world_size=8) == (524288, 1)


def test_horizon_from_param_data_ratio():
    args = base_train.get_args(["--target-param-data-ratio", "20"])
    assert base_train.derive_num_iterations(args, num_params=1_000_000, total_batch_size=1000) == 20_000
    args = base_train.get_args(["--num-iterations", "7"])
    assert base_train.derive_num_iterations(args, num_params=1_000_000, total_batch_size=1000) == 7


@pytest.mark.parametrize("flags, match", [
    (["--num-iterations", "-5"], "--num-iterations must be positive or -1, got -5"),  # not silently derived
    (["--num-iterations", "0"], "--num-iterations must be positive or -1, got 0"),
    (["--total-batch-size", "0"], "--total-batch-size must be positive or -1, got 0"),
    (["--keep-last", "0"], "--keep-last must be positive or -1, got 0"),
    (["--resume-step", "-3"], "--resume-step must be >= 0, or -1 for the latest, got -3"),
    (["--eval-tokens", "0"], "--eval-tokens must be positive, got 0"),
    (["--matrix-lr", "-1"], "--matrix-lr must be >= 0, got -1.0"),
    (["--embedding-lr", "nan"], "--embedding-lr must be >= 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be between 0 and 1, got 1.5"),
    (["--final-lr-frac", "-1"], "--final-lr-frac must be between 0 and 1, got -1.0"),
])
def test_bad_flags_are_refused(flags, match):
    with pytest.raises(UserError, match=re.escape(match)):
        base_train.get_args(flags)


def test_devices_are_checked_before_anything_runs(monkeypatch):
    from common import compute_init

    with pytest.raises(UserError, match=r"^--device 'tpu' is not a device: use cuda, cpu or mps$"):
        compute_init("tpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="under torchrun each process takes the GPU of its LOCAL_RANK"):
        compute_init("cpu:1")  # a device index under torchrun (a CUDA one alike) would be ignored


def test_flag_sentinels_and_zero_learning_rate_are_accepted():
    args = base_train.get_args(["--num-iterations", "-1", "--keep-last", "-1", "--total-batch-size", "-1",
                                "--embedding-lr", "0", "--warmdown-ratio", "1"])  # lr 0 freezes the embedding
    assert args.num_iterations == -1 and args.embedding_lr == 0


def test_eval_tokens_default_is_small_off_cuda():
    assert base_train.get_args([]).eval_tokens is None  # resolved per device in train()
    assert base_train.default_eval_tokens("cuda") == 20 * base_train.D20_TOTAL_BATCH_SIZE
    assert base_train.default_eval_tokens("cpu") == 32768  # not minutes of silent validation on a CPU


class FixedLossModel:
    """Returns given per-position losses, like GPT(..., loss_reduction="none")."""

    def __init__(self, losses):
        self.losses = losses

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.losses


def test_evaluate_bpb_skips_special_and_masked_targets():
    token_bytes = torch.tensor([0, 1, 2, 3])  # token 0 is a special token
    y = torch.tensor([[1, 2, 0, -1], [3, 3, 1, 2]])
    losses = torch.tensor([[1.0, 2.0, 50.0, 0.0], [3.0, 3.0, 1.0, 2.0]])
    batches = itertools.repeat((torch.zeros_like(y), y))
    bpb = base_train.evaluate_bpb(FixedLossModel(losses), batches, 3, token_bytes)
    nats, nbytes = 3 * (1 + 2 + 3 + 3 + 1 + 2), 3 * (1 + 2 + 3 + 3 + 1 + 2)
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes))
    assert bpb == pytest.approx(1 / math.log(2))
    # a real byte-weighting check: same nats, more bytes -> fewer bits per byte
    bpb2 = base_train.evaluate_bpb(FixedLossModel(losses), batches, 3, token_bytes * 2)
    assert bpb2 == pytest.approx(bpb / 2)


def test_peak_flops_is_none_on_cpu():
    assert base_train.peak_flops(torch.device("cpu"), torch.float32) is None


def test_training_refuses_float16(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "bfloat16")
    assert base_train.training_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("SPEEDCHAT_DTYPE", "float16")  # no GradScaler: fp16 gradients would underflow
    with pytest.raises(UserError, match="bfloat16 or float32, not float16"):
        base_train.main(TINY + ["--num-iterations", "1"])


def _global_mean_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        means = [base_train.global_mean(torch.tensor(values[rank])).item() for values in ([1.0, 4.0], [1.0, math.nan])]
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(means))
    finally:
        dist.destroy_process_group()


def test_global_mean_is_the_same_on_every_rank(tmp_path):
    assert base_train.global_mean(torch.tensor(3.0)).item() == 3.0  # not distributed: the value itself
    torch.multiprocessing.spawn(_global_mean_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        mean, with_nan = json.loads((tmp_path / f"{rank}.json").read_text())
        assert mean == 2.5 and math.isnan(with_nan), rank  # a NaN on one rank stops every rank


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "base_train", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--depth", "--resume", "--total-batch-size", "--target-param-data-ratio", "--eval-every"):
        assert flag in out.stdout
    text = " ".join(out.stdout.split())  # undo argparse's line wrapping
    for flag, default in (("--weight-decay", "0.0"), ("--warmup-ratio", "0.0"), ("--final-lr-frac", "0.0")):
        assert re.search(rf"{flag} \S+ [^-]*\(default: {re.escape(default)}\)", text), flag
    assert "(default: 10485760 on CUDA, 32768 otherwise)" in text
    assert "(default: None)" not in text and "(default: )" not in text


# ---------------------------------------------------------------------------
# Tiny real runs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """stdlib-docs shards and a ~512-token tokenizer, built once for the module."""
    import dataset
    from tokenizer import Tokenizer, save_token_bytes

    root = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_BASE_DIR", str(root))
        dataset.ensure_source("stdlib-docs")
        docs = itertools.islice(dataset.iter_documents("stdlib-docs", "train"), 1000)
        tok = Tokenizer.train_from_iterator(docs, 512)
        tok.save(root / "tokenizer")
        save_token_bytes(tok, root / "tokenizer")
    return root


@pytest.fixture
def base_dir(prepared, tmp_path, monkeypatch):
    for name in ("data", "tokenizer"):
        (tmp_path / name).symlink_to(prepared / name)
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def load_step(tag, step):
    model_state, optim_states, meta = checkpoint.load_checkpoint("base", tag, step, "cpu", load_optimizer=True)
    return model_state, optim_states, meta


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"differs at {where}: {a!r} != {b!r}"


def test_resume_is_bitwise_identical(base_dir):
    # 2 x 2 x 64 per micro-step and 256 tokens per step: gradient accumulation over 2 micro-steps
    flags = TINY + ["--num-iterations", "8", "--save-every", "4", "--eval-every", "4", "--keep-last", "-1",
                    "--model-tag", "r"]
    base_train.main(flags)  # uninterrupted: saves steps 4 and 8
    straight_model, straight_optim, straight_meta = load_step("r", 8)
    assert checkpoint.list_steps(checkpoint.checkpoint_dir("base", "r")) == [4, 8]

    # as if the run had died right after step 4: continue from there
    base_train.main(flags + ["--resume", "--resume-step", "4"])
    resumed_model, resumed_optim, resumed_meta = load_step("r", 8)

    assert_same_tensors(straight_model, resumed_model, "model")
    assert_same_tensors(straight_optim, resumed_optim, "optimizer")
    for key in ("loss", "val_bpb", "dataloader_state", "loop_state"):
        loop_a, loop_b = straight_meta[key], resumed_meta[key]
        if key == "loop_state":  # wall-clock time differs, nothing else may
            loop_a, loop_b = dict(loop_a, training_time=0), dict(loop_b, training_time=0)
        assert loop_a == loop_b, key
    assert len(straight_meta["loop_state"]["curve"]["loss"]) == 8
    # training actually moved the weights (else equality would prove nothing)
    first, _, _ = load_step("r", 4)
    assert not torch.equal(first["blocks.0.attn.c_q.weight"], straight_model["blocks.0.attn.c_q.weight"])


def test_tiny_run_lowers_validation_bpb_and_writes_report(base_dir):
    result = base_train.main(TINY + ["--num-iterations", "40", "--eval-every", "20", "--save-every", "-1",
                                     "--total-batch-size", "512", "--device-batch-size", "4"])
    val = result["curve"]["val_bpb"]
    assert result["curve"]["val_step"] == [0, 20, 40]
    assert val[-1] < val[0] - 0.5, val
    assert result["min_val_bpb"] == min(val)
    # the checkpoint at the end rebuilds the same model for the later stages
    model, tokenizer, meta = checkpoint.load_model("base", "cpu")
    assert meta["step"] == 40 and meta["tag"] == "d2" and meta["source"] == "stdlib-docs"
    assert meta["model_config"]["n_embd"] == 64 and meta["model_config"]["n_head"] == 4
    # the report section and its curve data
    section = (base_dir / "report" / "base-train.md").read_text()
    assert "min validation bpb" in section and "parameters" in section and "MFU: n/a" in section
    data = json.loads((base_dir / "report" / "base-train.json").read_text())
    assert data["curve"]["val_bpb"] == val and len(data["curve"]["loss"]) == 40
    assert data["curve"]["loss"][-1] < data["curve"]["loss"][0]


def test_resume_without_checkpoint_is_a_clear_error(base_dir):
    with pytest.raises(UserError, match=r"--resume: no base checkpoint under .*d2"):
        base_train.main(TINY + ["--num-iterations", "2", "--resume"])


def test_resume_with_other_model_flags_is_a_clear_error(base_dir):
    base_train.main(TINY + ["--num-iterations", "2", "--eval-every", "-1"])
    with pytest.raises(UserError, match="different model"):
        base_train.main(TINY + ["--num-iterations", "4", "--resume", "--aspect-ratio", "64", "--model-tag", "d2"])


def test_fresh_run_replaces_stale_checkpoints(base_dir):
    base_train.main(TINY + ["--num-iterations", "4", "--save-every", "2", "--keep-last", "-1", "--eval-every", "-1"])
    directory = checkpoint.checkpoint_dir("base", "d2")
    assert checkpoint.list_steps(directory) == [2, 4]
    base_train.main(TINY + ["--num-iterations", "1", "--eval-every", "-1"])
    assert checkpoint.list_steps(directory) == [1]  # not a mix of two runs


def test_loss_check_uses_the_mean_over_ranks(base_dir, monkeypatch):
    # as if another rank's loss were NaN: this rank's own loss is fine, yet it must stop too
    monkeypatch.setattr(base_train, "global_mean", lambda value: value * math.nan)
    with pytest.raises(UserError, match="the loss became nan at step 1"):
        base_train.main(TINY + ["--num-iterations", "2", "--eval-every", "-1", "--save-every", "-1"])


def test_bad_batch_flags_are_a_clear_error(base_dir):
    with pytest.raises(UserError, match="--total-batch-size 100 is not a multiple"):
        base_train.main(TINY + ["--total-batch-size", "100", "--num-iterations", "1"])


# ---------------------------------------------------------------------------
# CUDA only (run by bench/gpu_check.sh on a GPU machine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8, compiled", [(False, False), (True, False), (False, True)],
                         ids=["bf16", "fp8", "bf16-compiled"])
def test_cuda_training_step_has_no_host_sync(fp8, compiled):
    """Forward, backward and both optimizers queue their kernels without waiting for the GPU: with
    CUDA's sync debug mode set to "error", any .item(), host copy or data-dependent shape raises.
    Compiled as base_train runs it on CUDA too (the first step, which compiles, is not checked)."""
    from fp8 import convert_to_fp8, fp8_supported
    from model import GPT, config_from_depth

    if fp8 and not fp8_supported(torch.device("cuda"))[0]:
        pytest.skip(fp8_supported(torch.device("cuda"))[1])
    with torch.device("cuda"):
        model = GPT(config_from_depth(2, 512, sequence_len=64, aspect_ratio=64, head_dim=32))
    model.init_weights()
    if fp8:
        assert convert_to_fp8(model) > 0
    optimizers = model.setup_optimizers()
    step_model = torch.compile(model, dynamic=False) if compiled else model
    x, y = torch.randint(0, 512, (2, 4, 64), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(v) for v in torch.stack(losses).tolist())
