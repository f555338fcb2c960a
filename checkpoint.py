"""Checkpoints: save / load / resume, atomic, with everything needed to rebuild the model.

Layout, one folder per stage and model tag:

    $SPEEDCHAT_BASE_DIR/checkpoints/<stage>/<tag>/
        model_<step>.pt              model weights (rank 0)
        optim_<step>_rank<r>.pt      optimizer state + per-rank extras (every rank writes its own)
        meta_<step>.json             model config, training config, step, loss, dataloader state, ...

Every file is written to a temp name and renamed (common.atomic_path), and meta is written
LAST: a step is "complete" only when its meta exists, and listings ignore incomplete steps.
So a run killed mid-save leaves at worst an orphan file that nothing trusts.
Under torchrun every rank must see the same folder (one node, or a shared filesystem).
"""

import os
import re
import json
import pickle
from pathlib import Path

import torch

from common import get_base_dir, atomic_path, atomic_write, UserError, print0

STAGES = ("base", "mid", "sft")
# which script produces each stage (for "run X first" messages)
STAGE_SCRIPTS = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft"}
META_RE = re.compile(r"^meta_(\d+)\.json$")


def _check_stage(stage):
    if stage not in STAGES:
        raise UserError(f"unknown checkpoint stage {stage!r} (use one of {', '.join(STAGES)})")


def checkpoint_dir(stage, tag) -> Path:
    _check_stage(stage)
    return get_base_dir() / "checkpoints" / stage / tag


def _model_path(directory, step):
    return Path(directory) / f"model_{step:06d}.pt"


def _meta_path(directory, step):
    return Path(directory) / f"meta_{step:06d}.json"


def _optim_path(directory, step, rank):
    return Path(directory) / f"optim_{step:06d}_rank{rank}.pt"


def list_steps(directory) -> list[int]:
    """Complete steps in `directory` (meta and model both present), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for name in os.listdir(directory):
        m = META_RE.match(name)
        if m and _model_path(directory, int(m.group(1))).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(directory) -> int | None:
    """The latest complete step in `directory`, or None when there is none."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def find_last_tag(stage) -> str | None:
    """The most recently written tag (by mtime) that holds at least one complete step."""
    root = get_base_dir() / "checkpoints" / stage
    if not root.is_dir():
        return None
    tags = [d for d in root.iterdir() if d.is_dir() and list_steps(d)]
    if not tags:
        return None
    return max(tags, key=lambda d: d.stat().st_mtime).name


def _missing(stage, where):
    return UserError(f"no {stage} checkpoint under {where}: run `python -m {STAGE_SCRIPTS[stage]}` first")


def clean_state_dict(state_dict) -> dict:
    """Drop the prefixes that torch.compile ("_orig_mod.") and DDP ("module.") add to keys."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ---------------------------------------------------------------------------
# Save


def save_checkpoint(stage, tag, step, model, optimizers, meta: dict, rank=0, rank_state=None, keep_last=None):
    """Save one step. Every rank calls this: rank 0 writes the model and meta, each rank writes
    its own optimizer shard (plus `rank_state`, any per-rank extras such as RNG or dataloader
    state). Meta is written last, after all ranks have finished their shards."""
    directory = checkpoint_dir(stage, tag)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        with atomic_path(_model_path(directory, step)) as tmp:
            torch.save(clean_state_dict(model.state_dict()), tmp)
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
        m = re.match(rf"^optim_(\d+)_rank{rank}\.pt$", path.name)
        if m and int(m.group(1)) not in keep:
            path.unlink(missing_ok=True)


def clear_checkpoints(directory):
    """Remove every step in `directory` (a fresh run replacing an old one). Metas go first."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for pattern in ("meta_*.json", "model_*.pt", "optim_*_rank*.pt"):
        for p in directory.glob(pattern):
            p.unlink(missing_ok=True)


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _json_default(obj):
    # tensors/numpy scalars sneak into meta (loss values, dataloader positions)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------
