"""The GPT: config and windows, the d24 figures, init and gates, loss, the KV-cached paths with
every architectural part, accounting, optimizer groups, the attention kernel choice. CPU, fp32."""

import math
import sys
import types
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import attention as attention_module
import model as model_module
from attention import KVCache, attention, visible
from conftest import assert_close
from model import GPT, GPTConfig, config_from_depth, layer_windows

V = 100  # padded to 128 inside the model


def tiny_config(**overrides):
    return GPTConfig(**(dict(sequence_len=16, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64) | overrides))


def make_model(cfg=None, randomize=False):
    torch.manual_seed(0)
    model = GPT(cfg or tiny_config())
    model.init_weights()
    if randomize:  # zero projections and scalars at their init would hide bugs: make every weight matter
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.5 if p is model.wte.weight else 0.2)
    return model.eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- config, windows, figures

def test_config_from_depth_and_windows():
    cfg = config_from_depth(20, vocab_size=32768)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.window_pattern) == (20, 1280, 10, 10, "SSSL")
    assert GPTConfig(**asdict(cfg)) == cfg  # what a checkpoint stores rebuilds it
    assert config_from_depth(3, vocab_size=500).n_embd == 256  # 192 rounds up to a multiple of 128
    assert layer_windows(cfg) == ([512, 512, 512, None] * 5)
    # short = a quarter of the context rounded up to 128; the last layer is L whatever the pattern
    assert layer_windows(tiny_config(sequence_len=1000, n_layer=3, window_pattern="S")) == [256, 256, None]
    assert layer_windows(tiny_config(n_layer=3, window_pattern="LS")) == [None, 128, None]


def test_d24_parameters_and_flops_match_nanochat():
    with torch.device("meta"):
        model = GPT(config_from_depth(24, vocab_size=32768))
    params = model.num_params()
    assert params["total"] == 1_384_122_122  # nanochat's d24 with value embeddings
    matrices = 24 * 12 * 1536**2 + 32768 * 1536  # q, k, v, proj and the 4x MLP per layer; lm_head
    assert params["scaling"] == matrices + 12 * 12 * 12  # + the 12 value gates (12 heads x 12 channels)
    keys = 6 * 2048 + 18 * 512  # 6 long layers, 18 of window 512
    assert model.estimate_flops() == 6 * (params["total"] - params["embedding"]) + 12 * 1536 * keys
    assert round(model.estimate_flops() / 1e9, 3) == 4.775
    small = make_model(tiny_config(window_pattern="S"))  # a window past the context sees all of it
    params = small.num_params()
    assert small.estimate_flops() == 6 * (params["total"] - params["embedding"]) + 12 * 64 * (16 + 16)


def test_window_mask_and_windowed_attention():
    assert visible(torch.arange(5), 5, 2).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert visible(torch.tensor([6]), 8, None).int().tolist() == [[1] * 7 + [0]]
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 10, 4, 8, generator=gen, dtype=torch.float64).unbind(0)
    k, v = k[:, :, :2], v[:, :, :2]  # 4 query heads on 2 kv heads
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * 1.2**2 / 8**0.5
    i, j = torch.arange(10)[:, None], torch.arange(10)
    band = (j <= i) & (i - j < 3)
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~band, -math.inf).softmax(-1),
                            v.repeat_interleave(2, dim=2))
    assert_close(attention(q, k, v, window=3), expected, atol=1e-10)
    assert_close(attention(q, k, v, window=3, q_pos=torch.arange(10)), expected, atol=1e-10)
    assert not torch.allclose(attention(q, k, v, window=None), expected)  # the window does restrict


# --- init, gates, loss

