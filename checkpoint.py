"""Checkpoints: save / load / resume, atomic, safe to load, with everything needed to rebuild the model.

Layout, one folder per stage and model tag:

    $SPEEDCHAT_BASE_DIR/checkpoints/<stage>/<tag>/
        model_<step>.safetensors     model weights (rank 0)
        optim_<step>_rank<r>.pt      optimizer state + per-rank extras (every rank writes its own)
        meta_<step>.json             model config, training config, step, loss, dataloader state, ...
        .lock                        pid and host of the run training into this folder (acquire_lock)

Loading never runs code: weights are safetensors, meta is JSON, and optimizer shards are read with
torch.load(weights_only=True), which only rebuilds tensors, numbers, strings, lists and dicts.
Folders of the older pickle format (model_<step>.pt) are refused with the command that converts
them once: `python -m checkpoint --convert DIR` (also weights_only, so it runs no code either).

Every file is written to a temp name and renamed (common.atomic_path), and meta is written
LAST: a step is "complete" only when its meta exists, and listings ignore incomplete steps.
So a run killed mid-save leaves at worst an orphan file that nothing trusts.
Under torchrun every rank must see the same folder (one node, or a shared filesystem).
"""

import argparse
import fcntl
import json
import os
import pickle
import re
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import UserError, atomic_path, atomic_write, get_base_dir, get_rank, print0, run_main

STAGES = ("base", "mid", "sft", "rl")
# which script produces each stage (for "run X first" messages)
STAGE_SCRIPTS = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}
META_RE = re.compile(r"^meta_(\d+)\.json$")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def checkpoint_dir(stage, tag) -> Path:
    assert stage in STAGES, stage
    if not TAG_RE.fullmatch(tag):  # the tag names a folder: no '..', no '/', nothing outside the base dir
        raise UserError(f"model tag {tag!r} must be letters, digits, '.', '_' or '-', starting with a letter or digit")
    return get_base_dir() / "checkpoints" / stage / tag


def _model_path(directory, step):
    return Path(directory) / f"model_{step:06d}.safetensors"


def _meta_path(directory, step):
    return Path(directory) / f"meta_{step:06d}.json"


def _optim_path(directory, step, rank):
    return Path(directory) / f"optim_{step:06d}_rank{rank}.pt"


def list_steps(directory) -> list[int]:
    """Complete steps in `directory` (meta and model both present), ascending."""
    directory = Path(directory)
    names = set(os.listdir(directory)) if directory.is_dir() else set()
    steps = [int(m.group(1)) for m in map(META_RE.match, names) if m]
    return sorted(s for s in steps if _model_path(directory, s).name in names)


def find_last_step(directory) -> int | None:
    """The latest complete step in `directory`, or None when there is none."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def find_last_tag(stage) -> str | None:
    """The most recently written tag (by mtime) that holds at least one complete step."""
    root = get_base_dir() / "checkpoints" / stage
    tags = [d for d in root.iterdir() if d.is_dir() and list_steps(d)] if root.is_dir() else []
    return max(tags, key=lambda d: d.stat().st_mtime).name if tags else None


def clean_state_dict(state_dict) -> dict:
    """Drop the prefixes that torch.compile ("_orig_mod.") and DDP ("module.") add to keys."""
    return {re.sub(r"^(?:_orig_mod\.|module\.)+", "", k): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------
# One run per folder

_held_locks = {}  # folder -> its open .lock file, held until this process exits


def acquire_lock(stage, tag) -> Path:
    """Make this run the only one training into checkpoints/<stage>/<tag>, or refuse in one line
    naming the owner. Every rank may call it; rank 0 takes the lock. It is an flock on `.lock`, which
    the kernel drops when its owner dies: the lock of a killed run is simply taken over, and the
    temp files of a save it did not finish are removed."""
    directory = checkpoint_dir(stage, tag)
    if get_rank() != 0 or directory in _held_locks:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    lock = open(directory / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{directory} is in use by {owner}: wait for that run to finish or stop it, "
                        f"or train under another --model-tag") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    for stale in directory.glob(".*.tmp"):  # common.atomic_path's temp names
        stale.unlink(missing_ok=True)
    _held_locks[directory] = lock
    return directory


# ---------------------------------------------------------------------------
# Save


def write_weights(path, state_dict):
    """A model's weights as safetensors at `path`, written atomically, under their plain names."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in clean_state_dict(state_dict).items()}, tmp)


