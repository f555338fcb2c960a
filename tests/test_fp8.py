"""fp8.py on CPU (torch._scaled_mm has a CPU kernel): accuracy of the fp8 linear and its gradients
against float32, dynamic scaling at any magnitude, the conversion of a GPT, training with it,
torch.compile, and base_train --fp8 end to end."""

import json

import pytest
import torch
import torch.nn as nn

import base_train
import checkpoint
import fp8
from fp8 import Float8Linear, convert_to_fp8, fp8_linear, fp8_supported
from model import GPT, config_from_depth
# the stdlib-docs shards + tokenizer fixtures and the tiny base_train flags of the base_train tests
from test_base_train import TINY  # the base_dir fixture (stdlib-docs shards + tokenizer) is in conftest.py

pytestmark = pytest.mark.skipif(not fp8_supported("cpu")[0], reason=f"no CPU fp8: {fp8_supported('cpu')[1]}")


def rel_err(actual, expected):
    """Error relative to the reference's norm (per-element fp8 errors are ~5-10%; this averages them)."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def fp8_vs_reference(scale=1.0, rows=120, seed=0):
    """Forward and both gradients of a Float8Linear and of the same float32 nn.Linear on the same
    x (2, rows/2, 64) and upstream gradient, both multiplied by `scale`. rows=120 is not a multiple
    of 16: it takes the padded path."""
    gen = torch.Generator().manual_seed(seed)
    reference = nn.Linear(64, 96, bias=False)
    nn.init.normal_(reference.weight, std=0.1, generator=gen)
    layer = Float8Linear(64, 96, bias=False)
    layer.weight.data.copy_(reference.weight.data)
    x = torch.randn(2, rows // 2, 64, generator=gen) * scale
    grad_y = torch.randn(2, rows // 2, 96, generator=gen) * scale
    out = {}
    for name, module in (("fp8", layer), ("ref", reference)):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad_y)
        out[name] = (y.detach(), xi.grad, module.weight.grad)
    return out


def quantize(t, fmax, dtype):
    """The recipe, written out independently: scale amax to the format's max, saturate, cast, back to float64."""
    scale = fmax / t.abs().max().float()
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype).double() / scale.double()


def test_follows_the_recipe_exactly():
    """e4m3 (max 448) for x and W, e5m2 (max 57344) for grad_y, tensorwise amax scales, fp32
    accumulation and output: equal to float64 products of the quantized tensors up to fp32 rounding."""
    gen = torch.Generator().manual_seed(3)
    layer = Float8Linear(64, 32, bias=False)
    x = torch.randn(40, 64, generator=gen, requires_grad=True)  # 40 rows: padded to 48 inside
    grad_y = torch.randn(40, 32, generator=gen)
    y = layer(x)
    y.backward(grad_y)
    xq = quantize(x.detach(), 448.0, torch.float8_e4m3fn)
    wq = quantize(layer.weight.detach(), 448.0, torch.float8_e4m3fn)
    gq = quantize(grad_y, 57344.0, torch.float8_e5m2)
    for actual, expected in ((y, xq @ wq.T), (x.grad, gq @ wq), (layer.weight.grad, gq.T @ xq)):
        assert rel_err(actual, expected) < 1e-6  # bf16 anywhere would be ~1e-3, a wrong format ~1e-2


def test_close_to_float32_with_the_same_precision_at_any_magnitude():
    base = fp8_vs_reference(1.0)
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = base["fp8"], base["ref"]
    assert y.dtype == gx.dtype == gw.dtype == torch.float32 and y.shape == y_ref.shape == (2, 60, 96)
    errors = [rel_err(y, y_ref), rel_err(gx, gx_ref), rel_err(gw, gw_ref)]
    # e4m3 forward ~3.7%; the gradients go through e5m2 (2 mantissa bits) ~6%; float32 would be ~1e-7
    assert errors[0] < 0.05 and errors[1] < 0.08 and errors[2] < 0.08 and min(errors) > 0.005, errors
    for scale in (1e4, 1e-4):  # fixed scaling would saturate at 448 or flush to zero here
        out = fp8_vs_reference(scale)
        for i, what in enumerate(("output", "grad x", "grad W")):
            a, b = rel_err(out["fp8"][i], out["ref"][i]), rel_err(base["fp8"][i], base["ref"][i])
            assert a == pytest.approx(b, rel=0.1), (scale, what, a, b)


def test_all_zero_inputs_give_zeros_not_nan():
    layer = Float8Linear(32, 16, bias=False)
    x = torch.zeros(16, 32, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn(16, 16))
    assert torch.equal(y, torch.zeros(16, 16))
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # W is not zero: grad x is not either
    assert torch.equal(layer.weight.grad, torch.zeros(16, 32))  # x is zero: so is grad W
    x = torch.randn(16, 32, requires_grad=True)
    layer(x).backward(torch.zeros(16, 16))  # a zero upstream gradient
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(layer.weight.grad, torch.zeros(16, 32))


