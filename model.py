"""The GPT: a small modern decoder-only transformer.

- token embedding, then RMSNorm (no learnable parameters anywhere in the norms)
- rotary position embeddings (no learned positions), QK-norm, grouped-query attention
- pre-norm blocks: x + attn(norm(x)), x + mlp(norm(x)); MLP is 4x wide with ReLU^2
- no biases; input embedding and lm_head are separate matrices
- output projections start at zero, so each block starts as the identity
- logits soft-capped at 15 * tanh(logits / 15), computed in float32; the eager loss runs the
  lm_head in checkpointed chunks of rows, so the (B*T, vocab) float32 logits never exist at once
- vocab padded to a multiple of 64 for fast matmuls; logits are sliced back to the real vocab
- two ways to run with a KV cache: forward(idx, kv_cache=cache), any number of tokens at the
  cache's Python-int position (prefill, and the plain decode loop), and decode_step(), one token
  per row at a position held in a device tensor, with shapes that do not change from token to
  token, so that torch.compile can capture it in a CUDA graph (engine.py)
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from optim import DistAdamW, Muon

# F.scaled_dot_product_attention(enable_gqa=...) arrived in torch 2.5; before that, repeat kv heads
SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10000.0
# The eager loss computes lm_head -> float32 -> softcap -> cross-entropy for this many logits at a
# time (2**27 float32 = 0.5 GB: 2048 rows of a 65536 vocab) and recomputes them in backward. In one
# piece, autograd would keep ~35 GB of float32 logits at d20 (B=32, T=2048, V=65536).
LOSS_CHUNK_LOGITS = 2**27


@dataclass
class GPTConfig:
    """Everything needed to rebuild the model (saved with each checkpoint)."""

    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 768


def config_from_depth(depth, vocab_size, sequence_len=2048, aspect_ratio=64, head_dim=128, n_kv_head=None):
    """The one complexity dial. From --depth:

        n_layer   = depth
        n_embd    = depth * aspect_ratio, rounded up to a multiple of head_dim
        n_head    = n_embd // head_dim
        n_kv_head = n_head (plain multi-head attention) unless given; must divide n_head

    e.g. depth 20 -> 20 layers, width 1280, 10 heads of 128 (about 560M parameters with a
    65536 vocab). For tiny CPU models lower head_dim, e.g. depth 2, head_dim 32 -> width 128.
    """
    if depth < 1 or aspect_ratio < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError("need depth >= 1, aspect_ratio >= 1 and an even head_dim")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, device=None):
    """cos and sin, each (1, seq_len, 1, head_dim) in float32. Dims i and i + head_dim/2 form a
    pair rotated by the same angle, so each half holds the same head_dim/2 angles."""
    inv_freq = ROTARY_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[i], x[i + d/2]) of x (B, T, H, D) by position-dependent angles:
    x * cos + (-x2, x1) * sin, four kernels when eager (a decode step launches this 2 x n_layer times)."""
    d = x.size(-1) // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return torch.addcmul(x * cos.to(x.dtype), rotated, sin.to(x.dtype))


