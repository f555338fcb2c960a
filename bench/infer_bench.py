"""Inference benchmark: the KV-cached Engine against a naive loop that recomputes the whole
sequence every step, on the same random model in the same run, at batch 1 and batch 16
(samples of one prompt). Prints prefill and decode throughput and the engine/naive ratios.

    python -m bench.infer_bench                      # CPU: a small model (depth 4)
    python -m bench.infer_bench --device cuda        # GPU: depth 20, the speedrun's model

prefill = prompt tokens / time to the first sampled token (the engine prefills a prompt once
          for all its samples; the naive loop has no cache, so it runs the prompt for each row)
decode  = generated tokens (all rows) / time from the first to the last sampled token
"""

import time
import argparse
import contextlib

import torch

from common import autodetect_device, get_dtype, run_main, UserError
from engine import Engine, sample_next
from model import GPT, LOGIT_SOFTCAP, config_from_depth, norm


class StubTokenizer:
    """Just the special-token ids the Engine asks for, placed outside the model's vocab so a
    random model never samples a stop token and every run generates exactly --gen-len tokens."""

    def __init__(self, vocab_size):
        names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
        self.ids = {name: vocab_size + i for i, name in enumerate(names)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device):
    dtype = get_dtype(device.type)
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def clock():
    """(wall seconds, CPU seconds of this process): on a shared CPU box the second one says
    what the work costs when nothing else competes for the cores."""
    return time.perf_counter(), time.process_time()


def phases(t0, t_first, t_end):
    """{"wall"|"cpu": (seconds to the first token, seconds from the first to the last token)}"""
    return {kind: (t_first[i] - t0[i], t_end[i] - t_first[i]) for i, kind in enumerate(("wall", "cpu"))}


@torch.inference_mode()
def run_engine(engine, prompt, batch, gen_len, sampling):
    device = next(engine.model.parameters()).device
    sync(device)
    t0, t_first = clock(), None
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=gen_len, **sampling):
        if t_first is None:
            t_first = clock()  # the column is on the host: the GPU work is done
    return phases(t0, t_first, clock())


def naive_last_logits(model, ids):
    """The model's forward over the whole sequence, without a cache, projecting only the last
    position onto the vocab (the full model(ids) would also pay the lm_head for every position,
    which flatters the engine). Checked against model(ids) once in main()."""
    T = ids.size(1)
    if T > model.cos.size(1):
        model._set_rotary(2 * T, device=ids.device)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    x = norm(model.wte(ids))
    for block in model.blocks:
        x = block(x, cos, sin, None)
    logits = model.lm_head(norm(x[:, -1, :]))[..., : model.config.vocab_size].float()
    return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


@torch.inference_mode()
def run_naive(model, prompt, batch, gen_len, sampling):
    """The same sampling, recomputing the full (batch, T) sequence every step."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling["seed"])
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)
    sync(device)
    t0, t_first = clock(), None
    with autocast_for(device):
        for _ in range(gen_len):
            logits = naive_last_logits(model, ids)
            token = sample_next(logits, generator, sampling["temperature"], sampling["top_k"], sampling["top_p"])
            token.tolist()  # a real loop looks at its tokens (stops, streaming): same host sync as the engine
            if t_first is None:
                t_first = clock()
            ids = torch.cat([ids, token[:, None]], dim=1)
    return phases(t0, t_first, clock())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Prefill/decode throughput: KV-cached Engine vs naive recompute.")
    p.add_argument("--device", default=None, help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--depth", type=int, default=None, help="model depth (default: 20 on CUDA, 4 elsewhere)")
    p.add_argument("--head-dim", type=int, default=None, help="attention head size (default: 128 on CUDA, 64 elsewhere)")
    p.add_argument("--vocab-size", type=int, default=None, help="model vocabulary size (default: 65536 on CUDA, 8192 elsewhere)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt length in tokens (default: 512 on CUDA, 128 elsewhere)")
    p.add_argument("--gen-len", type=int, default=None, help="tokens to generate per row (default: 128 on CUDA, 32 elsewhere)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated numbers of samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0 = torch's default); 1 is faster and steadier for small models on a shared box")
    p.add_argument("--seed", type=int, default=0, help="seed for the random model, prompt and sampling")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or autodetect_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    args.prompt_len = args.prompt_len or (512 if on_gpu else 128)
    args.gen_len = args.gen_len or (128 if on_gpu else 32)
    args.vocab_size = args.vocab_size or (65536 if on_gpu else 8192)
    if min(args.prompt_len, args.gen_len) < 2:
        raise UserError("--prompt-len and --gen-len must be at least 2")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    depth = args.depth or (20 if on_gpu else 4)
    head_dim = args.head_dim or (128 if on_gpu else 64)
    torch.manual_seed(args.seed)
    config = config_from_depth(depth, args.vocab_size, sequence_len=2048, head_dim=head_dim)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # random weights big enough that attention and logits are not trivial
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval()
    engine = Engine(model, StubTokenizer(args.vocab_size))
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=None, seed=args.seed)
    params = model.num_params()["total"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} threads'}), "
          f"depth {depth}, width {config.n_embd}, {params / 1e6:.1f}M params, dtype {engine._compute_dtype()}, "
          f"prompt {args.prompt_len}, gen {args.gen_len}", flush=True)

    with torch.inference_mode(), autocast_for(device):
        check = torch.tensor([prompt[:32]], device=device)
        if not torch.allclose(naive_last_logits(model, check), model(check)[:, -1], atol=1e-2 if on_gpu else 1e-4):
            raise RuntimeError("naive_last_logits no longer matches model.forward: update it to follow model.py")
    # warm up both paths (allocator, kernels, lazy imports)
    run_engine(engine, prompt[:16], 2, 4, sampling)
    run_naive(model, prompt[:16], 2, 4, sampling)

    results = {}
    for batch in batch_sizes:
        runs = {name: [fn(batch) for _ in range(args.repeats)] for name, fn in
                (("engine", lambda b: run_engine(engine, prompt, b, args.gen_len, sampling)),
                 ("naive", lambda b: run_naive(model, prompt, b, args.gen_len, sampling)))}
        results[batch] = runs
    # CPU seconds only mean something when torch computes on this process's threads
    kinds = ["wall"] if on_gpu else ["wall", "cpu"]
    for kind in kinds:
        print(f"\n{'wall-clock' if kind == 'wall' else 'per CPU-second (process time)'} throughput, best of {args.repeats}")
        header = (f"{'batch':>5} | {'prefill tok/s engine':>20} {'naive':>10} {'ratio':>6} | "
                  f"{'decode tok/s engine':>19} {'naive':>10} {'ratio':>6}")
        print(header)
        print("-" * len(header))
        for batch, runs in results.items():
            (e_first, e_decode), (n_first, n_decode) = [
                (min(r[kind][0] for r in runs[name]), min(r[kind][1] for r in runs[name])) for name in ("engine", "naive")]
            decode_tokens = batch * (args.gen_len - 1)
            ep, np_ = args.prompt_len / e_first, args.prompt_len / n_first
            ed, nd = decode_tokens / e_decode, decode_tokens / n_decode
            print(f"{batch:>5} | {ep:>20,.0f} {np_:>10,.0f} {ep / np_:>5.1f}x | "
                  f"{ed:>19,.0f} {nd:>10,.0f} {ed / nd:>5.1f}x", flush=True)

if __name__ == "__main__":
    run_main(main)
