"""fp8 matmuls for training the transformer's linear layers (base_train --fp8).

The recipe: dynamic tensorwise scaling, with PyTorch's scaled matmul (torch._scaled_mm).
- forward  y = x @ W^T: x and W are each scaled so that their largest |value| lands on 448,
  the largest float8_e4m3fn (3 mantissa bits, for precision), saturated and cast to e4m3;
  the matmul accumulates in fp32 and multiplies by both inverse scales on the way out.
- backward grad_x = grad_y @ W and grad_W = grad_y^T @ x: grad_y is cast the same way but to
  float8_e5m2 (max 57344, 2 mantissa bits: gradients need range more than precision); x and W
  are the fp8 copies kept from the forward (one byte per saved element instead of two; q, k and v
  each keep their own copy of the shared input, though).
- the scales are recomputed from each tensor's amax at every call, on the device (no host sync,
  no amax history to carry), so tiny and huge tensors get the same relative precision.
- only the block matrices (attention q/k/v/proj and the MLP) use fp8; the embedding and the
  lm_head, which feeds the soft-capped float32 logits, stay in bf16. Master weights stay fp32
  (the gradient comes back in the weight's dtype) and the optimizers do not change.

Float8Linear has the parameters and state_dict keys of nn.Linear: checkpoints of an fp8 run load
into a plain GPT. On CPU torch._scaled_mm works too (slowly), which is how the tests run it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_EPS = 1e-12  # an all-zero tensor gets a finite scale (and stays all zeros)
DIM_MULTIPLE = 16  # torch._scaled_mm on CUDA: the reduced dim and both dims of the 2nd operand


def to_fp8(t, dtype):
    """(t cast to the fp8 `dtype`, inverse scale): t * scale is saturated to the format's range,
    scale = max / amax(t), and t ~= t_fp8 * inverse scale. Both scales stay on t's device."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=AMAX_EPS)
    t_fp8 = (t.float() * (fmax / amax)).clamp(-fmax, fmax).to(dtype)
    return t_fp8, amax / fmax


def scaled_mm(a, b, inv_a, inv_b, out_dtype, fast_accum=False):
    """a @ b * inv_a * inv_b for fp8 a (M, K) row-major and b (K, N) column-major, K and N
    multiples of 16: what CUDA requires, asserted on every device so that the CPU tests catch a
    layout or size mistake too (the CPU kernel would accept it)."""
    a_row_major = a.stride(1) == 1 and a.stride(0) >= a.size(1)
    b_col_major = b.stride(0) == 1 and b.stride(1) >= b.size(0)
    assert a_row_major and b_col_major, ("layout", a.stride(), b.stride())
    assert a.size(1) % DIM_MULTIPLE == b.size(0) % DIM_MULTIPLE == b.size(1) % DIM_MULTIPLE == 0, (a.shape, b.shape)
    return torch._scaled_mm(a, b, scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


def col_major(t):
    """The same matrix laid out column-major (one copy; inductor fuses it into the cast)."""
    return t.t().contiguous().t()


def pad_rows(t):
    """Zero rows appended up to a multiple of 16 (the weight gradient reduces over rows; zeros add nothing)."""
    extra = -t.size(0) % DIM_MULTIPLE
    return F.pad(t, (0, 0, 0, extra)) if extra else t


class Float8Matmul(torch.autograd.Function):
    """y = x @ w^T for x (M, K) and w (N, K), computed in fp8 (see the module docstring).
    M is padded to a multiple of 16 inside (the weight gradient needs it); K and N must be multiples of 16."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        rows = x.size(0)
        x_fp8, x_inv = to_fp8(pad_rows(x), E4M3)
        w_fp8, w_inv = to_fp8(w, E4M3)
        x_fp8, w_fp8 = x_fp8.contiguous(), w_fp8.contiguous()  # no-ops unless handed a transposed tensor
        # Hopper's faster, less precise fp8 accumulation in the forward only, as is usual; the
        # gradients, summed over many more terms (grad W over every token), accumulate fully in fp32
        y = scaled_mm(x_fp8, w_fp8.t(), x_inv, w_inv, out_dtype, fast_accum=True)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.rows, ctx.x_dtype, ctx.w_dtype = rows, x.dtype, w.dtype
        return y[:rows]

    @staticmethod
    def backward(ctx, grad_y):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        g_fp8, g_inv = to_fp8(pad_rows(grad_y), E5M2)
        g_fp8 = g_fp8.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            grad_x = scaled_mm(g_fp8, col_major(w_fp8), g_inv, w_inv, ctx.x_dtype)[:ctx.rows]
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K), straight into the (fp32) weight's dtype
            grad_w = scaled_mm(g_fp8.t().contiguous(), col_major(x_fp8), g_inv, x_inv, ctx.w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) with the matmul in fp8. Output dtype: the autocast dtype when
    autocast is on (as F.linear would give), else x's dtype."""
    autocast = torch.is_autocast_enabled(x.device.type)
    out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    y = Float8Matmul.apply(x.reshape(-1, x.size(-1)), weight, out_dtype)
    y = y.view(*x.shape[:-1], weight.size(0))
    return y if bias is None else y + bias.to(y.dtype)


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in fp8: same parameters, same state_dict keys.
    in_features and out_features must be multiples of 16."""

    def forward(self, x):
        return fp8_linear(x, self.weight, self.bias)

    def extra_repr(self):
        return super().extra_repr() + ", fp8=e4m3/e5m2 tensorwise"


def convert_to_fp8(model):
    """Make every nn.Linear in model.blocks (attention q/k/v/proj, MLP) whose dims are multiples
    of 16 a Float8Linear, in place; wte, the value embeddings, lm_head and the gates (12 or 24
    inputs, a rounding error of a matmul) stay as they are. Returns how many were
    converted. Only the modules' class changes: the Parameter objects are the same ones, so
    optimizers built before or after keep updating the right tensors. Call before torch.compile."""
    count = 0
    for module in model.blocks.modules():
        if type(module) is nn.Linear and module.in_features % DIM_MULTIPLE == module.out_features % DIM_MULTIPLE == 0:
            module.__class__ = Float8Linear
            count += 1
    return count


def fp8_supported(device):
    """(True, "") when fp8 matmuls run on `device`, else (False, why). CUDA needs compute
    capability 8.9+ (Ada, Hopper: H100 is 9.0); CPU works, slowly (for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip:
            return False, "ROCm GPUs use other fp8 formats (e4m3fnuz); this recipe is for NVIDIA GPUs"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return False, (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                           f"fp8 matmuls need 8.9+ (L4, RTX 4090, H100)")
    elif device.type != "cpu":
        return False, f"fp8 matmuls run on CUDA (compute capability 8.9+) or, slowly, on CPU, not on {device.type}"
    try:  # the build may still lack the kernel (e.g. an old torch on CPU)
        a = torch.ones(16, 16, device=device).to(E4M3)
        one = torch.ones((), device=device)
        scaled_mm(a, a.t(), one, one, torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        why = str(e).splitlines()[0]
        return False, f"torch._scaled_mm does not run on {device} with torch {torch.__version__} ({why})"
    return True, ""