def save_checkpoint(stage, tag, step, model, optimizers, meta: dict, rank=0, rank_state=None, keep_last=None):
    """Save one step. Every rank calls this: rank 0 writes the model and meta, each rank writes
    its own optimizer shard (plus `rank_state`, any per-rank extras such as RNG or dataloader
    state: tensors, numbers, strings, lists, tuples, dicts). Meta is written last, after all ranks
    have finished their shards."""
    directory = checkpoint_dir(stage, tag)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_weights(_model_path(directory, step), model.state_dict())
    if optimizers is not None or rank_state is not None:
        shard = {"optimizers": [opt.state_dict() for opt in (optimizers or [])], "rank_state": rank_state}
        with atomic_path(_optim_path(directory, step, rank)) as tmp:
            torch.save(shard, tmp)
    _barrier()  # every shard is on disk before the step is marked complete
    if rank == 0:
        meta = dict(meta, step=step)
        atomic_write(_meta_path(directory, step), json.dumps(meta, indent=2, default=_json_default))
        print0(f"saved checkpoint {directory.name}/step {step} to {directory}")
    if keep_last:
        _barrier()  # every rank sees the new step as complete before pruning
        prune_checkpoints(directory, keep_last, rank)
    _barrier()


def prune_checkpoints(directory, keep_last, rank=0):
    """Keep the newest `keep_last` complete steps. Rank 0 deletes the older steps' meta (first, so a
    half-deleted step is already incomplete) and model; each rank deletes its own optimizer shards
    of every other step (leftovers of interrupted saves included)."""
    steps = list_steps(directory)
    keep = set(steps[-keep_last:])
    if rank == 0:
        for step in steps[:-keep_last]:
            _meta_path(directory, step).unlink(missing_ok=True)
            _model_path(directory, step).unlink(missing_ok=True)
    for path in Path(directory).glob(f"optim_*_rank{rank}.pt"):
        if int(path.name.split("_")[1]) not in keep:
            path.unlink(missing_ok=True)


def clear_checkpoints(directory):
    """Remove every step in `directory` (a fresh run replacing an old one). Metas go first."""
    for pattern in ("meta_*.json", "model_*.safetensors", "optim_*_rank*.pt"):
        for p in Path(directory).glob(pattern):
            p.unlink(missing_ok=True)


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _json_default(obj):
    # tensors/numpy scalars sneak into meta (loss values, dataloader positions)
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


# ---------------------------------------------------------------------------
# Load


def resolve(stage, tag=None, step=None) -> tuple[str, int]:
    """Fill in the defaults: the latest tag by mtime, the latest complete step in it."""
    tag = tag or find_last_tag(stage)
    directory = checkpoint_dir(stage, tag) if tag else get_base_dir() / "checkpoints" / stage
    steps = list_steps(directory) if tag else []
    if not steps:
        old = next(directory.rglob("model_*.pt"), None) if directory.is_dir() else None
        if old is not None:
            raise UserError(f"{old.parent} holds checkpoints in the old pickle format, which can run code when "
                            f"loaded: convert them once with `python -m checkpoint --convert {old.parent}`")
        raise UserError(f"no {stage} checkpoint under {directory}: run `python -m {STAGE_SCRIPTS[stage]}` first")
    if step is not None and step not in steps:
        raise UserError(f"no complete checkpoint for step {step} in {directory} (have steps {steps})")
    return tag, steps[-1] if step is None else step


