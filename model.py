"""The GPT: a decoder-only transformer with the 2026 speedrun architecture.

Base: token embedding then RMSNorm (no learnable gains anywhere), rotary positions, QK-norm,
grouped-query attention, pre-norm blocks with a 4x ReLU^2 MLP, no biases, untied embedding and
lm_head, logits soft-capped at 15 in float32, vocab padded to a multiple of 64. Each addition was
measured as a gain at d12-d26 (nanochat's log, modded-nanogpt's records):
- value embeddings on alternating layers (the last layer's parity): a vocab x kv_dim table of the
  input tokens added to V, gated per kv head by 3*sigmoid(W x[..., :12]); capacity for a lookup's
  cost, no FLOPs (the biggest single gain)
- residual scalars: before block i, x = resid[i] * x + x0[i] * x0 (x0 the stream's input
  embedding), so each layer can re-read the token and damp the stream
- smear: e[t] += smear * sigmoid(W e[t, :24]) * e[t-1], a cheap bigram look-back (the KV cache
  keeps the last embedding, so decoding smears too)
- backout: backout * (the stream halfway up) is subtracted before the final norm, taking the early
  layers' context-building features out of what the lm_head reads
- sliding windows, a pattern tiled over layers (S: a quarter of the context rounded up to 128; L:
  all; the last layer always L): local layers cost less, the long ones keep the whole context
- q.k scaled by 1.2^2 after QK-norm (sharper attention than unit vectors allow); rotary base
  100,000 (slower rotations for the long layers); the init of init_weights()
The attention kernels and the KV cache live in attention.py. With a KV cache, forward()
takes any number of tokens at the cache's Python-int position (prefill, the plain decode loop), and
decode_step() one token per row at a position in a device tensor, in shapes that never change, so
that torch.compile can capture it in a CUDA graph (engine.py). pretraining_recipe, at the end, carries
the d12-tuned training constants (batch, learning rates, weight decay) to any size and horizon.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import attention, init_attention

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 100_000.0
VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of the block input
SMEAR_CHANNELS = 24    # the smear gate reads this many channels of the embedding
# The eager loss computes lm_head -> float32 -> softcap -> cross-entropy for this many logits at a
# time (2**27 float32 = 0.5 GB) and recomputes them in backward: in one piece autograd would keep
# tens of GB of float32 logits at d20.
LOSS_CHUNK_LOGITS = 2**27


@dataclass
class GPTConfig:
    """Everything needed to rebuild the model (saved with each checkpoint)."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # per-layer attention windows, tiled: S short, L the whole context


def config_from_depth(depth, vocab_size, sequence_len=2048, aspect_ratio=64, head_dim=128, n_kv_head=None,
                      window_pattern="SSSL"):
    """The one complexity dial: n_layer = depth, n_embd = depth * aspect_ratio rounded up to a multiple
    of head_dim, n_head = n_embd // head_dim, n_kv_head = n_head unless given (must divide n_head).
    depth 24 -> width 1536, 12 heads of 128. For tiny CPU models lower head_dim."""
    assert depth >= 1 and aspect_ratio >= 1 and head_dim >= 2 and head_dim % 2 == 0
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=n_embd,
                     window_pattern=window_pattern)


