"""Inference benchmark: the Engine's two decode paths against a naive loop that recomputes the
whole sequence every step, on the same random model in the same run, at several batch sizes
(samples of one prompt). Prints prefill and decode throughput and ratios.

    python -m bench.infer_bench                      # CPU: a small model (depth 4), batch 1 and 16
    python -m bench.infer_bench --device cuda        # GPU: depth 20 in bf16, batch 1 and 32

modes: compiled = GPT.decode_step over a static cache under torch.compile(mode="reduce-overhead")
                  (CUDA graphs on a GPU; on CPU inductor's C++ code without graphs, so only the GPU
                  ratio says what the fast path is worth)
       eager    = the plain KV-cached loop, model(ids, kv_cache=cache)
       naive    = no cache: the whole sequence again for every token
In compiled mode the engine launches step t+1 before it reads token t, so its time to the first
token includes one decode step.
prefill = prompt tokens / time to the first sampled token (the engine prefills a prompt once
          for all its samples; the naive loop has no cache, so it runs the prompt for each row)
decode  = generated tokens (all rows) / time from the first to the last sampled token
Each engine mode gets one untimed run per batch size first (it compiles and records the CUDA graph,
as a server's first request would); its time is printed as "first run" (its excess over the best
run is the one-off cost). A mode that raises is reported and left out; the others still run.
"""

import time
import argparse

import torch

from common import get_dtype, resolve_device, run_main, UserError
from engine import Engine, sample_next
from model import GPT, config_from_depth


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
    position onto the vocab (the full logits would also pay the lm_head for every position, which
    flatters the engine)."""
    return model(ids, positions=torch.full((ids.size(0),), ids.size(1) - 1, device=ids.device))


@torch.inference_mode()
def run_naive(model, prompt, batch, gen_len, sampling):
    """The same sampling, recomputing the full (batch, T) sequence every step."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(sampling["seed"])
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)
    sync(device)
    t0, t_first = clock(), None
    for _ in range(gen_len):
        logits = naive_last_logits(model, ids)
        token = sample_next(logits, generator, sampling["temperature"], sampling["top_k"], sampling["top_p"])
        token.tolist()  # a real loop looks at its tokens (stops, streaming): same host sync as the engine
        if t_first is None:
            t_first = clock()
        ids = torch.cat([ids, token[:, None]], dim=1)
    return phases(t0, t_first, clock())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--depth", type=int, default=None, help="model depth (default: 20 on CUDA, 4 elsewhere)")
    p.add_argument("--head-dim", type=int, default=None, help="attention head size (default: 128 on CUDA, 64 elsewhere)")
    p.add_argument("--vocab-size", type=int, default=None, help="model vocabulary size (default: 65536 on CUDA, 8192 elsewhere)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt length in tokens (default: 512 on CUDA, 128 elsewhere)")
    p.add_argument("--gen-len", type=int, default=None, help="tokens to generate per row (default: 128 on CUDA, 32 elsewhere)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated numbers of samples per prompt (default: 1,32 on CUDA, 1,16 elsewhere)")
    p.add_argument("--modes", default="compiled,eager,naive", help="comma-separated among compiled,eager,naive")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0 = torch's default); 1 is faster and steadier for small models on a shared box")
    p.add_argument("--seed", type=int, default=0, help="seed for the random model, prompt and sampling")
    return p.parse_args(argv)


MODES = ("compiled", "eager", "naive")