def load_checkpoint(stage, tag, step, device, rank=0, load_optimizer=False):
    """Load (model_state, optim_states, meta). `tag`/`step` None = latest. optim_states is the
    list of optimizer state dicts (None unless load_optimizer); per-rank extras saved with
    `rank_state=` come back in meta["rank_state"]."""
    tag, step = resolve(stage, tag, step)
    directory = checkpoint_dir(stage, tag)
    optim_path = _optim_path(directory, step, rank)
    if load_optimizer and not optim_path.exists():
        raise UserError(f"optimizer state {optim_path.name} is missing in {directory}: resume with the same "
                        f"number of processes as the run that saved it")
    path = _meta_path(directory, step)
    try:  # the one check where a checkpoint is read: anything unreadable is "corrupt", in one line
        meta = dict(json.loads(path.read_text(encoding="utf-8")), tag=tag)
        path = _model_path(directory, step)
        model_state = load_file(path, device=str(device))
        if load_optimizer:
            path = optim_path
            shard = torch.load(path, map_location=device, weights_only=True)
            meta["rank_state"] = shard["rank_state"]
    except (OSError, EOFError, ValueError, TypeError, KeyError, RuntimeError, pickle.UnpicklingError,
            SafetensorError) as e:
        why = ("it holds objects other than tensors and plain data, and loading those could run code"
               if isinstance(e, pickle.UnpicklingError) else (str(e).splitlines() or [type(e).__name__])[0])
        raise UserError(f"checkpoint {path} is corrupt: {why}")
    return model_state, shard["optimizers"] if load_optimizer else None, meta


def build_model(meta, device, model_state=None):
    """A GPT from meta["model_config"], with `model_state` loaded when given."""
    from model import GPT, GPTConfig

    try:
        config = GPTConfig(**meta["model_config"])
        with torch.device("meta"):  # no memory or random init for weights that get overwritten
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()  # also fills the rotary tables (buffers that are not in the state dict)
        if model_state is not None:
            model.load_state_dict(clean_state_dict(model_state), strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint does not fit this code's model: {(str(e).splitlines() or [repr(e)])[0]}")
    return model


def load_model(stage, device, tag=None, step=None, phase="eval"):
    """For later stages (eval, mid, sft, chat): (model, tokenizer, meta) from the latest
    (or the given) checkpoint of `stage`. phase "eval" or "train" sets the model's mode."""
    from tokenizer import get_tokenizer

    model_state, _, meta = load_checkpoint(stage, tag, step, device)
    model = build_model(meta, device, model_state)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    fingerprint, vocab = tokenizer.fingerprint(), meta["model_config"]["vocab_size"]
    if meta.get("tokenizer", fingerprint) != fingerprint or tokenizer.get_vocab_size() > vocab:
        raise UserError(f"the {stage} model was trained with another tokenizer than the one in "
                        f"{get_base_dir() / 'tokenizer'} ({tokenizer.get_vocab_size()} tokens; the model has "
                        f"{vocab}): restore that tokenizer or retrain the model")
    return model, tokenizer, meta


# ---------------------------------------------------------------------------
# Converting checkpoints of the pickle format


def convert(directory):
    """Rewrite every model_<step>.pt in `directory` as model_<step>.safetensors. The pickles are read
    with weights_only=True: one that holds anything but tensors is refused, not run."""
    for old in sorted(Path(directory).glob("model_*.pt")):
        try:
            state = torch.load(old, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{old} cannot be converted safely (not plain tensors): {str(e).splitlines()[0]}")
        write_weights(old.with_suffix(".safetensors"), state)
        old.unlink()
        print0(f"converted {old.name} -> {old.with_suffix('.safetensors').name}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Checkpoint maintenance.")
    p.add_argument("--convert", type=Path, required=True, metavar="DIR",
                   help="convert the pickled model_<step>.pt files of an older speedchat in DIR to safetensors")
    convert(p.parse_args(argv).convert)


if __name__ == "__main__":
    run_main(main)