def test_output_and_gradient_dtypes_under_autocast():
    layer = Float8Linear(32, 48, bias=True)
    x = torch.randn(4, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # what F.linear gives under autocast
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32  # fp32 master weights
    assert layer.bias.grad.dtype == torch.float32


def test_scaled_mm_enforces_the_cuda_layout_on_cpu_too():
    a = torch.randn(32, 16).to(fp8.E4M3)
    one = torch.ones(())
    assert fp8.scaled_mm(a, a.t(), one, one, torch.float32).shape == (32, 32)
    with pytest.raises(RuntimeError, match="row-major first operand and a column-major second"):
        fp8.scaled_mm(a, a.t().contiguous(), one, one, torch.float32)  # second operand row-major
    with pytest.raises(RuntimeError, match="row-major first operand"):
        fp8.scaled_mm(a.t(), a, one, one, torch.float32)  # first operand column-major
    a, b = torch.randn(32, 24).to(fp8.E4M3), torch.randn(16, 24).to(fp8.E4M3)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        fp8.scaled_mm(a, b.t(), one, one, torch.float32)  # reduces over 24


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


def tiny_gpt(seed=0, aspect_ratio=32, head_dim=16):
    """2 layers of width 64 (4 heads of 16): every block matrix is a multiple of 16."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(2, VOCAB, sequence_len=32, aspect_ratio=aspect_ratio, head_dim=head_dim))
    model.init_weights()
    return model


def test_convert_to_fp8_swaps_the_block_linears_only():
    model, plain = tiny_gpt(), tiny_gpt()
    params = dict(model.named_parameters())
    assert convert_to_fp8(model) == 2 * 6  # per block: q, k, v, proj, fc, mlp proj
    for block in model.blocks:
        for layer in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj, block.mlp.c_fc,
                      block.mlp.c_proj):
            assert type(layer) is Float8Linear
    assert type(model.lm_head) is nn.Linear and type(model.wte) is nn.Embedding
    assert type(model.blocks[1].attn.ve_gate) is nn.Linear and type(model.smear_gate) is nn.Linear  # 12, 24 inputs
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameter objects
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict(), strict=True)  # an fp8 run's checkpoint loads into a plain GPT
    assert convert_to_fp8(model) == 0  # already converted
    # width 40 (5 heads of 8): no block matrix is a multiple of 16, nothing is converted
    assert convert_to_fp8(tiny_gpt(aspect_ratio=20, head_dim=8)) == 0


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


def test_optimizers_built_before_conversion_update_the_fp8_layers():
    model = tiny_gpt()
    optimizers = model.setup_optimizers()
    convert_to_fp8(model)
    optimized = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    before = [layer.weight.detach().clone() for layer in layers]
    assert len(layers) == 12 and all(any(p is layer.weight for p in optimized) for layer in layers)
    train(model, optimizers, 2, *batch())  # 2 steps: q, k, v and fc get no gradient while the projections are zero
    for layer, old in zip(layers, before):
        assert not torch.equal(old, layer.weight)


def test_tiny_gpt_learns_with_fp8_like_float32():
    x, y = batch()
    reference = tiny_gpt()
    ref_losses = train(reference, reference.setup_optimizers(), 10, x, y)
    model = tiny_gpt()
    convert_to_fp8(model)
    losses = train(model, model.setup_optimizers(), 10, x, y)
    assert losses[0] == pytest.approx(ref_losses[0], abs=1e-3)  # same init (zero output projections)
    assert ref_losses[-1] < ref_losses[0] - 2.0, ref_losses  # the repeated batch is being memorised
    assert losses[-1] < losses[0] - 2.0, losses
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.15), (losses[-1], ref_losses[-1])
    assert losses != ref_losses  # the fp8 model did compute differently


def test_compiled_gpt_matches_eager():
    """fullgraph: Float8Linear traces without graph breaks. The whole GPT with aot_eager (dynamo +
    the autograd partitioning, ~5 s); one layer through inductor (its C++ codegen, ~7 s; the whole
    GPT takes ~40 s on 2 cores)."""
    model = tiny_gpt()
    convert_to_fp8(model)
    for block in model.blocks:  # else q, k, v and fc get zero gradients and the comparison proves less
        nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    nn.init.constant_(model.smear_lambda, 0.5)  # (and the smear gate)
    x, y = batch()
    loss = model(x, y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(x, y)
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-6), name
    assert all(g.abs().sum() > 0 for g in grads.values())

    layer = model.blocks[0].mlp.c_fc
    x = torch.randn(2, 32, 64, requires_grad=True)
    eager = layer(x)
    eager.square().sum().backward()
    gx, gw = x.grad, layer.weight.grad
    x.grad = layer.weight.grad = None
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    compiled.square().sum().backward()
    errors = [rel_err(compiled, eager), rel_err(x.grad, gx), rel_err(layer.weight.grad, gw)]
    assert max(errors) < 1e-3, errors


# ---------------------------------------------------------------------------
# base_train --fp8


def test_base_train_fp8_end_to_end_and_resume(base_dir, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return fp8_linear(*args, **kwargs)

    monkeypatch.setattr(fp8, "fp8_linear", counted)  # what every Float8Linear calls
    flags = TINY + ["--fp8", "--eval-every", "-1", "--save-every", "-1"]
    result = base_train.main(flags + ["--num-iterations", "2"])
    assert result["step"] == 2 and len(result["curve"]["loss"]) == 2
    assert len(calls) >= 2 * 2 * 12  # 2 steps x 2 micro-steps x 12 layers (+ the final eval and samples)
    assert (256, 64) in calls and (64, 256) in calls  # MLP in and out: the widest block matrices
    report = (base_dir / "report" / "base-train.md").read_text()
    assert "fp8: on" in report
    model, _, meta = checkpoint.load_model("base", "cpu")  # a plain GPT loads the fp8 run's weights
    assert meta["train_config"]["fp8"] is True and type(model.blocks[0].attn.c_q) is nn.Linear
    # resume with the same flag: continues from step 2, in fp8 again
    calls.clear()
    result = base_train.main(flags + ["--num-iterations", "3", "--resume"])
    assert result["step"] == 3 and len(result["curve"]["loss"]) == 3
    assert len(calls) >= 2 * 12 and (256, 64) in calls
    assert json.loads((base_dir / "report" / "base-train.json").read_text())["num_iterations"] == 3


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