def layer_windows(config):
    """Keys each layer's queries see, themselves included: None = all (L), else the short window
    (S: sequence_len / 4 rounded up to a multiple of 128). The last layer is always L."""
    short = -(-config.sequence_len // 4 // 128) * 128
    windows = [short if config.window_pattern[i % len(config.window_pattern)] == "S" else None
               for i in range(config.n_layer)]
    return windows[:-1] + [None]


def has_value_embedding(layer, n_layer):
    return layer % 2 == (n_layer - 1) % 2


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, device=None):
    """cos and sin, each (1, seq_len, 1, head_dim) in float32; dims i and i + head_dim/2 form a pair."""
    inv_freq = ROTARY_BASE ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[i], x[i + d/2]) of x (B, T, H, D) by position-dependent angles."""
    d = x.size(-1) // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return torch.addcmul(x * cos.to(x.dtype), rotated, sin.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = (nn.Linear(channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, kv_cache, q_pos, static):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view_as(v).to(v.dtype)
        # QK-norm; CUDA autocast runs rms_norm in float32: back to v's dtype, the one attention uses
        q = norm(apply_rotary(q, cos, sin)).to(v.dtype)
        k = norm(apply_rotary(k, cos, sin)).to(v.dtype)
        if static:
            k, v = kv_cache.write_at(self.layer_idx, q_pos, k, v)
        elif kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        y = attention(q, k, v, self.window, q_pos)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache, q_pos, static):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache, q_pos, static)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Build with GPT(config) (optionally under `torch.device("meta")`, then `.to_empty(device=...)`),
    then ALWAYS call init_weights(): it fills the parameters and the rotary tables (non-persistent
    buffers, so call it before load_state_dict too) and picks the attention kernel."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and (config.n_embd // config.n_head) % 2 == 0
        assert config.n_head % config.n_kv_head == 0
        assert config.window_pattern and set(config.window_pattern) <= {"S", "L"}, config.window_pattern
        self.config = config
        self.padded_vocab_size = -(-config.vocab_size // 64) * 64
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        # embeddings and rotary tables left unfilled: init_weights sets every weight and computes the
        # tables (any math on the meta device, where checkpoints are built, imports torch._dynamo: ~1 s)
        vocab = self.padded_vocab_size
        embedding = lambda dim: nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim))  # noqa: E731
        self.wte = embedding(config.n_embd)
        self.value_embeds = nn.ModuleDict({str(i): embedding(kv_dim)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.smear_gate = nn.Linear(min(SMEAR_CHANNELS, config.n_embd), 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.blocks = nn.ModuleList(Block(config, i, w) for i, w in enumerate(layer_windows(config)))
        self.backout_lambda = nn.Parameter(torch.zeros(()))
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        rotary_shape = (1, 10 * config.sequence_len, 1, config.n_embd // config.n_head)
        self.register_buffer("cos", torch.empty(rotary_shape), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_shape), persistent=False)

    def _set_rotary(self, seq_len, device):
        cos, sin = rotary_tables(seq_len, self.config.n_embd // self.config.n_head, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """lm_head near zero (initial loss ln(vocab)); q, k, v and the value embeddings with std
        1/sqrt(n_embd), the MLP input at 0.4 of that (a calmer start for the wide ReLU^2 layer); output
        projections zero, so each block starts as the identity; gates near zero (value gates ~1.5)."""
        c = self.config
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        a = 3**0.5 * c.n_embd**-0.5
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -a, a)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * a, 0.4 * a)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -a, a)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        depth = torch.linspace(0, 1, c.n_layer)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        self._set_rotary(self.cos.size(1), device=self.wte.weight.device)
        init_attention(self.wte.weight.device)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", positions=None):
        """idx (B, T) token ids; with a kv_cache they sit at positions cache.pos .. + T and the cache
        advances. Without targets: float32 logits (B, T, vocab_size), or with `positions` (B,) only
        those at positions[b] of each row, (B, vocab_size) (spares the vocab projection elsewhere).
        With targets, the cross-entropy (targets == -1 ignored): "mean" over the counted targets (0.0
        when none), "sum", or "none" (B, T) with 0 where ignored."""
        assert loss_reduction in ("mean", "sum", "none")
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.pos
        assert kv_cache is None or kv_cache.batch_size == B
        if t0 + T > self.cos.size(1) or self.cos.device != idx.device:  # grow the rotary tables on demand
            self._set_rotary(max(2 * (t0 + T), self.cos.size(1)), device=idx.device)
        q_pos = None if kv_cache is None else torch.arange(t0, t0 + T, device=idx.device)
        x = self._trunk(idx, kv_cache, q_pos, static=False)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:
            if positions is not None:
                return self._logits(x[torch.arange(B, device=x.device), positions.to(x.device)])
            return self._logits(x)
        flat_x, flat_targets = x.reshape(B * T, -1), targets.reshape(B * T)
        if loss_reduction == "none":
            return self._head_loss(flat_x, flat_targets, "none").view(B, T)
        total = self._head_loss(flat_x, flat_targets, "sum")
        return total if loss_reduction == "sum" else total / (flat_targets != -1).sum().clamp(min=1)

    def decode_step(self, idx, kv_cache, pos):
        """forward(idx, kv_cache=kv_cache) for one token per row, idx (B, 1), at the position held in
        `pos`, a (1,) LongTensor on the model's device; float32 logits (B, vocab_size). Nothing here
        syncs with the host or changes shape from token to token: attention reads the whole cache and
        masks positions past pos, and the cache is written at pos but not advanced (the caller owns
        the position; pos < kv_cache.seq_len, and the rotary tables must already cover it)."""
        return self._logits(self._trunk(idx, kv_cache, pos.reshape(1), static=True)[:, -1])

    def _trunk(self, idx, kv_cache, q_pos, static):
        """The final-normed hidden states (B, T, n_embd) of idx."""
        T = idx.size(1)
        cos, sin = (self.cos[:, :T], self.sin[:, :T]) if q_pos is None else \
            (self.cos.index_select(1, q_pos), self.sin.index_select(1, q_pos))
        x = x0 = self._embed(idx, kv_cache)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # cast once, not in every layer
        for i, block in enumerate(self.blocks):
            if i == self.config.n_layer // 2:
                halfway = x
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if block.attn.ve_gate is not None else None
            x = block(x, ve, cos, sin, kv_cache, q_pos, static)
        return norm(x - self.backout_lambda * halfway)

    def _embed(self, idx, kv_cache):
        """Normalized token embeddings, smeared with the previous token's (the cache's for the first)."""
        e = norm(self.wte(idx))
        if torch.is_autocast_enabled(idx.device.type):  # wte is float32: keep the residual stream
            e = e.to(torch.get_autocast_dtype(idx.device.type))  # in the autocast dtype, not float32
        if kv_cache is None:
            before = F.pad(e[:, :-1], (0, 0, 1, 0))
        else:
            before = torch.cat([kv_cache.prev.to(e.dtype), e[:, :-1]], dim=1)
            kv_cache.prev.copy_(e[:, -1:])
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(e[..., :self.smear_gate.in_features]))
        return e + gate * before

    def _logits(self, x):
        """float32 soft-capped logits over the real vocab for final-normed x (..., n_embd)."""
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    def _chunk_loss(self, x, targets, reduction):
        return F.cross_entropy(self._logits(x), targets, ignore_index=-1, reduction=reduction)

    def _head_loss(self, x, targets, reduction):
        """Cross-entropy ("sum" or "none") of rows x (N, n_embd) against targets (N,), LOSS_CHUNK_LOGITS
        logits at a time, each chunk checkpointed under autograd (its logits are recomputed in
        backward). Under torch.compile it stays one piece: inductor fuses softcap and cross-entropy."""
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
        """Parameter counts. embedding: the lookup tables (wte and value embeddings), which cost no
        FLOPs; scaling: the transformer matrices plus lm_head, the count the training horizon is
        proportional to (tokens = ratio x scaling); total: everything."""
        embedding = self.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        scaling = sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()
        return dict(embedding=embedding, scaling=scaling, total=sum(p.numel() for p in self.parameters()))

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 x (every parameter but the lookup tables)
        for the matmuls (2 per multiply-add, x3 for forward and both backward products), plus
        attention's QK^T and AV: 12 x n_head x head_dim x the keys each layer's queries see (its
        window, or the whole sequence_len), counting the full window (no causal discount), as PaLM
        and nanochat do."""
        c = self.config
        params = self.num_params()
        keys = sum(min(w or c.sequence_len, c.sequence_len) for w in layer_windows(c))
        return 6 * (params["total"] - params["embedding"]) + 12 * c.n_embd * keys

    def setup_optimizers(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0,
                         scalar_lr=0.5):
        """[AdamW for the embeddings, lm_head and scalars; Muon for the block matrices (gates
        included)]. weight_decay is Muon's only: each AdamW group has its own small fixed decay and
        betas (an embedding-rate decay of 0.1 would shrink the embeddings by e^-15 in 1,000 steps).
        The embedding/unembedding learning rates are for width 768, scaled by (n_embd / 768) ** -0.5.
        Every group keeps "initial_lr" for the trainer's schedule."""
        from optim import DistAdamW, Muon  # here, not at the top: an exported model.py runs without optim.py

        scale = (self.config.n_embd / 768) ** -0.5
        groups = [  # lm_head and embeddings: slow second moments, they see rare tokens rarely
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
            dict(params=[self.wte.weight], lr=embedding_lr * scale, betas=(0.8, 0.995), weight_decay=0.001),
            dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale / 2, betas=(0.8, 0.995),
                 weight_decay=0.01),
            # the residual scalars multiply the whole stream at every layer: a small step, pulled to 0
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
            dict(params=[self.smear_gate.weight, self.smear_lambda, self.backout_lambda], lr=0.2,
                 betas=(0.8, 0.95), weight_decay=0.0),
        ]
        adamw = DistAdamW(groups, eps=1e-10)
        muon = Muon(self.blocks.parameters(), lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        optimized = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
        assert len(optimized) == len({id(p) for p in optimized}) == len(list(self.parameters()))
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return [adamw, muon]


# The pretraining recipe. Its constants were tuned on a d12 model (768 wide) at 2^19 tokens per step
# (nanochat's log); these rules carry them to any size. plan.py and base_train both call
# pretraining_recipe, so the plan and the run cannot disagree.

REFERENCE_DEPTH, REFERENCE_BATCH = 12, 2**19
MUON_WEIGHT_DECAY = 0.28  # at the reference


def pretraining_recipe(model, ratio, total_batch_size=-1, tokens_per_micro_step=1, weight_decay=MUON_WEIGHT_DECAY,
                       scale_lr=True):
    """dict(tokens, reference_tokens, total_batch_size, num_iterations, lr_scale, weight_decay) for
    training `model` (real or on the meta device) on ratio x its scaling parameters (num_params):
    - tokens D = ratio x the matrices and lm_head: their count, not the lookup tables', sets the compute;
    - total batch (given, or <= 0: 2^19 x (D / D_ref)^0.383, D_ref the same ratio at d12, rounded to a
      power of two): the best batch grows as a power of the tokens (Power Lines, arXiv:2505.13738);
      then rounded to a multiple of tokens_per_micro_step;
    - every learning rate x sqrt(B / 2^19) (scale_lr): the gradient's noise falls as 1/sqrt(B) (Adam's
      square-root rule, used for Muon too);
    - Muon's weight decay x (B / 2^19) / lr scale x D_ref / D, which is sqrt(B / 2^19) x D_ref / D with
      the rule above: keeps the decay's timescale B / (lr x decay x D) at the d12 value, i.e. the same
      total decay over a run of any length (the AdamW groups keep their own fixed decay)."""
    c = model.config
    with torch.device("meta"):
        reference = GPT(config_from_depth(REFERENCE_DEPTH, c.vocab_size, sequence_len=c.sequence_len))
    tokens, reference_tokens = ratio * model.num_params()["scaling"], ratio * reference.num_params()["scaling"]
    if total_batch_size <= 0:
        total_batch_size = 2 ** round(math.log2(REFERENCE_BATCH * (tokens / reference_tokens) ** 0.383))
    total_batch_size = max(1, round(total_batch_size / tokens_per_micro_step)) * tokens_per_micro_step
    batch_ratio = total_batch_size / REFERENCE_BATCH
    lr_scale = batch_ratio**0.5 if scale_lr else 1.0
    return dict(tokens=tokens, reference_tokens=reference_tokens, total_batch_size=total_batch_size,
                num_iterations=max(1, round(tokens / total_batch_size)), lr_scale=lr_scale,
                weight_decay=weight_decay * batch_ratio / lr_scale * reference_tokens / tokens)
