"""Shared plumbing for every stage: the base dir, device and dtype, distributed
init/teardown, rank-0 printing, timing, atomic writes, clear fatal errors, argparse range
types, sums over ranks and RNG state."""

import argparse
import os
import random
import sys
import tempfile
import traceback
import contextlib
from pathlib import Path

# ---------------------------------------------------------------------------
# Paths


def get_base_dir() -> Path:
    """Where every artifact lives: $SPEEDCHAT_BASE_DIR, default ~/.cache/speedchat."""
    base = os.environ.get("SPEEDCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "speedchat")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------
# Printing, errors, timing


def get_rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs):
    """print() on rank 0 only (every rank when not under torchrun)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class UserError(Exception):
    """Bad input or a missing prerequisite: shown as one line, never a traceback."""


def run_main(main):
    """Run a script's main(): a UserError is one line and exit 1, Ctrl-C exit 130. Under torchrun a
    failing rank (any exception) prints its message and leaves at once: torchrun sees it die and stops
    the other ranks within seconds, where they would otherwise wait in their next collective until the
    NCCL timeout."""
    try:
        main()
    except (UserError, KeyboardInterrupt) as e:
        where = f"rank {get_rank()}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error: {where}{str(e) or 'interrupted'}", file=sys.stderr, flush=True)
        leave(130 if isinstance(e, KeyboardInterrupt) else 1)
    except Exception as e:
        if distributed():
            traceback.print_exc()
            print(f"error: rank {get_rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            leave(1)
        raise


def leave(code):
    """sys.exit(code); in a process group, os._exit: its teardown would wait for the ranks still
    blocked in a collective, and they wait for this one."""
    if distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


# ---------------------------------------------------------------------------
# Atomic files: write to a temp name in the same folder, fsync, rename.


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (created with its folder): one process at a time builds or
    downloads what several ranks may ask for at once. Closing the file releases it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed
    onto `path`, on failure it is removed. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path, data):
    """Write str or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        mode = "w" if isinstance(data, str) else "wb"
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            f.write(data)


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# Device, dtype, distributed

# dense bf16 peak FLOP/s per GPU, for MFU; matched against torch.cuda.get_device_name()
GPU_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


def autodetect_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> str:
    """The --device a script was given (None or '': autodetect), checked once for every script."""
    import torch

    name = name or autodetect_device()
    problem = {"cpu": None, "cuda": None if torch.cuda.is_available() else "no CUDA GPU is visible",
               "mps": None if torch.backends.mps.is_available() else "MPS is not available here"}
    problem = problem.get(name.split(":")[0], "not a device (use cuda, cpu or mps)")
    if problem:
        raise UserError(f"--device {name}: {problem}")
    return name


def get_dtype(device_type: str, training=False):
    """bf16 on CUDA SM80+, fp32 elsewhere; SPEEDCHAT_DTYPE forces bfloat16, float32 or (not for
    training, which would need a gradient scaler) float16."""
    import torch

    allowed = ["bfloat16", "float32"] + ([] if training else ["float16"])
    forced = os.environ.get("SPEEDCHAT_DTYPE")
    if forced and forced not in allowed:
        raise UserError(f"SPEEDCHAT_DTYPE={forced}: use {' or '.join(allowed)}{' to train' * training}")
    if forced:
        return getattr(torch, forced)
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def training_dtype(device_type: str):
    return get_dtype(device_type, training=True)


def peak_flops(device, dtype):
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPU, other GPUs, not bf16): for MFU."""
    import torch

    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS.items() if key in name), None)


def compute_init(device_type: str | None = None, seed: int = 42):
    """Set up the device and, under torchrun, the process group.
    Returns (ddp, rank, local_rank, world_size, device). One process without
    torchrun is the same code with world size 1; under torchrun LOCAL_RANK picks the GPU."""
    # before CUDA starts: the allocator grows segments in place instead of leaving freed blocks of
    # the wrong size (fragmentation is what makes a batch that fits once fail later)
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    import torch
    import torch.distributed as dist

    device = torch.device(resolve_device(device_type))  # "cuda:1" picks one GPU for a single process
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # started by torchrun
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    import torch.distributed as dist

    if distributed():
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for wandb when --run is unset or 'dummy'."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name: str | None, project: str, config: dict, master: bool):
    if not master or not run_name or run_name == "dummy":
        return DummyWandb()
    try:
        import wandb
    except ImportError:  # a run is not worth losing over its dashboard
        print(f"warning: --run {run_name}: wandb is not installed (`uv pip install wandb`): logging here only")
        return DummyWandb()
    return wandb.init(project=project, name=run_name, config=config)


# ---------------------------------------------------------------------------
# Flags, numbers over ranks, RNG state


def checked(kind, ok, what):
    """An argparse type: `kind(text)`, refused unless ok(value) (`what` says what is allowed)."""
    def parse(text):
        value = kind(text)
        if not ok(value):  # `not ok` refuses nan too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value" messages
    return parse


POSITIVE = checked(int, lambda v: v > 0, "positive")
POSITIVE_OR_ALL = checked(int, lambda v: v > 0 or v == -1, "positive, or -1")
STEP = checked(int, lambda v: v >= -1, ">= 0, or -1 for the latest")
RATE = checked(float, lambda v: v >= 0, ">= 0")
POSITIVE_RATE = checked(float, lambda v: v > 0, "positive")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "between 0 and 1")


def parse_args(p, argv=None):
    """Parse, after adding "(default: X)" to each flag's help where X says something."""
    for action in p._actions:  # (`is`: a default of 0 says something, None and False do not)
        if action.help and "default" not in action.help and not (
                action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)):
            action.help += " (default: %(default)s)"
    argv = sys.argv[1:] if argv is None else list(argv)
    return p.parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `torchrun ... -m stage -- --flags` too


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def global_mean(value):
    """The mean of the scalar tensor `value` over all ranks, so every rank logs, and checks for
    NaN, the same number (a rank that stopped alone would leave the others blocked)."""
    import torch.distributed as dist

    if not distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # not AVG: gloo lacks it on some torch versions
    return total / dist.get_world_size()


def sum_over_ranks(counts, device):
    """Small integer counts summed over all ranks in one collective, as Python ints."""
    import torch
    import torch.distributed as dist

    if not distributed():
        return [int(c) for c in counts]
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def get_rng_state(device):
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # this rank's GPU only (touching the others would create contexts there)
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