def build_model(args, device, dtype):
    torch.manual_seed(args.seed)
    config = config_from_depth(args.depth, args.vocab_size, sequence_len=2048, head_dim=args.head_dim)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # random weights big enough that attention and logits are not trivial
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    # every path computes in `dtype` from the same weights: in bf16 the engine would run an fp32
    # model as a bf16 copy anyway (engine.Engine._runner), and the naive loop needs no autocast
    return model.to(dtype).eval()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(resolve_device(args.device))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    args.prompt_len = args.prompt_len or (512 if on_gpu else 128)
    args.gen_len = args.gen_len or (128 if on_gpu else 32)
    args.vocab_size = args.vocab_size or (65536 if on_gpu else 8192)
    args.depth = args.depth or (20 if on_gpu else 4)
    args.head_dim = args.head_dim or (128 if on_gpu else 64)
    if min(args.prompt_len, args.gen_len) < 2:
        raise UserError("--prompt-len and --gen-len must be at least 2")
    try:
        batch_sizes = [int(b) for b in (args.batch_sizes or ("1,32" if on_gpu else "1,16")).split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        raise UserError(f"--modes: choose among {','.join(MODES)}, got {args.modes!r}")
    dtype = get_dtype(device.type)
    model = build_model(args, device, dtype)
    stub = StubTokenizer(args.vocab_size)
    engines = {m: Engine(model, stub, decode=m) for m in modes if m != "naive"}
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=None, seed=args.seed)
    params = model.num_params()["total"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if on_gpu else f'{torch.get_num_threads()} threads'}), "
          f"depth {args.depth}, width {model.config.n_embd}, {params / 1e6:.1f}M params, dtype {dtype}, "
          f"prompt {args.prompt_len}, gen {args.gen_len}, torch {torch.__version__}", flush=True)

    if "naive" in modes:
        run_naive(model, prompt[:16], 2, 4, sampling)  # warm up (allocator, kernels, lazy imports)
    check_agreement(engines, prompt)

    runs, first = {}, {}
    for batch in batch_sizes:
        for mode in list(modes):
            if mode == "naive":
                fn = lambda: run_naive(model, prompt, batch, args.gen_len, sampling)
            else:
                fn = lambda: run_engine(engines[mode], prompt, batch, args.gen_len, sampling)
            try:
                if mode != "naive":
                    first[batch, mode] = sum(fn()["wall"])  # untimed: compiles, records the graph
                runs[batch, mode] = [fn() for _ in range(args.repeats)]
                best = min(sum(r["wall"]) for r in runs[batch, mode])
                print(f"batch {batch} {mode}: best run {best:.3f} s" +
                      (f", first run {first[batch, mode]:.3f} s" if mode != "naive" else ""), flush=True)
            except Exception as e:  # one broken mode should not cost the others' numbers
                print(f"mode {mode} failed at batch {batch}, left out: {one_line(e)}", flush=True)
                modes.remove(mode)
    # CPU seconds only mean something when torch computes on this process's threads
    for kind in (["wall"] if on_gpu else ["wall", "cpu"]):
        report(runs, kind, batch_sizes, modes, args)
    if on_gpu:
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


def one_line(error):
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def check_agreement(engines, prompt, tokens=32):
    """A sanity check, not a test: the greedy continuation of the prompt in every engine mode,
    against the eager engine's (in bf16 a near-tie may flip a token and the rest then differs)."""
    if "eager" not in engines:
        return
    try:
        greedy = {m: e.generate_batch(prompt, max_tokens=tokens, temperature=0.0)[0][0][len(prompt):]
                  for m, e in engines.items()}
    except Exception as e:
        print(f"greedy agreement not checked: {one_line(e)}")
        return
    same = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print("greedy tokens equal to eager's before the first difference: " +
          ", ".join(f"{m} {same(g, greedy['eager'])}/{tokens}" for m, g in greedy.items() if m != "eager"), flush=True)


def report(runs, kind, batch_sizes, modes, args):
    """One table: per batch and mode, the best prefill and decode tok/s, and the decode ratios
    to the slower modes (x naive = this row's decode tok/s over the naive loop's, same batch)."""
    print(f"\n{'wall-clock' if kind == 'wall' else 'per CPU-second (process time)'} throughput, best of {args.repeats}")
    others = [m for m in ("naive", "eager") if m in modes]
    header = (f"{'batch':>5} {'mode':>8} | {'prefill tok/s':>13} | {'decode tok/s':>12} | "
              + " ".join(f"{'x ' + m:>8}" for m in others))
    print(header)
    print("-" * len(header))
    for batch in batch_sizes:
        prefill, decode = {}, {}
        for mode in modes:
            first, rest = (min(r[kind][i] for r in runs[batch, mode]) for i in (0, 1))
            prefill[mode], decode[mode] = args.prompt_len / first, batch * (args.gen_len - 1) / rest
        for mode in modes:
            ratios = " ".join(f"{decode[mode] / decode[m]:>7.2f}x" for m in others)
            print(f"{batch:>5} {mode:>8} | {prefill[mode]:>13,.0f} | {decode[mode]:>12,.0f} | {ratios}", flush=True)


if __name__ == "__main__":
    run_main(main)
