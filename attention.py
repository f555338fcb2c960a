"""Attention for model.py: the kernel and its masks, and the KV cache.

Training (and any forward without a cache) runs Flash Attention 3 from the `kernels` package on a
GPU where it loads AND a tiny call gives SDPA's answer (a loader that succeeds is not enough: on a
GPU the build does not support it dies at the first launch), else PyTorch SDPA; init_attention()
decides once per process and says which. The KV-cached paths always use SDPA with an explicit mask
built from the query positions, which also serves the fixed-shape decode step.
"""

import torch
import torch.nn.functional as F

from common import print0

QK_GAIN = 1.2  # q and k are each multiplied by this after QK-norm (applied as the softmax scale)
FLASH_ATTENTION = None  # the FA3 module, once init_attention() found it working on this GPU
_attention_said = False


def visible(q_pos, num_keys, window):
    """(Tq, num_keys) bool: the query at position q_pos[i] sees key j when j <= q_pos[i] and, with a
    window, q_pos[i] - j < window."""
    behind = q_pos[:, None] - torch.arange(num_keys, device=q_pos.device)
    return (behind >= 0) if window is None else (behind >= 0) & (behind < window)


def attention(q, k, v, window=None, q_pos=None):
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) -> (B, Tq, H, D). Without q_pos, queries and keys are
    the same positions 0..T-1 (training, a prefill without cache); with q_pos (Tq,) the queries sit at
    those positions and the keys at 0..Tk-1 (a KV cache), later keys masked."""
    scale = QK_GAIN**2 / q.size(-1) ** 0.5
    if q_pos is None and FLASH_ATTENTION is not None and q.is_cuda and q.dtype == torch.bfloat16:
        out = FLASH_ATTENTION.flash_attn_func(q, k, v, causal=True, softmax_scale=scale,
                                              window_size=(-1 if window is None else window - 1, 0))
        return out[0] if isinstance(out, tuple) else out
    (B, Tq, H, D), Hkv = q.shape, k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
    if q_pos is None and (window is None or window >= k.size(2)):  # plain causal: the flash kernels
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != Hkv)
        return y.transpose(1, 2)
    mask = visible(torch.arange(Tq, device=q.device) if q_pos is None else q_pos, k.size(2), window)
    if Tq == 1 and H != Hkv:
        # one query per head: the query heads sharing a kv head become its query rows, so the masked
        # kernel needs no enable_gqa (which would send it to the slow math kernel)
        y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask, scale=scale)
        return y.view(B, H, 1, D).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
    return y.transpose(1, 2)


def try_flash_attention(device):
    """(FA3 module, "") when the `kernels` package loads Flash Attention 3 and a tiny windowed call on
    `device` matches SDPA, else (None, why)."""
    try:
        from kernels import get_kernel

        fa3 = get_kernel("varunneal/flash-attention-3").flash_attn_interface
        q, k, v = torch.randn(3, 1, 256, 2, 64, device=device).to(torch.bfloat16).unbind(0)
        out = fa3.flash_attn_func(q, k, v, causal=True, softmax_scale=QK_GAIN**2 / 8, window_size=(127, 0))
        out = out[0] if isinstance(out, tuple) else out
        expected = attention(q, k, v, 128, torch.arange(256, device=device))
        error = (out.float() - expected.float()).abs().max().item()
        return (fa3, "") if error < 0.05 else (None, f"its test call is off by {error:.3g}")
    except Exception as e:  # anything from a missing package to a kernel that cannot launch here
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def init_attention(device):
    """Pick the attention kernel for `device` once per process and say which."""
    global FLASH_ATTENTION, _attention_said
    if torch.device(device).type != "cuda" or _attention_said:
        return
    FLASH_ATTENTION, why = try_flash_attention(device)
    print0("attention: Flash Attention 3" if FLASH_ATTENTION is not None else f"attention: SDPA (no FA3: {why})")
    _attention_said = True


class KVCache:
    """Keys and values of every layer for a batch of sequences, k and v (layers, batch, seq_len,
    kv_heads, head_dim), plus `prev`, each row's last normalized token embedding (for smear). `pos`
    is how many positions are filled; forward() writes pos .. pos + t and advances it, growing the
    cache when it runs out (so pass a generous seq_len)."""

    def __init__(self, config, batch_size, seq_len, device, dtype):
        shape = (config.n_layer, batch_size, seq_len, config.n_kv_head, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.prev = torch.zeros(batch_size, 1, config.n_embd, device=device, dtype=dtype)
        self.pos = 0

    batch_size = property(lambda self: self.k.size(1))
    seq_len = property(lambda self: self.k.size(2))

    def reset(self):
        self.pos = 0
        self.prev.zero_()

    def insert(self, layer, k, v):
        """Write k, v (B, t, Hkv, D) at pos .. pos + t; return the layer's keys and values 0 .. pos + t."""
        end = self.pos + k.size(1)
        if end > self.seq_len:
            self._grow(end)
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def write_at(self, layer, pos, k, v):
        """decode_step's insert(): k, v (B, 1, Hkv, D) written at the position in the (1,) tensor `pos`
        (no host sync, so a CUDA graph can replay it anywhere); returns the layer's whole cache (the
        caller masks what lies past pos). It indexes the whole tensor, not a per-layer view, so that
        torch.compile writes in place rather than copying the cache back."""
        rows = torch.arange(self.batch_size, device=pos.device)[:, None]
        index = (torch.full_like(pos, layer), rows, pos)  # -> (B, 1)
        self.k.index_put_(index, k.to(self.k.dtype))
        self.v.index_put_(index, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def _grow(self, needed):
        length = max(needed, 2 * self.seq_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.size(0), old.size(1), length, *old.shape[3:])
            new[:, :, :self.pos] = old[:, :, :self.pos]
            setattr(self, name, new)

    def prefill_from(self, other):
        """Copy the filled part of `other` (batch 1 or this batch) into every row: prefill a prompt
        once, then sample several continuations."""
        assert other.k.shape[0] == self.k.shape[0] and other.k.shape[3:] == self.k.shape[3:]
        self.reset()
        if other.pos > self.seq_len:
            self._grow(other.pos)
        self.k[:, :, :other.pos] = other.k[:, :, :other.pos]
        self.v[:, :, :other.pos] = other.v[:, :, :other.pos]
        self.prev.copy_(other.prev.expand_as(self.prev))
        self.pos = other.pos