def attention(q, k, v, mask=None):
    """Causal attention for queries q (B, H, Tq, D) that sit at the LAST Tq positions of the
    keys/values k, v (B, Hkv, Tk, D), i.e. at positions Tk - Tq .. Tk - 1. Or, given `mask`
    (additive, broadcastable to (B, H, Tq, Tk): 0 where a query may look, -inf elsewhere),
    attention with exactly that mask (the static decode step: keys past its position are masked)."""
    Tq, Tk = q.size(2), k.size(2)
    if mask is not None and Tq == 1 and k.size(1) != q.size(1):
        # one query per head: the query heads that share a kv head become that head's query
        # positions, so no enable_gqa is needed (the masked fast kernel lacks it: it would fall
        # back to the math kernel); head h uses kv head h // groups, as repeat_interleave has it
        B, H, _, D = q.shape
        y = F.scaled_dot_product_attention(q.view(B, k.size(1), H // k.size(1), D), k, v, attn_mask=mask.to(q.dtype))
        return y.view(B, H, 1, D)
    gqa = {}
    if k.size(1) != q.size(1):
        if SDPA_HAS_GQA:
            gqa = dict(enable_gqa=True)
        else:
            repeats = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), **gqa)
    if Tq == Tk:  # training, or a prefill into an empty cache: plain causal (flash kernels)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    if Tq == 1:  # one new token sees every key
        return F.scaled_dot_product_attention(q, k, v, **gqa)
    # a chunk after a cached prefix: query i sees keys 0 .. Tk - Tq + i
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated as
    k, v: (num_layers, batch, num_kv_heads, seq_len, head_dim). `pos` is how many positions
    are filled; a forward pass with the cache writes positions pos .. pos + t and advances
    pos. Outgrowing seq_len reallocates a larger cache (so pass a generous seq_len)."""

    def __init__(self, batch_size, num_kv_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, batch_size, num_kv_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        # (layer, row, head) indices for write_at, made once rather than at every step
        self.layer_ids = torch.arange(num_layers, device=device)
        self.row_ids = torch.arange(batch_size, device=device).view(-1, 1, 1)
        self.head_ids = torch.arange(num_kv_heads, device=device).view(1, -1, 1)

    @property
    def batch_size(self):
        return self.k.size(1)

    @property
    def seq_len(self):
        return self.k.size(3)

    def reset(self):
        self.pos = 0

    def insert(self, layer, k, v):
        """Write k, v (B, Hkv, t, D) at positions pos .. pos + t of `layer`; return that layer's
        keys and values for positions 0 .. pos + t (views, no copy)."""
        end = self.pos + k.size(2)
        if end > self.seq_len:
            self._grow(end)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_at(self, layer, pos, k, v, length):
        """The static-shape twin of insert() for GPT.decode_step: write k, v (B, Hkv, 1, D) at the
        position held in `pos`, a (1,) LongTensor on the cache's device (no Python int, no host
        sync: a CUDA graph can replay it at every position), and return that layer's keys and values
        for positions 0 .. length - 1 (views; the caller masks those past pos). Never grows, never
        moves self.pos. It indexes the whole cache tensor, not a view of the layer: torch.compile
        then writes in place (through a view, inductor copies the whole cache back every step)."""
        index = (self.layer_ids[layer:layer + 1], self.row_ids, self.head_ids, pos)  # -> (B, Hkv, 1)
        self.k.index_put_(index, k.to(self.k.dtype))
        self.v.index_put_(index, v.to(self.v.dtype))
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]

    def advance(self, t):
        self.pos += t

    def _grow(self, needed):
        new_len = max(needed, 2 * self.seq_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], new_len, old.size(4))
            new[:, :, :, : self.pos] = old[:, :, :, : self.pos]
            setattr(self, name, new)

    def prefill_from(self, other):
        """Copy the filled part of `other` (batch 1, or the same batch size) into every row
        of this cache: prefill a prompt once, then sample several continuations."""
        if other.k.shape[0] != self.k.shape[0] or other.k.shape[2] != self.k.shape[2] or other.k.shape[4] != self.k.shape[4]:
            raise ValueError("KVCache.prefill_from: layers, kv heads and head_dim must match")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"KVCache.prefill_from: cannot copy batch {other.batch_size} into batch {self.batch_size}")
        self.pos = 0
        if other.pos > self.seq_len:
            self._grow(other.pos)
        self.k[:, :, :, : other.pos] = other.k[:, :, :, : other.pos]
        self.v[:, :, :, : other.pos] = other.v[:, :, :, : other.pos]
        self.pos = other.pos

    def expand(self, batch_size):
        """A new cache with `batch_size` rows, each a copy of this batch-1 cache."""
        L, _, H, T, D = self.k.shape
        cache = KVCache(batch_size, H, T, D, L, self.k.device, self.k.dtype)
        cache.prefill_from(self)
        return cache


def refuse_kv_cache_under_compile():
    """Called through torch.compiler.disable, i.e. run eagerly: a `raise` that dynamo traces only
    makes it fall back to eager for the frame, where is_compiling() is False, so nothing is raised."""
    raise RuntimeError("GPT.forward: a KV cache cannot be used under torch.compile (every new position "
                       "would recompile): generate with the uncompiled model")


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def qkv(self, x, cos, sin):
        """Queries, keys and values (B, heads, T, head_dim) of x (B, T, C): rotary, then QK-norm."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        # CUDA autocast runs rms_norm in float32 (torch >= 2.12): back to the dtype v has, the
        # one attention computes in (no-op without autocast)
        q, k = q.to(v.dtype), k.to(v.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, kv_cache, pos=None, mask=None):
        """x (B, T, C). Without `pos`: positions kv_cache.pos .. + T (or 0 .. T - 1 with no cache),
        causal. With `pos` and `mask` (GPT.decode_step): one token per row at the position held
        in the tensor pos; attention reads the first mask.size(-1) cache positions, masked."""
        B, T, C = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if pos is not None:
            k, v = kv_cache.write_at(self.layer_idx, pos, k, v, mask.size(-1))
        elif kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache has another dtype
        y = attention(q, k, v) if mask is None else attention(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, pos=None, mask=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, pos, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Build with GPT(config) (optionally under `torch.device("meta")` and then
    `.to_empty(device=...)`), then ALWAYS call init_weights(): it fills the parameters and
    the rotary tables (non-persistent buffers, so also call it before load_state_dict)."""

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
            raise ValueError("n_embd must be n_head times an even head_dim")
        if config.n_head % config.n_kv_head:
            raise ValueError("n_kv_head must divide n_head")
        self.config = config
        self.padded_vocab_size = -(-config.vocab_size // 64) * 64
        self.wte = nn.Embedding(self.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        self._set_rotary(10 * config.sequence_len, device=None)

    def _set_rotary(self, seq_len, device):
        cos, sin = rotary_tables(seq_len, self.config.n_embd // self.config.n_head, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Embedding ~ N(0, 1); lm_head ~ N(0, 0.001) so the initial loss is ln(vocab_size);
        q, k, v and MLP-in ~ U(-a, a) with std 1/sqrt(n_embd); output projections zero."""
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        a = 3**0.5 * self.config.n_embd**-0.5
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -a, a)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._set_rotary(self.cos.size(1), device=self.wte.weight.device)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", positions=None):
        """idx (B, T) token ids. With a kv_cache, idx holds positions cache.pos .. cache.pos + T
        and the cache is advanced. Returns float32 logits (B, T, vocab_size) when targets is
        None; with `positions` (B,) only the logits at positions[b] of each row, (B, vocab_size),
        which spares the vocab projection of every other position (prefill, letter choice).
        Else the cross-entropy loss (targets == -1 are ignored):
          "mean": mean over the counted targets (0.0, not NaN, when none are counted)
          "sum": their sum;  "none": per-position losses (B, T), 0 where ignored.
        Do not call a torch.compile'd model with a kv_cache: the cache position would be baked
        into the graph and every new position would recompile (it raises RuntimeError); use the
        uncompiled module for generation."""
        if kv_cache is not None and torch.compiler.is_compiling():
            torch.compiler.disable(refuse_kv_cache_under_compile)()  # raised eagerly, see there
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', not {loss_reduction!r}")
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.pos
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"batch of {B} sequences but the KVCache holds {kv_cache.batch_size}")
        self._cover_rotary(t0 + T, idx.device)
        x = self._embed(idx)
        # cast once here, not in every layer's apply_rotary (the same values: q and k have x's dtype)
        cos, sin = self.cos[:, t0:t0 + T].to(x.dtype), self.sin[:, t0:t0 + T].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is None:
            if positions is not None:
                return self._logits(x[torch.arange(B, device=x.device), positions.to(x.device)])
            return self._logits(x)
        flat_x, flat_targets = x.reshape(B * T, -1), targets.reshape(B * T)
        if loss_reduction == "none":
            return self._head_loss(flat_x, flat_targets, "none").view(B, T)
        total = self._head_loss(flat_x, flat_targets, "sum")
        if loss_reduction == "sum":
            return total
        return total / (flat_targets != -1).sum().clamp(min=1)

    def decode_step(self, idx, kv_cache, pos):
        """forward(idx, kv_cache=kv_cache) for one token per row, idx (B, 1), at the position held in
        `pos`, a (1,) LongTensor on the model's device; float32 logits (B, vocab_size). Nothing here
        syncs with the host or changes shape from token to token: attention reads the whole cache and
        masks positions past pos, and the cache is written at pos but not advanced (the caller owns
        the position; pos < kv_cache.seq_len, and the rotary tables must already cover it)."""
        pos = pos.reshape(1)
        x = self._embed(idx)
        cos, sin = self.cos.index_select(1, pos).to(x.dtype), self.sin.index_select(1, pos).to(x.dtype)
        hidden = torch.arange(kv_cache.seq_len, device=idx.device) > pos  # cache positions after pos
        mask = torch.zeros(1, 1, 1, kv_cache.seq_len, dtype=x.dtype, device=idx.device).masked_fill_(hidden, float("-inf"))
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, pos, mask)
        return self._logits(norm(x[:, -1]))

    def _embed(self, idx):
        x = norm(self.wte(idx))
        if torch.is_autocast_enabled(idx.device.type):  # wte is float32: keep the residual stream
            x = x.to(torch.get_autocast_dtype(idx.device.type))  # in the autocast dtype, not float32
        return x

    def _cover_rotary(self, end, device):
        """Make the rotary tables cover positions 0 .. end - 1 on `device`."""
        if end > self.cos.size(1) or self.cos.device != device:
            self._set_rotary(max(2 * end, self.cos.size(1)), device=device)

    def _logits(self, x):
        """float32 soft-capped logits over the real vocab for the final-normed x (..., n_embd)."""
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    def _chunk_loss(self, x, targets, reduction):
        return F.cross_entropy(self._logits(x), targets, ignore_index=-1, reduction=reduction)

    def _head_loss(self, x, targets, reduction):
        """Cross-entropy ("sum" or "none") of rows x (N, n_embd) against targets (N,), computed
        LOSS_CHUNK_LOGITS logits at a time; with autograd on, each chunk is checkpointed: only its
        rows of x are kept and its logits are recomputed in backward (one extra lm_head forward).
        Under torch.compile it stays one piece, as the compiled graphs always had it: inductor fuses
        softcap and cross-entropy and chooses itself what to keep for backward."""
        if torch.compiler.is_compiling():
            return self._chunk_loss(x, targets, reduction)
        rows = max(1, LOSS_CHUNK_LOGITS // self.padded_vocab_size)
        parts = []
        for start in range(0, x.size(0), rows):
            chunk = (x[start:start + rows], targets[start:start + rows], reduction)
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._chunk_loss, *chunk, use_reentrant=False, preserve_rng_state=False))
            else:
                parts.append(self._chunk_loss(*chunk))
        return torch.cat(parts) if reduction == "none" else torch.stack(parts).sum()

    def num_params(self):
        """Parameter counts: embedding (wte), other (every other parameter, lm_head included:
        it is a matmul every token pays for), total."""
        embedding = self.wte.weight.numel()
        total = sum(p.numel() for p in self.parameters())
        return dict(embedding=embedding, other=total - embedding, total=total)

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward):
            6 * (all parameters except the embedding lookup, lm_head included)
          + 12 * n_layer * n_head * head_dim * sequence_len
        The first term is 2 FLOPs per multiply-add times 3 (forward, and backward for
        activations and for weights). The second is attention scores QK^T and the weighted
        sum AV: 2 matmuls * 2 FLOPs * H * D * T per token per layer, times 3; it counts the
        full T x T score matrix (causal masking not discounted), as in PaLM and nanochat."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        return 6 * self.num_params()["other"] + 12 * c.n_layer * c.n_head * head_dim * c.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95)):
        """[AdamW for wte and lm_head, Muon for every 2-D matrix in the blocks].
        The AdamW learning rates are given for width 768 and scaled by (n_embd / 768) ** -0.5.
        weight_decay (decoupled) applies to both. Every param group keeps "initial_lr"; the
        trainer sets group["lr"] = group["initial_lr"] * schedule_multiplier."""
        scale = (self.config.n_embd / 768) ** -0.5
        matrices = list(self.blocks.parameters())
        if len(matrices) + 2 != len(list(self.parameters())) or any(p.dim() != 2 for p in matrices):
            raise RuntimeError("setup_optimizers: a parameter would be left without an optimizer")
        adamw = DistAdamW([dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
                           dict(params=[self.wte.weight], lr=embedding_lr * scale)],
                          betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        muon = Muon(matrices, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return [adamw, muon]