def test_init_scalars_gates_and_initial_loss():
    model = make_model()
    assert model.padded_vocab_size == 128 and model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert sorted(model.value_embeds) == ["1"]  # alternating layers ending with the last
    assert_close(model.resid_lambdas.detach(), torch.tensor([1.15, 1.05]))
    assert_close(model.x0_lambdas.detach(), torch.tensor([0.20, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    for block in model.blocks:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
    gates, gate = [], model.blocks[1].attn.ve_gate
    gate.register_forward_hook(lambda module, args, out: gates.append(3 * torch.sigmoid(out)))
    assert abs(model(tokens(4, 16), tokens(4, 16, seed=2)).item() - math.log(V)) < 0.05
    assert gates[0].shape == (4, 16, 2) and (gates[0] - 1.5).abs().max() < 0.1  # 3 * sigmoid(~0)
    assert (gate.weight >= 0).all() and gate.weight.max() <= 0.02
    logits = model(tokens(3, 16))
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    with torch.no_grad():
        model.lm_head.weight.normal_(std=100.0)
    assert 14.0 < model(tokens(2, 8)).abs().max() <= 15.0  # soft-capped


def plain_loss_and_grads(model, x, y, reduction, weights):
    """The loss from the whole (B*T, V) logits at once, and the gradients of (weights * loss).sum()."""
    model.zero_grad(set_to_none=True)
    per_token = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view(y.shape)
    loss = {"mean": per_token.sum() / (y != -1).sum(), "sum": per_token.sum(), "none": per_token}[reduction]
    (weights * loss).sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_grads_match_the_plain_computation(reduction, monkeypatch):
    """Cross-entropy over the targets that are not -1, reduced as asked, computed in chunks of rows."""
    model = make_model(randomize=True).train()
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    y[0, 3:9] = -1
    weights = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) if reduction == "none" else 1.0
    expected, expected_grads = plain_loss_and_grads(model, x, y, reduction, weights)
    monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", 5 * 128)  # 5 rows a chunk: 32 = 6 x 5 + 2
    rows, chunk_loss = [], model._chunk_loss
    model._chunk_loss = lambda x, *args: rows.append(x.size(0)) or chunk_loss(x, *args)
    model.zero_grad(set_to_none=True)
    loss = model(x, y, loss_reduction=reduction)
    assert rows == [5] * 6 + [2]
    (weights * loss).sum().backward()
    assert sorted(rows[7:]) == [2] + [5] * 6  # backward recomputed every chunk
    assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5, msg="loss")
    for name, p in model.named_parameters():
        assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)
    loss = model(x, torch.full_like(y, -1), loss_reduction=reduction)  # nothing counted: 0, not NaN
    (weights * loss).sum().backward()
    assert (loss == 0).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_keeps_no_logits_for_backward_and_is_one_piece_under_compile(monkeypatch):
    """Autograd must not hold (B*T, V) logits (the head is checkpointed); without grad the chunks are
    not checkpointed; under torch.compile (simulated) the loss is one piece with the same value."""
    model = make_model(randomize=True).train()
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        chunked = model(x, y)
        chunked.backward()
    assert saved and not [shape for shape in saved if 128 in shape]
    monkeypatch.setattr(model_module, "checkpoint", None)  # calling it would fail
    with torch.no_grad():
        monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", 7 * 128)
        assert_close(model(x, y), chunked.detach(), atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_close(model(x, y), chunked, atol=1e-6, rtol=1e-6)


# --- KV cache

def windowed_model(n_kv_head):
    """3 layers (value embeddings on 0 and 2; windows 128, 128, all) at context 512, every weight and
    scalar random: smear, backout and the gates all act."""
    return make_model(tiny_config(sequence_len=512, n_layer=3, n_kv_head=n_kv_head), randomize=True)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cached_decode_equals_full_forward_with_every_part(n_kv_head):
    """A 300-token sequence (longer than the 128 window): prefill in chunks into a cache that must
    grow, plain one-token steps, then the fixed-shape decode_step over a cache with garbage past the
    position; the logits are the full forward's, the keys and values those one prefill writes."""
    model = windowed_model(n_kv_head)
    assert model.smear_lambda.abs() > 0.01 and model.backout_lambda.abs() > 0.01
    x = tokens(2, 300)
    with torch.no_grad():
        full = model(x)
        cache, whole = (KVCache(model.config, 2, size, "cpu", torch.float32) for size in (64, 300))
        model(x, kv_cache=whole)
        parts, t = [], 0
        for size in (70, 1, 190, 1, 1):
            parts.append(model(x[:, t:t + size], kv_cache=cache))
            t += size
        assert cache.pos == 263 and cache.seq_len >= 300
        cache.k[:, :, 263:].normal_(std=100.0)
        cache.v[:, :, 263:].normal_(std=100.0)
        for t in range(263, 300):
            parts.append(model.decode_step(x[:, t:t + 1], cache, torch.tensor([t]))[:, None])
    assert cache.pos == 263  # decode_step leaves the position to the caller
    assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
    assert_close(cache.k[:, :, :300], whole.k, atol=1e-5, rtol=1e-5)
    assert_close(cache.v[:, :, :300], whole.v, atol=1e-5, rtol=1e-5)


def test_smear_in_decoding_reads_the_cached_embedding():
    """The cache keeps the last token's normalized embedding; the next token's logits depend on it
    (zeroing it changes them), and a batch cache prefilled from a batch-1 one carries it over."""
    model = windowed_model(2)
    with torch.no_grad():
        model.smear_lambda.fill_(2.0)
        x = tokens(1, 10)
        one = KVCache(model.config, 1, 16, "cpu", torch.float32)
        model(x[:, :9], kv_cache=one)
        assert_close(one.prev[0, 0], model_module.norm(model.wte(x[0, 8])))
        many = KVCache(model.config, 3, 16, "cpu", torch.float32)
        many.prefill_from(one)
        assert many.pos == 9 and torch.equal(many.prev, one.prev.expand(3, 1, -1))
        step = model(x[:, 9:].expand(3, 1), kv_cache=many)[:, -1]
        assert_close(step, model(x)[:, -1].expand(3, -1), atol=1e-5, rtol=1e-5)
        many.pos, many.prev = 9, torch.zeros_like(many.prev)
        assert not torch.allclose(model(x[:, 9:].expand(3, 1), kv_cache=many)[:, -1], step, atol=1e-3)


def test_rotary_tables_extend_and_meta_build_matches_direct():
    model, x = make_model(tiny_config(sequence_len=4), randomize=True), tokens(1, 60)  # tables cover 40 positions
    with torch.no_grad():
        assert_close(model(x)[:, :20], model(x[:, :20]), atol=1e-5, rtol=1e-5)
    assert model.cos.size(1) >= 60
    torch.manual_seed(0)
    direct = GPT(tiny_config())
    with torch.device("meta"):
        lazy = GPT(tiny_config())
    lazy.to_empty(device="cpu")
    for m in (direct, lazy):
        torch.manual_seed(123)
        m.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name
    assert_close(lazy(tokens(2, 8)), direct(tokens(2, 8)))


def test_autocast_keeps_the_stream_attention_and_cache_in_bf16(monkeypatch):
    """CUDA autocast runs rms_norm in float32 (torch >= 2.12), CPU autocast does not: simulate it;
    the residual stream, q, k, v and the cache stay bf16, the logits float32 and close to the
    one-token steps'."""
    norm = model_module.norm
    monkeypatch.setattr(model_module, "norm", lambda x: norm(x.float()))
    seen = []
    monkeypatch.setattr(model_module, "attention", lambda q, k, v, *a: seen.append((q.dtype, k.dtype, v.dtype))
                        or attention(q, k, v, *a))
    model, residual = make_model(randomize=True), []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: residual.append(args[0].dtype))
    x = tokens(1, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        cache = KVCache(model.config, 1, 16, "cpu", torch.bfloat16)
        step = torch.cat([model(x[:, t:t + n], kv_cache=cache) for t, n in ((0, 4), (4, 1), (5, 1), (6, 1), (7, 1))], 1)
    assert set(seen) == {(torch.bfloat16,) * 3} and set(residual) == {torch.bfloat16} and len(seen) == 2 * 6
    assert full.dtype == step.dtype == torch.float32
    assert (full - step).abs().max() < 0.2 * full.abs().max()


def test_positions_returns_the_logits_of_those_positions_only():
    model, idx, positions = make_model(randomize=True), tokens(3, 10), torch.tensor([9, 0, 4])
    full, picked = model(idx), model(idx, positions=positions)
    assert_close(picked, full[torch.arange(3), positions], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(picked[1:], full[1:, -1], atol=1e-2)  # other positions give other logits


def test_rotary_encodes_relative_positions():
    """Position 0 is the identity, norms are kept, and a query-key score depends only on m - n."""
    D = 16
    cos, sin = model_module.rotary_tables(64, D)
    q, k = torch.randn(2, 1, 1, 1, D, dtype=torch.float64).unbind(0)
    at = lambda x, pos: model_module.apply_rotary(x, cos[:, pos:pos + 1].double(), sin[:, pos:pos + 1].double())
    assert_close(at(q, 0), q, atol=1e-12)
    assert_close(at(q, 37).norm(), q.norm(), atol=1e-9)
    score = lambda m, n: (at(q, m) * at(k, n)).sum()
    for m, n, shift in ((5, 2, 30), (0, 9, 11), (40, 40, 3)):
        assert_close(score(m, n), score(m + shift, n + shift), atol=1e-9)
    assert (score(5, 2) - score(6, 2)).abs() > 1e-3


# --- accounting, optimizers

def test_setup_optimizers_groups():
    """Every parameter once; AdamW groups with their own fixed decay and betas; the weight_decay
    argument reaches Muon only."""
    model = make_model(tiny_config(n_layer=3))
    adamw, muon = model.setup_optimizers(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.1)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    scale = (64 / 768) ** -0.5
    groups = {id(g["params"][0]): (g["lr"], g["betas"], g["weight_decay"]) for g in adamw.param_groups}
    assert groups[id(model.lm_head.weight)] == (pytest.approx(0.008 * scale), (0.8, 0.96), 0.01)
    assert groups[id(model.wte.weight)] == (pytest.approx(0.3 * scale), (0.8, 0.995), 0.001)
    assert groups[id(model.value_embeds["0"].weight)] == (pytest.approx(0.15 * scale), (0.8, 0.995), 0.01)
    assert groups[id(model.resid_lambdas)] == (pytest.approx(0.005), (0.8, 0.95), 0.05)
    assert groups[id(model.x0_lambdas)] == (0.5, (0.96, 0.95), 0.0)
    assert groups[id(model.smear_gate.weight)] == (0.2, (0.8, 0.95), 0.0)
    assert len(adamw.param_groups) == 6
    assert all(g["lr"] == 0.02 and g["weight_decay"] == 0.1 for g in muon.param_groups)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in model.blocks.parameters()}
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)


