"""The GPT: config, shapes, init, loss, KV cache, FLOPs/params, optimizer setup. CPU, fp32."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from conftest import assert_close
from model import GPT, GPTConfig, KVCache, config_from_depth

V = 100  # padded to 128 inside the model


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))


def tiny_config(**overrides):
    cfg = dict(sequence_len=16, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def make_model(cfg=None, seed=0, randomize=False):
    torch.manual_seed(seed)
    model = GPT(cfg or tiny_config())
    model.init_weights()
    if randomize:  # zero output projections would hide attention bugs: make every weight matter
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.5 if p is model.wte.weight else 0.2)
    return model.eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config


def test_config_from_depth():
    cfg = config_from_depth(20, vocab_size=65536)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.sequence_len) == (20, 1280, 10, 10, 2048)
    cfg = config_from_depth(3, vocab_size=500)  # 192 rounds up to a multiple of 128
    assert (cfg.n_embd, cfg.n_head) == (256, 2)
    cfg = config_from_depth(2, vocab_size=500, sequence_len=64, head_dim=32, n_kv_head=2)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.sequence_len) == (2, 128, 4, 2, 64)
    assert GPTConfig(**dataclasses.asdict(cfg)) == cfg  # what a checkpoint stores rebuilds it
    with pytest.raises(ValueError):
        config_from_depth(0, vocab_size=500)
    with pytest.raises(ValueError):
        GPT(tiny_config(n_kv_head=3))


# --------------------------------------------------------------------------- shapes, init, loss


def test_shapes_padding_and_no_biases():
    model = make_model()
    assert model.padded_vocab_size == 128
    assert model.wte.weight.shape == (128, 64) and model.lm_head.weight.shape == (128, 64)
    assert model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()  # untied
    assert all(p.dim() == 2 for p in model.parameters())  # no biases, no norm gains
    logits = model(tokens(3, 16))
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32


def test_initial_loss_is_ln_vocab_and_projections_start_at_zero():
    model = make_model()
    loss = model(tokens(4, 16), tokens(4, 16, seed=2))
    assert abs(loss.item() - math.log(V)) < 0.05
    for block in model.blocks:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0


def test_logits_are_soft_capped():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=100.0)
    logits = model(tokens(2, 8))
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


def test_loss_masking_and_reductions():
    model = make_model(randomize=True)
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    y[0, :5] = -1
    logits = model(x)
    keep = y != -1
    expected = F.cross_entropy(logits[keep], y[keep])
    assert_close(model(x, y), expected, atol=1e-5, rtol=1e-5)
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (2, 16) and (per_token[~keep] == 0).all()
    assert_close(per_token.sum(), model(x, y, loss_reduction="sum"))
    with pytest.raises(ValueError):
        model(x, y, loss_reduction="max")


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_all_masked_targets_give_zero_finite_loss(chunk_rows, monkeypatch):
    if chunk_rows:
        monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", chunk_rows * 128)
    model = make_model(randomize=True).train()
    loss = model(tokens(2, 16), torch.full((2, 16), -1))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def plain_loss_and_grads(model, x, y, reduction, weights):
    """The loss from the whole (B*T, V) logits at once, and the gradients of (weights * loss).sum()."""
    model.zero_grad(set_to_none=True)
    per_token = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view(y.shape)
    loss = {"mean": per_token.sum() / (y != -1).sum(), "sum": per_token.sum(), "none": per_token}[reduction]
    (weights * loss).sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_grads_match_the_plain_computation(reduction, monkeypatch):
    model = make_model(randomize=True).train()
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    y[0, 3:9] = -1
    weights = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) if reduction == "none" else 1.0
    expected, expected_grads = plain_loss_and_grads(model, x, y, reduction, weights)
    monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", 5 * 128)  # 5 rows a chunk: 32 = 6 x 5 + 2
    rows = []
    chunk_loss = model._chunk_loss
    model._chunk_loss = lambda x, *args: rows.append(x.size(0)) or chunk_loss(x, *args)
    model.zero_grad(set_to_none=True)
    loss = model(x, y, loss_reduction=reduction)
    assert rows == [5] * 6 + [2]
    (weights * loss).sum().backward()
    assert sorted(rows[7:]) == [2] + [5] * 6  # backward recomputed every chunk (last one first)
    assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5, msg="loss")
    for name, p in model.named_parameters():
        assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_loss_keeps_no_logits_for_backward():
    """Autograd must not hold (B*T, V) logits: the loss head is checkpointed."""
    model = make_model().train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(tokens(2, 16), tokens(2, 16, seed=2)).backward()
    assert saved and not [shape for shape in saved if V in shape or 128 in shape]


def test_eval_loss_is_chunked_without_checkpointing(monkeypatch):
    model = make_model(randomize=True)
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    with torch.no_grad():
        whole = model(x, y, loss_reduction="none")
        monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", 7 * 128)
        monkeypatch.setattr(model_module, "checkpoint", None)  # calling it would fail
        chunked = model(x, y, loss_reduction="none")
    assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_compiled_path_loss_is_one_piece_and_refuses_a_kv_cache(monkeypatch):
    """What forward does while torch.compile traces it (simulated: the real trace is slow)."""
    model = make_model(randomize=True).train()
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    chunked = model(x, y)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(model_module, "checkpoint", None)  # no checkpoint under compile
    assert_close(model(x, y), chunked, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="torch.compile"):
        model(x[:, :4], kv_cache=new_cache(model, 2))


def test_compiled_model_refuses_a_kv_cache():
    """A real dynamo trace (backend="eager": no code generation, a few seconds): a plain `raise`
    would only make dynamo fall back to eager for the frame, silently."""
    model = make_model(randomize=True)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    x, y = tokens(2, 8), tokens(2, 8, seed=2)
    try:
        assert_close(compiled(x, y), model(x, y), atol=1e-6, rtol=1e-6)  # the one-piece loss head
        with torch.no_grad():
            cache = new_cache(model, 2)
            with pytest.raises(RuntimeError, match="KV cache cannot be used under torch.compile"):
                compiled(x[:, :4], kv_cache=cache)
            assert cache.pos == 0
    finally:
        torch._dynamo.reset()


def test_gqa_matches_repeated_kv_heads(monkeypatch):
    model = make_model(tiny_config(n_head=4, n_kv_head=1), randomize=True)
    x = tokens(2, 16)
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setattr(model_module, "SDPA_HAS_GQA", False)
        slow = model(x)
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = make_model().train()
    optimizers = model.setup_optimizers()
    x, y = tokens(4, 16), tokens(4, 16, seed=2)
    first = model(x, y).item()
    for _ in range(50):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert first > 4.0 and loss.item() < 0.3


# --------------------------------------------------------------------------- KV cache


def new_cache(model, B, seq_len=64, dtype=torch.float32):
    c = model.config
    return KVCache(B, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, "cpu", dtype)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_kv_cache_prefill_then_one_token_at_a_time(n_kv_head):
    model = make_model(tiny_config(n_kv_head=n_kv_head), randomize=True)
    x = tokens(2, 20)
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, 2)
        parts = [model(x[:, :7], kv_cache=cache)]
        for t in range(7, 20):
            parts.append(model(x[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 20
    assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunks_and_growth():
    model = make_model(randomize=True)
    x = tokens(2, 30)
    with torch.no_grad():
        full = model(x)
        cache = new_cache(model, 2, seq_len=8)  # too small: must grow twice
        parts, t = [], 0
        for size in (5, 1, 4, 9, 1, 10):
            parts.append(model(x[:, t:t + size], kv_cache=cache))
            t += size
    assert cache.seq_len >= 30
    assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pos == 0
    with torch.no_grad():
        again = model(x[:, :6], kv_cache=cache)
    assert_close(again, full[:, :6], atol=1e-5, rtol=1e-5)


def test_kv_cache_expanded_from_one_prefill():
    model = make_model(randomize=True)
    prompt, continuations = tokens(1, 9), tokens(3, 5, seed=7)
    with torch.no_grad():
        one = new_cache(model, 1, seq_len=12)
        model(prompt, kv_cache=one)
        many = one.expand(3)
        assert (many.batch_size, many.pos) == (3, 9)
        got = torch.cat([model(continuations[:, t:t + 1], kv_cache=many) for t in range(5)], dim=1)
        full = model(torch.cat([prompt.expand(3, -1), continuations], dim=1))[:, 9:]
        other = new_cache(model, 3, seq_len=4)
        other.prefill_from(one)  # into a smaller cache: grows
        assert other.pos == 9 and torch.equal(other.k[:, 2, :, :9], one.k[:, 0, :, :9])
    assert_close(got, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model(tokens(2, 1), kv_cache=many)  # batch does not match the cache


def test_rotary_tables_extend_past_precomputed_length():
    model = make_model(tiny_config(sequence_len=4), randomize=True)  # tables cover 40 positions
    x = tokens(1, 60)
    with torch.no_grad():
        long = model(x)
        short = model(x[:, :20])
    assert model.cos.size(1) >= 60
    assert_close(long[:, :20], short, atol=1e-5, rtol=1e-5)


def test_build_on_meta_device_then_init():
    torch.manual_seed(0)
    direct = GPT(tiny_config())
    with torch.device("meta"):
        lazy = GPT(tiny_config())
    lazy.to_empty(device="cpu")
    torch.manual_seed(123)
    direct.init_weights()
    torch.manual_seed(123)
    lazy.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name
    assert_close(lazy.cos, direct.cos)
    x = tokens(2, 8)
    assert_close(lazy(x), direct(x))


def test_autocast_bf16_forward_and_cache():
    model = make_model(randomize=True)
    x = tokens(1, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        cache = new_cache(model, 1, dtype=torch.bfloat16)
        step = torch.cat([model(x[:, :4], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(4, 8)], 1)
    assert full.dtype == torch.float32 and step.dtype == torch.float32
    assert (full - step).abs().max() < 0.2 * full.abs().max()  # bf16: loose, but the same logits


def test_autocast_keeps_residual_stream_and_attention_in_the_autocast_dtype(monkeypatch):
    """CUDA autocast runs rms_norm in float32 (torch >= 2.12), CPU autocast does not: simulate it,
    then check that the residual stream, q, k, v and the cached keys/values all stay bf16."""
    norm = model_module.norm
    monkeypatch.setattr(model_module, "norm", lambda x: norm(x.float()))
    seen = []
    attention = model_module.attention
    monkeypatch.setattr(model_module, "attention", lambda q, k, v: seen.append((q.dtype, k.dtype, v.dtype)) or
                        attention(q, k, v))
    model = make_model(randomize=True)
    residual = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: residual.append(args[0].dtype))
    x = tokens(1, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x)
        cache = new_cache(model, 1, dtype=torch.bfloat16)
        step = torch.cat([model(x[:, :4], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(4, 8)], 1)
    assert len(seen) == 6 * 2 and set(seen) == {(torch.bfloat16,) * 3}
    assert len(residual) == 6 * 2 and set(residual) == {torch.bfloat16}
    assert cache.k.dtype == torch.bfloat16 and full.dtype == step.dtype == torch.float32
    assert (full - step).abs().max() < 0.2 * full.abs().max()


def test_float32_forward_is_unchanged_by_the_autocast_casts():
    """Without autocast nothing is cast: the logits are bitwise those of the ops written out."""
    model = make_model(randomize=True)
    x = tokens(2, 8)
    with torch.no_grad():
        h = model_module.norm(model.wte(x))
        cos, sin = model.cos[:, :8], model.sin[:, :8]
        for block in model.blocks:
            h = block(h, cos, sin, None)
        logits = model.lm_head(model_module.norm(h))[..., :V]
        expected = 15.0 * torch.tanh(logits / 15.0)
        assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------- accounting, optimizers


def test_num_params_and_flops_by_hand():
    model = make_model(tiny_config(n_head=2, n_kv_head=1))  # head_dim 32, kv width 32
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 256 + 256 * 64  # q, k, v, proj, fc, proj
    embedding, lm_head = 128 * 64, 128 * 64
    assert model.num_params() == dict(embedding=embedding, other=2 * per_layer + lm_head,
                                      total=embedding + 2 * per_layer + lm_head)
    assert model.estimate_flops() == 6 * (2 * per_layer + lm_head) + 12 * 2 * 2 * 32 * 16


def test_setup_optimizers_covers_every_param_once():
    model = make_model()
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    scale = (64 / 768) ** -0.5
    lrs = {id(g["params"][0]): g["lr"] for g in adamw.param_groups}
    assert lrs[id(model.lm_head.weight)] == pytest.approx(0.004 * scale)
    assert lrs[id(model.wte.weight)] == pytest.approx(0.2 * scale)
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 for g in muon.param_groups)
    for opt in (adamw, muon):
        assert all(g["initial_lr"] == g["lr"] and g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert not any(p is model.wte.weight or p is model.lm_head.weight for g in muon.param_groups for p in g["params"])


def test_positions_returns_the_logits_of_those_positions_only():
    # random weights everywhere: at init the zero output projections would make every position's
    # logits depend on its own token only
    model = make_model(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32),
                       randomize=True)
    idx = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([9, 0, 4])
    full = model(idx)
    picked = model(idx, positions=positions)
    assert picked.shape == (3, 100)
    assert_close(picked, full[torch.arange(3), positions], atol=1e-5, rtol=1e-5)
    # the check tells positions apart: other positions of the same rows give other logits
    assert not torch.allclose(picked[1:], full[1:, -1], atol=1e-2)
    assert not torch.allclose(picked[2], full[2, 3], atol=1e-2)


def test_rotary_encodes_relative_positions():
    """Rotary: position 0 is the identity, norms are kept, and the score of a query at position m
    with a key at position n depends only on m - n (the property attention relies on)."""
    D = 16
    cos, sin = model_module.rotary_tables(64, D)
    q, k = torch.randn(2, 1, 1, 1, D, dtype=torch.float64).unbind(0)  # (B, T, H, D) = (1, 1, 1, D)

    def at(x, pos):
        return model_module.apply_rotary(x, cos[:, pos:pos + 1].double(), sin[:, pos:pos + 1].double())

    assert_close(at(q, 0), q, atol=1e-12)
    assert_close(at(q, 37).norm(), q.norm(), atol=1e-9)
    score = lambda m, n: (at(q, m) * at(k, n)).sum()
    for m, n, shift in ((5, 2, 30), (0, 9, 11), (40, 40, 3)):
        assert_close(score(m, n), score(m + shift, n + shift), atol=1e-9)
    assert (score(5, 2) - score(6, 2)).abs() > 1e-3  # but it does depend on the offset
    # and it turns the way every checkpoint was trained with: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
    x = torch.randn(1, 64, 1, D, dtype=torch.float64)
    c, s = cos[..., : D // 2].double(), sin[..., : D // 2].double()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    assert_close(model_module.apply_rotary(x, cos, sin), torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1), atol=1e-12)
