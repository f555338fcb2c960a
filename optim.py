"""Optimizers: Muon for the 2-D hidden matrices, AdamW for everything else (each param group may
carry its own lr, betas and weight_decay).

Both also do the data-parallel part of training: the trainer does NOT wrap the model in
DDP, it calls backward() on each rank's own micro-batches and then step(). Each optimizer
averages its gradients across ranks, updates only this rank's share of the parameters,
and all-gathers the result, so every rank ends the step with identical parameters.
Without torch.distributed (or at world size 1) there are no collectives and the same
code is a plain single-process optimizer.

  AdamW: each gradient is reduce-scattered along dim 0, the rank updates its row slice
         (and keeps Adam moments for that slice only), then the slices are all-gathered.
         Parameters that are tiny or whose dim 0 does not divide by the world size are
         all-reduced and updated in full on every rank instead.
  Muon:  parameters of the same shape are stacked, the stack is padded to a multiple of the
         world size and reduce-scattered so each rank gets whole matrices; the rank
         orthogonalises its matrices in one batch, then the stack is all-gathered.

Optimizer state therefore lives on the rank that owns it: save one optimizer state_dict
per rank, and resume with the same world size.
Collectives are started with async_op=True so later reductions overlap earlier updates.
"""

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------
# Collectives


def dist_rank_world():
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Pending:
    """A started collective plus what to run once it has finished. It also holds the
    collective's input so that a temporary input lives until the collective is done."""

    def __init__(self, work, then, input):
        self.work, self.then, self.input = work, then, input

    def wait(self):
        self.work.wait()
        self.then()


def reduce_scatter_mean(output, input):
    """Start averaging `input` over ranks, leaving this rank's dim-0 chunk in `output`.
    Returns a handle; call .wait() before reading `output`. We sum and divide rather than use
    ReduceOp.AVG, which older gloo lacks."""
    work = dist.reduce_scatter_tensor(output, input, async_op=True)
    return _Pending(work, lambda: output.div_(dist.get_world_size()), input)


def _grad(p):
    # a parameter that got no gradient still has to join the collectives
    return p.grad if p.grad is not None else torch.zeros_like(p)


# ---------------------------------------------------------------------------
# AdamW


class DistAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay (same maths as torch.optim.AdamW), sharded across
    ranks as described at the top of this file. Param groups may each have their own lr."""

    min_shard_numel = 1024  # smaller parameters are all-reduced: not worth sharding

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        rank, world = dist_rank_world()
        # 1) start every gradient reduction: jobs of (group, param, param part, grad part, pending)
        jobs = []
        for group in self.param_groups:
            for p in group["params"]:
                g = _grad(p)
                if world == 1:
                    jobs.append((group, p, p, g, None))
                elif p.dim() > 0 and p.size(0) % world == 0 and p.numel() >= self.min_shard_numel:
                    rows = p.size(0) // world
                    g_part = torch.empty_like(g[:rows])
                    pending = reduce_scatter_mean(g_part, g.contiguous())
                    jobs.append((group, p, p[rank * rows:(rank + 1) * rows], g_part, pending))
                else:  # averaged in place: p.grad ends up holding the mean gradient
                    pending = _Pending(dist.all_reduce(g, async_op=True), lambda g=g: g.div_(world), g)
                    jobs.append((group, p, p, g, pending))
        # 2) update each part as its gradient lands; all-gather the sharded ones
        gathers = []
        for group, p, p_part, g_part, pending in jobs:
            if pending is not None:
                pending.wait()
            self._update(p_part, g_part, self.state[p], group)
            if p_part is not p:
                send = p_part.clone()  # kept alive until the gather is done
                gathers.append((dist.all_gather_into_tensor(p, send, async_op=True), send))
        for work, _ in gathers:
            work.wait()

    @staticmethod
    def _update(p, g, state, group):
        if not state:
            state["step"] = 0  # a python int: no device sync for the bias correction
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        t = state["step"]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd:
            p.mul_(1 - lr * wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))


# ---------------------------------------------------------------------------
# Muon


# Polar Express (Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and
# Their Application to the Muon Algorithm", arXiv:2505.16932): one odd quintic per step, each the
# minimax-optimal one for the singular-value interval the previous steps leave, computed for 5 steps
# with a 2% safety margin on the input norm (published coefficients). Against the classic fixed
# quintic (3.4445, -4.7750, 2.0315) the singular values land much closer to 1 in the same 5 steps.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G, coefficients=POLAR_EXPRESS):
    """Push every matrix in G (..., rows, cols) towards U V^T of its SVD G = U S V^T (all singular
    values to ~1) with one odd quintic X <- aX + (bA + cA^2)X, A = XX^T, per (a, b, c) of
    `coefficients`. Runs in bf16 on CUDA (tensor cores), in fp32 elsewhere (bf16 matmul on CPU is
    slow, and fp32 keeps the CPU tests exact)."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= Frobenius norm < 1
    batched = X.dim() == 3
    X = X if batched else X.unsqueeze(0)
    for a, b, c in coefficients:  # baddbmm: the scale-and-add rides in the matmul's epilogue
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = torch.baddbmm(X, B, X, beta=a)  # a * X + B @ X
    X = X if batched else X.squeeze(0)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized, for 2-D hidden weight matrices.

    u = orthogonalize(nesterov_momentum(grad)) * max(1, rows/cols) ** 0.5 (the shape factor keeps the
    per-element step comparable for tall matrices), then p -= lr * (u + weight_decay * p * [u * p >= 0]):
    cautious weight decay (Chen et al., "Cautious Weight Decay", arXiv:2510.12402) decays only the
    entries the update already moves towards zero, so decay never fights the gradient's direction.
    The trainer may change group["lr"] and group["momentum"] (warmup) between steps.
    Params are split into one group per shape, so same-shape matrices are stacked and
    orthogonalised in one batched call, and sharded across ranks as whole matrices."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        params = list(params)
        assert params and all(p.dim() == 2 for p in params), "Muon takes a non-empty list of 2-D parameters"
        by_shape = {}
        for p in params:
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        groups = [dict(params=ps) for ps in by_shape.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        rank, world = dist_rank_world()
        # 1) per group: stack the grads, pad to a multiple of the world size, start the reduce-scatter
        reductions = []
        for group in self.param_groups:
            params = group["params"]
            chunk = -(-len(params) // world)  # matrices per rank
            grads = [_grad(p) for p in params]
            grads += [torch.zeros_like(grads[0])] * (chunk * world - len(params))
            stacked = torch.stack(grads)
            if world == 1:
                reductions.append((group, stacked, stacked, None))
            else:
                mine = torch.empty_like(stacked[:chunk])
                reductions.append((group, stacked, mine, reduce_scatter_mean(mine, stacked)))
        # 2) update the matrices this rank owns; all-gather them back into every rank's params
        gathers = []
        for group, stacked, mine, pending in reductions:
            if pending is not None:
                pending.wait()
            params = group["params"]
            owned = params[rank * len(mine):(rank + 1) * len(mine)]  # fewer than len(mine) at the tail
            if owned:
                self._update(owned, mine[: len(owned)], group)
            if world > 1:
                # `mine` becomes the send buffer and `stacked` the receive buffer (both free now)
                if owned:
                    torch._foreach_copy_(list(mine[: len(owned)].unbind(0)), owned)
                work = dist.all_gather_into_tensor(stacked, mine, async_op=True)
                gathers.append((work, params, stacked))
        for work, params, stacked in gathers:
            work.wait()
            torch._foreach_copy_(params, list(stacked[: len(params)].unbind(0)))

    def _update(self, params, grads, group):
        """params: list of k same-shape matrices; grads: their (k, rows, cols) averaged gradients
        (overwritten here)."""
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        gs = list(grads.unbind(0))
        torch._foreach_lerp_(bufs, gs, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
        torch._foreach_lerp_(gs, bufs, momentum)  # Nesterov: g = (1 - momentum) * g + momentum * buf
        rows, cols = params[0].shape
        update = orthogonalize(grads).to(params[0].dtype) * max(1.0, rows / cols) ** 0.5
        if wd:
            stacked = torch.stack(params)
            update.addcmul_(stacked, (update * stacked >= 0).to(update.dtype), value=wd)
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr)