# --- the attention kernel

def fake_kernels(monkeypatch, flash_attn_func):
    interface = types.SimpleNamespace(flash_attn_func=flash_attn_func)
    kernels = types.SimpleNamespace(get_kernel=lambda name: types.SimpleNamespace(flash_attn_interface=interface))
    monkeypatch.setitem(sys.modules, "kernels", kernels)


def test_flash_attention_guard_falls_back_to_sdpa(monkeypatch, capsys):
    """FA3 is taken only when `kernels` imports AND its test call gives SDPA's answer; the choice is
    made and said once per process, on CUDA only."""
    monkeypatch.setitem(sys.modules, "kernels", None)  # import fails
    assert attention_module.try_flash_attention("cpu")[0] is None

    def crashes(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    for broken in (crashes, lambda q, k, v, **kw: torch.zeros_like(q)):  # fails; runs but computes nonsense
        fake_kernels(monkeypatch, broken)
        assert attention_module.try_flash_attention("cpu")[0] is None

    def sdpa_like(q, k, v, causal, softmax_scale, window_size):
        assert causal and softmax_scale == pytest.approx(1.44 / 8)
        return attention(q, k, v, window_size[0] + 1, torch.arange(q.size(1)))

    fake_kernels(monkeypatch, sdpa_like)
    assert attention_module.try_flash_attention("cpu")[0] is not None  # a working kernel is taken
    monkeypatch.setattr(attention_module, "try_flash_attention", lambda device: (None, "ImportError: no kernels"))
    monkeypatch.setattr(attention_module, "_attention_said", False)
    for device in ("cpu", "cuda", "cuda"):
        attention_module.init_attention(device)
    assert capsys.readouterr().out.count("attention: SDPA") == 1 and attention_module.FLASH_ATTENTION is None
