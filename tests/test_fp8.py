"""fp8.py on CPU (torch._scaled_mm has a CPU kernel): the fp8 linear and its gradients against the
recipe and float32 at any magnitude, the conversion of a GPT, training with it, torch.compile, and
base_train --fp8 end to end."""

import pytest
import torch
import torch.nn as nn

import base_train
import checkpoint
import fp8
from fp8 import Float8Linear, convert_to_fp8, fp8_linear, fp8_supported
from test_base_train import TINY  # the base_dir fixture (stdlib-docs shards + tokenizer) is in conftest.py
from test_model import make_model, tiny_config

pytestmark = pytest.mark.skipif(not fp8_supported("cpu")[0], reason=f"no CPU fp8: {fp8_supported('cpu')[1]}")


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    """torch._scaled_mm's product in float32 (each fp8 x fp8 product is exact there). The CPU kernel
    is a slow reference (~0.16 s for a 128x64x256 product): the tests that train a GPT use this; the
    recipe test checks it against the same independent float64 computation as the real kernel."""
    return (a.float() @ b.float() * (scale_a * scale_b)).to(out_dtype)


@pytest.fixture
def fast_cpu_fp8(monkeypatch):
    monkeypatch.setattr(torch, "_scaled_mm", emulated_scaled_mm)


def rel_err(actual, expected):
    """Error relative to the reference's norm (per-element fp8 errors are ~5-10%; this averages them)."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def quantize(t, fmax, dtype):
    """The recipe, written out independently: scale amax to the format's max, saturate, cast, back to float64."""
    scale = fmax / t.abs().max().float()
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype).double() / scale.double()


@pytest.mark.parametrize("kernel", ["cpu", "emulated"])
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-4])  # fixed scaling would saturate at 448 or flush to zero
def test_follows_the_recipe_exactly_at_any_magnitude(scale, kernel, monkeypatch):
    """e4m3 (max 448) for x and W, e5m2 (max 57344) for grad_y, tensorwise amax scales, fp32
    accumulation and output: equal to float64 products of the quantized tensors up to fp32 rounding,
    and ~4-6% from float32."""
    if kernel == "emulated":
        monkeypatch.setattr(torch, "_scaled_mm", emulated_scaled_mm)
    gen = torch.Generator().manual_seed(3)
    layer = Float8Linear(64, 32, bias=False)
    nn.init.normal_(layer.weight, std=0.1, generator=gen)
    x = (torch.randn(40, 64, generator=gen) * scale).requires_grad_()  # 40 rows: padded to 48 inside
    grad_y = torch.randn(40, 32, generator=gen) * scale
    y = layer(x)
    y.backward(grad_y)
    xq = quantize(x.detach(), 448.0, torch.float8_e4m3fn)
    wq = quantize(layer.weight.detach(), 448.0, torch.float8_e4m3fn)
    gq = quantize(grad_y, 57344.0, torch.float8_e5m2)
    w, x64, g = layer.weight.detach().double(), x.detach().double(), grad_y.double()
    for actual, expected, exact in ((y, xq @ wq.T, x64 @ w.T), (x.grad, gq @ wq, g @ w),
                                    (layer.weight.grad, gq.T @ xq, g.T @ x64)):
        assert actual.dtype == torch.float32 and rel_err(actual, expected) < 1e-6  # bf16 anywhere: ~1e-3
        assert 0.005 < rel_err(actual, exact) < 0.08  # it is fp8: e4m3 ~3.7%, through e5m2 ~6%


def test_zero_inputs_autocast_dtypes_and_the_cuda_layout():
    layer = Float8Linear(32, 16, bias=False)
    x = torch.zeros(16, 32, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn(16, 16))  # all-zero x: zeros, not the NaN of 0/0 scales
    assert torch.equal(y, torch.zeros(16, 16)) and torch.equal(layer.weight.grad, torch.zeros(16, 32))
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # W is not zero: grad x is not either
    layer = Float8Linear(32, 48, bias=True)
    x = torch.randn(4, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == layer.weight.grad.dtype == torch.float32  # fp32 masters
    a, one = torch.randn(32, 16).to(fp8.E4M3), torch.ones(())
    assert fp8.scaled_mm(a, a.t(), one, one, torch.float32).shape == (32, 32)
    for first, second in ((a, a.t().contiguous()), (a.t(), a), (torch.randn(32, 24).to(fp8.E4M3), a[:, :8].t())):
        with pytest.raises(AssertionError):  # a row-major second operand, a column-major first, K = 24
            fp8.scaled_mm(first, second, one, one, torch.float32)


def test_fp8_supported_needs_compute_capability_8_9(monkeypatch):
    assert fp8_supported("cpu")[0] and not fp8_supported("meta")[0]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    ok, reason = fp8_supported(torch.device("cuda"))
    assert not ok and "8.9" in reason


# ---------------------------------------------------------------------------
# A GPT with fp8 blocks

VOCAB = 256


def tiny_gpt(**overrides):
    """2 layers of width 64 (4 heads of 16): every block matrix is a multiple of 16."""
    return make_model(tiny_config(**dict(sequence_len=32, vocab_size=VOCAB, n_kv_head=4) | overrides))


def test_convert_to_fp8_swaps_the_block_linears_only():
    model, plain = tiny_gpt(), tiny_gpt()
    params = dict(model.named_parameters())
    assert convert_to_fp8(model) == 2 * 6  # per block: q, k, v, proj, fc, mlp proj
    assert all(type(getattr(b.attn, n)) is Float8Linear for b in model.blocks for n in ("c_q", "c_k", "c_v", "c_proj"))
    assert all(type(b.mlp.c_fc) is type(b.mlp.c_proj) is Float8Linear for b in model.blocks)
    assert type(model.lm_head) is nn.Linear and type(model.wte) is nn.Embedding
    assert type(model.blocks[1].attn.ve_gate) is nn.Linear and type(model.smear_gate) is nn.Linear  # 12, 24 inputs
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameter objects
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict(), strict=True)  # an fp8 run's checkpoint loads into a plain GPT
    assert convert_to_fp8(model) == 0  # already converted
    # width 40 (5 heads of 8): no block matrix is a multiple of 16, nothing is converted
    assert convert_to_fp8(tiny_gpt(n_embd=40, n_head=5, n_kv_head=5)) == 0