# Load


def _torch_load(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing")
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise UserError(f"checkpoint {path} is corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def resolve(stage, tag=None, step=None) -> tuple[str, int]:
    """Fill in the defaults: the latest tag by mtime, the latest complete step in it."""
    _check_stage(stage)
    if tag is None:
        tag = find_last_tag(stage)
        if tag is None:
            raise _missing(stage, get_base_dir() / "checkpoints" / stage)
    directory = checkpoint_dir(stage, tag)
    steps = list_steps(directory)
    if not steps:
        raise _missing(stage, directory)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"no complete checkpoint for step {step} in {directory} (have steps {steps})")
    return tag, step


def load_checkpoint(stage, tag, step, device, rank=0, load_optimizer=False):
    """Load (model_state, optim_states, meta). `tag`/`step` None = latest. optim_states is the
    list of optimizer state dicts (None unless load_optimizer); per-rank extras saved with
    `rank_state=` come back in meta["rank_state"]."""
    tag, step = resolve(stage, tag, step)
    directory = checkpoint_dir(stage, tag)
    meta_path = _meta_path(directory, step)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {meta_path} is corrupt: {e}")
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {meta_path} is corrupt: not a JSON object")
    meta["tag"] = tag
    model_state = _torch_load(_model_path(directory, step), device)
    if not isinstance(model_state, dict):
        raise UserError(f"checkpoint {_model_path(directory, step)} is corrupt: not a state dict")
    model_state = clean_state_dict(model_state)
    optim_states = None
    if load_optimizer:
        path = _optim_path(directory, step, rank)
        if not path.exists():
            raise UserError(f"optimizer state {path.name} is missing in {directory}: resume with the same "
                            f"number of processes as the run that saved it")
        shard = _torch_load(path, device)
        if not isinstance(shard, dict) or "optimizers" not in shard:
            raise UserError(f"checkpoint {path} is corrupt: not an optimizer shard")
        optim_states = shard["optimizers"]
        meta["rank_state"] = shard.get("rank_state")
    return model_state, optim_states, meta


def build_model(meta, device, model_state=None):
    """A GPT from meta["model_config"], with `model_state` loaded when given."""
    from model import GPT, GPTConfig

    if "model_config" not in meta:
        raise UserError("checkpoint meta has no model_config: it was not written by speedchat")
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:
        raise UserError(f"checkpoint model_config does not fit this code's GPTConfig: {e}")
    with torch.device("meta"):  # no memory or random init for weights that get overwritten
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also fills the rotary tables (buffers that are not in the state dict)
    if model_state is not None:
        try:
            model.load_state_dict(clean_state_dict(model_state), strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint does not match its model config: {str(e).splitlines()[0]}")
    return model


def load_model(stage, device, tag=None, step=None, phase="eval"):
    """For later stages (eval, mid, sft, chat): (model, tokenizer, meta) from the latest
    (or the given) checkpoint of `stage`. phase "eval" or "train" sets the model's mode."""
    from tokenizer import get_tokenizer

    assert phase in ("eval", "train"), phase
    model_state, _, meta = load_checkpoint(stage, tag, step, device)
    model = build_model(meta, device, model_state)
    model.train(phase == "train")
    tokenizer = get_tokenizer()
    trained_with = meta.get("tokenizer")
    if trained_with is not None and trained_with != tokenizer.fingerprint():
        raise UserError(f"the {stage} model was trained with another tokenizer than the one in "
                        f"{get_base_dir() / 'tokenizer'} (fingerprint {trained_with} vs {tokenizer.fingerprint()}): "
                        f"restore that tokenizer or retrain the model")
    vocab = meta["model_config"].get("vocab_size")
    if vocab is not None and tokenizer.get_vocab_size() > vocab:
        raise UserError(f"the tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens "
                        f"but the {stage} model was trained for {vocab}: retrain the model or restore its tokenizer")
    return model, tokenizer, meta
