"""Muon and DistAdamW: the maths at world size 1, and world size 2 (gloo on CPU) giving the same
parameters as world size 1 on the same global batch."""

import os
import socket

import pytest
import torch

from common import compute_cleanup, compute_init
from conftest import assert_close
from model import GPT, GPTConfig
from optim import DistAdamW, Muon, orthogonalize

QUINTIC = ((3.4445, -4.7750, 2.0315),) * 5  # the classic Newton-Schulz coefficients, for comparison


@pytest.mark.parametrize("shape", [(3, 32, 96), (96, 32), (256, 1024)])
def test_polar_express_gives_tighter_singular_values_than_the_quintic(shape):
    """5 steps each, on matrices with condition numbers of ~10-100: Polar Express lands every
    singular value in [0.85, 1.15] (measured 0.859-1.141), the quintic only in ~[0.68, 1.2]."""
    torch.manual_seed(0)
    G = torch.randn(shape) * torch.logspace(0, 2, shape[-1])
    s_in = torch.linalg.svdvals(G)
    assert (s_in.max(-1).values / s_in.min(-1).values).min() > 10
    polar = torch.linalg.svdvals(orthogonalize(G))
    quintic = torch.linalg.svdvals(orthogonalize(G, coefficients=QUINTIC))
    assert polar.min() > 0.85 and polar.max() < 1.15, (polar.min(), polar.max())
    assert quintic.min() < 0.7  # the old one leaves the small directions at ~0.68
    assert (polar - 1).abs().max() < 0.5 * (quintic - 1).abs().max()
    assert (polar - 1).abs().mean() < (quintic - 1).abs().mean()
    if G.dim() == 3:  # a batch is orthogonalized matrix by matrix
        assert_close(orthogonalize(G), torch.stack([orthogonalize(g) for g in G]), atol=1e-6, rtol=1e-5)


def test_muon_steps_match_the_formula():
    """Nesterov momentum, orthogonalized, shape-scaled, with cautious weight decay: decay only where
    the update has the parameter's sign."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 16), (16, 64), (64, 16)]]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    assert len(opt.param_groups) == 2  # grouped by shape
    expect = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(3):
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (g, e) in enumerate(zip(grads, expect)):
            bufs[i] = 0.9 * bufs[i] + 0.1 * g
            update = max(1, e.size(0) / e.size(1)) ** 0.5 * orthogonalize(0.1 * g + 0.9 * bufs[i])  # Nesterov
            expect[i] = e - 0.05 * (update + 0.1 * e * (update * e >= 0))
            assert 0.2 < (update * e >= 0).float().mean() < 0.8  # the mask is not all or nothing
        for p, e in zip(params, expect):
            assert_close(p.detach(), e, atol=1e-5, rtol=1e-5)


def test_dist_adamw_matches_torch_adamw_at_world_size_1():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 8), (7,), (3, 5)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = DistAdamW([dict(params=ours[:2], lr=0.01), dict(params=ours[2:], lr=0.1)], **kw)
    ref_opt = torch.optim.AdamW([dict(params=ref[:2], lr=0.01), dict(params=ref[2:], lr=0.1)], **kw)
    for _ in range(5):
        for p, r in zip(ours, ref):
            p.grad = torch.randn(p.shape)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        assert_close(p, r, atol=1e-6, rtol=1e-6)


def run_ranks(fn, *args, world=2):
    """fn(rank, *args) in `world` forked processes that find each other as torchrun's would (env://
    on a free local port): seconds faster than torchrun, whose processes import torch again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def rank_main(rank):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        fn(rank, *args)

    torch.multiprocessing.start_processes(rank_main, nprocs=world, start_method="fork")


# A tiny GPT (3 layers: odd same-shape counts, so Muon's stack gets padded; GQA; every parameter
# group of setup_optimizers: embeddings, value embeddings and gates, scalars, smear) plus loose
# parameters covering DistAdamW's sharded, all-reduced and no-gradient paths and a Muon
# group smaller than the world size. Every rank gets its share of one global batch.
STEPS, GLOBAL_B, T, VOCAB = 4, 4, 16, 100


def train(rank=0, world=1, steps=STEPS):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    model.double()  # float64: the ranks' other summation order stays far below the tolerance
    # Adam (eps 1e-10) turns float rounding in near-zero gradients into lr-sized moves. With the
    # output projections at zero the stream is a multiple of x0 until the final norm, so the scalars'
    # first gradients are nothing but rounding: start from small projections instead
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    optimizers = model.setup_optimizers(weight_decay=0.01)
    loose = {name: torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for name, shape in
             [("sharded", (64, 32)), ("odd", (5, 3)), ("vec", (7,)), ("no_grad", (4, 4)), ("lone", (24, 40))]}
    # a large eps makes Adam's step depend on the gradient's scale, so a wrong average shows
    optimizers.append(DistAdamW([loose[n] for n in ("sharded", "odd", "vec", "no_grad")], lr=0.01, eps=0.05,
                                weight_decay=0.1))
    optimizers.append(Muon([loose["lone"]], lr=0.02, weight_decay=0.1))
    data = torch.Generator().manual_seed(1)
    rows = slice(rank * GLOBAL_B // world, (rank + 1) * GLOBAL_B // world)
    for step in range(steps):
        x = torch.randint(0, VOCAB, (GLOBAL_B, T), generator=data)[rows]
        y = torch.randint(0, VOCAB, (GLOBAL_B, T), generator=data)[rows]
        loss = model(x, y)
        feature = x.float().mean(dim=1, keepdim=True) / VOCAB  # the loose params' loss depends on this rank's rows
        for name in ("sharded", "odd", "vec", "lone"):
            loss = loss + (feature * (loose[name].reshape(1, -1) - 0.1 * step) ** 2).mean()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        for p in loose.values():
            p.grad = None
    return {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()} | \
        {f"loose.{k}": v.detach().clone() for k, v in loose.items()}


def _train_rank(rank, out_dir):
    _, rank, _, world, _ = compute_init("cpu")
    assert world == 2
    torch.save(train(rank, world), out_dir / f"rank{rank}.pt")
    compute_cleanup()


def test_world_size_2_equals_world_size_1(tmp_path):
    run_ranks(_train_rank, tmp_path)
    single, start = train(), train(steps=0)  # start: the seeded init, which training must have moved
    for name in ("model.blocks.0.mlp.c_fc.weight", "model.wte.weight", "model.value_embeds.0.weight",
                 "model.blocks.2.attn.ve_gate.weight", "model.resid_lambdas", "model.x0_lambdas",
                 "model.smear_gate.weight", "model.smear_lambda", "model.backout_lambda", "loose.sharded",
                 "loose.lone"):
        assert not torch.allclose(single[name], start[name]), f"{name} did not move in training"
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == single.keys()
    for name, expected in single.items():
        assert torch.equal(r0[name], r1[name]), f"ranks disagree on {name}"
        assert_close(r0[name], expected, atol=1e-6, rtol=1e-6, msg=name)