def train(model, optimizers, steps, x, y):
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def batch(seed=1, rows=4, T=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, rows, T), generator=gen).unbind(0)


def test_tiny_gpt_learns_with_fp8_like_float32_with_optimizers_built_before_conversion(fast_cpu_fp8):
    x, y = batch()
    reference = tiny_gpt()
    ref_losses = train(reference, reference.setup_optimizers(), 10, x, y)
    model = tiny_gpt()
    optimizers = model.setup_optimizers()
    convert_to_fp8(model)  # the optimizers hold the same Parameter objects
    before = {name: p.detach().clone() for name, p in model.blocks.named_parameters()}
    losses = train(model, optimizers, 10, x, y)
    assert all(not torch.equal(before[name], p) for name, p in model.blocks.named_parameters()), "a weight is stuck"
    assert losses[0] == pytest.approx(ref_losses[0], abs=1e-3)  # same init (zero output projections)
    assert ref_losses[-1] < ref_losses[0] - 2.0, ref_losses  # the repeated batch is being memorised
    assert losses[-1] < losses[0] - 2.0, losses
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.15), (losses[-1], ref_losses[-1])
    assert losses != ref_losses  # the fp8 model did compute differently


def test_compiled_gpt_matches_eager(fast_cpu_fp8):
    """fullgraph: Float8Linear traces without graph breaks, and dynamo with autograd's partitioning
    (aot_eager) computes what eager does (inductor's fp8 kernels: the CUDA test below)."""
    model = tiny_gpt()
    convert_to_fp8(model)
    for block in model.blocks:  # else q, k, v and fc get zero gradients and the comparison proves less
        nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    nn.init.constant_(model.smear_lambda, 0.5)  # (and the smear gate)
    x, y = batch()
    model(x, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(x, y).backward()
    for name, p in model.named_parameters():
        assert grads[name].abs().sum() > 0 and torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------------------
# base_train --fp8


def test_base_train_fp8_end_to_end_and_resume(base_dir, monkeypatch, fast_cpu_fp8):
    calls = []
    monkeypatch.setattr(fp8, "fp8_linear", lambda *args: calls.append(args[1].shape) or fp8_linear(*args))
    flags = TINY + ["--fp8", "--eval-every", "-1", "--save-every", "-1"]
    assert base_train.main(flags + ["--num-iterations", "2"])["step"] == 2
    assert len(calls) >= 2 * 2 * 12  # 2 steps x 2 micro-steps x 12 layers (+ the final eval)
    assert (256, 64) in calls and (64, 256) in calls  # MLP in and out: the widest block matrices
    assert "fp8: on" in (base_dir / "report" / "base-train.md").read_text()
    model, _, meta = checkpoint.load_model("base", "cpu")  # a plain GPT loads the fp8 run's weights
    assert meta["train_config"]["fp8"] is True and type(model.blocks[0].attn.c_q) is nn.Linear
    calls.clear()  # resumed with the same flag: from step 2, in fp8 again
    assert base_train.main(flags + ["--num-iterations", "3", "--resume"])["step"] == 3
    assert len(calls) >= 2 * 12 and (256, 64) in calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported("cuda")[0],
                    reason="needs a CUDA GPU of compute capability 8.9+")
def test_cuda_fp8_linear_eager_and_compiled_match_float32():
    """CUDA's own _scaled_mm kernels (fast accumulation forward, float32 weight gradient, padded
    rows: 120 is not a multiple of 16) under bf16 autocast, eager and through inductor, against
    a float32 reference."""
    torch.manual_seed(0)
    reference = nn.Linear(256, 512, bias=False, device="cuda")
    layer = Float8Linear(256, 512, bias=False, device="cuda")
    layer.weight.data.copy_(reference.weight.data)
    x, grad_y = torch.randn(4, 30, 256, device="cuda"), torch.randn(4, 30, 512, device="cuda")
    results = {}
    for name, module, autocast in (("ref", reference, False), ("eager", layer, True),
                                   ("compiled", torch.compile(layer, fullgraph=True), True)):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = module(xi)
        y.backward(grad_y.to(y.dtype))
        results[name] = (y, xi.grad, module.weight.grad)
    for name in ("eager", "compiled"):
        y, gx, gw = results[name]
        assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32, name
        errors = [rel_err(a, b) for a, b in zip(results[name], results["ref"])]
        assert errors[0] < 0.06 and errors[1] < 0.1 and errors[2] < 0.1, (name, errors)
    assert all(rel_err(a, b) < 0.02 for a, b in zip(results["compiled"], results["eager"]))
