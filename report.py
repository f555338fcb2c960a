"""The run report.

Each stage writes its section, one dict of numbers (plus optional markdown), into
$SPEEDCHAT_BASE_DIR/report/. A section about a model (it has a "tag") is kept per tag in
report/<tag>/, so a side experiment on another tag never replaces the run's; every section also
records the run it belongs to ($SPEEDCHAT_RUN_ID, set by speedrun.sh) and when it was written.
`python -m report reset` starts a new report with a header (machine, code, preset);
`python -m report generate` writes report.md about one model: the speedrun's (or --tag), opening
with a summary of what was trained, what it took and cost, and the headline scores, then each
stage's section, with PNG plots of the training curves beside it. `python -m report compare A B`
sets two runs (report folders, or model tags) side by side, metric by metric.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from common import UserError, atomic_path, atomic_write, checked, format_seconds, get_base_dir, print0, run_main

# Sections in the order they appear in report.md.
SECTION_ORDER = [
    "header", "tokenizer-train", "tokenizer-eval", "base-train", "base-eval",
    "mid-train", "chat-eval-mid", "chat-sft", "chat-eval-sft", "chat-rl", "chat-eval-rl",
]
TRAINING_SECTIONS = {"base-train": "base", "mid-train": "mid", "chat-sft": "sft", "chat-rl": "rl"}
EVALUATES = {"chat-eval-mid": "mid-train", "chat-eval-sft": "chat-sft", "chat-eval-rl": "chat-rl"}  # chat evaluations add up per model
# the chat tasks of the nanochat-comparable ChatCORE (chat_eval.py), in the summary table's order
CHATCORE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
DEFAULT_GPU_HOUR_USD = 3.00  # a typical on-demand H100 rate per GPU-hour (flag --gpu-hour-usd)
PRICE = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
FOLDER = checked(str, lambda v: v == "" or Path(v).is_dir(), "an existing folder, or ''")


def report_dir() -> Path:
    path = get_base_dir() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_section(name: str, title: str, data: dict, text: str = ""):
    """Write one stage's section from `data` (see render for how report.md shows it). The JSON beside
    it keeps `data` whole, for the summary and the plots, with the run id and the time added. A
    section about a model goes to report/<tag>/ too, where the report reads it; a chat evaluation of
    the model a section there already describes adds its tasks to that section."""
    data = dict(data, run=os.environ.get("SPEEDCHAT_RUN_ID"), written=time.time())
    tag = data.get("tag")
    earlier = _load(report_dir() / str(tag) / f"{name}.json") if tag else {}
    if name in EVALUATES and earlier.get("model") == data.get("model"):
        trained = _load(report_dir() / str(tag) / f"{EVALUATES[name]}.json").get("model_time", 0)
        if earlier.get("written", 0) > trained:
            data, text = merged_eval(earlier, data)
    if name in TRAINING_SECTIONS:  # a resumed stage that trained no further is the same model
        same = (earlier.get("steps"), earlier.get("curve")) == (data.get("steps"), data.get("curve"))
        data["model_time"] = earlier["model_time"] if same and "model_time" in earlier else data["written"]
    for folder in [report_dir()] + ([report_dir() / str(tag)] if tag else []):
        atomic_write(folder / f"{name}.md", render(title, data, text))
        atomic_write(folder / f"{name}.json", json.dumps(dict(data, title=title, text=text), indent=2, sort_keys=True))


def render(title: str, data: dict, text: str) -> str:
    """A section as markdown: each number or string of `data` as a `- key: value` line, and each entry
    of a dict of them as `- entry key: value` ({"bpb": {"val": 0.81}} -> "- val bpb: 0.8100"); anything
    deeper (curves, per-task results) only in the JSON, or in `text`, markdown that follows."""
    flat = lambda v: not isinstance(v, (dict, list, tuple))  # noqa: E731
    lines = [f"## {title}", ""]
    for key, value in data.items():
        if key in ("run", "written", "model_time"):
            continue
        value = {"": value} if flat(value) else value
        if isinstance(value, dict) and all(map(flat, value.values())):
            lines += [f"- {f'{entry} {key}'.strip().replace('_', ' ')}: {shown(key, v)}" for entry, v in value.items()]
    return "\n".join(lines + (["", text.rstrip()] if text else [])) + "\n"


def merged_eval(earlier: dict, new: dict):
    """(data, text) of a chat evaluation that adds `new`'s tasks to `earlier`'s (same model); ChatCORE
    is recomputed over all of them the way chat_eval computes it."""
    from chat_eval import summarize

    results = {**earlier["results"], **new["results"]}
    _, chatcore, chatcore_se = summarize({n: (r["correct"], r["total"]) for n, r in results.items()})
    skipped = {n: why for n, why in {**earlier.get("skipped", {}), **new.get("skipped", {})}.items() if n not in results}
    data = dict(new, results=results, chatcore=chatcore, chatcore_se=chatcore_se, chatcore_tasks=list(results),
                skipped=skipped, max_problems=new.get("max_problems") or earlier.get("max_problems"))
    lines = [f"- {n}: {r['acc']:.4f} ± {r['se']:.4f} ({r['correct']}/{r['total']})" for n, r in results.items()]
    return data, "\n".join(lines)


def shown(key: str, value) -> str:
    """How report.md shows a number: a duration in seconds (key ending in "seconds") as 1h02m, a
    Unix time (ending in "_time") as a date, counts with thousands separators, other floats with
    4 decimals or in scientific notation."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("seconds"):
        return format_seconds(value)
    if key.endswith("_time"):
        return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, int) and abs(value) < 1e10:
        return f"{value:,}"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or not by this code
        return {}


def run_tag(folder: Path | None = None) -> str | None:
    """The model the report (in `folder`, default report_dir()) describes: the one the header's run (the
    speedrun) trained last, else the one trained last by anyone, else the one any section was last
    written about."""
    folder = folder or report_dir()
    header = _load(folder / "header.json")
    for pattern in ("*/base-train.json", "*/*.json"):
        found = [d for d in map(_load, folder.glob(pattern)) if d.get("tag")]
        ours = [d for d in found if header.get("run") and d.get("run") == header["run"]] or found
        if ours:
            return max(ours, key=lambda d: d.get("written", 0))["tag"]
    return None


def read_data(name: str, tag: str | None = None, folder: Path | None = None) -> dict:
    """Section `name` about the model `tag` (default: run_tag()), or a section about no model (header,
    tokenizer) of the report's run; {} when there is none. folder: another report folder."""
    folder = folder or report_dir()
    tag = tag or run_tag(folder)
    data = _load(folder / tag / f"{name}.json") if tag else {}
    if not data:
        data, run = _load(folder / f"{name}.json"), _load(folder / "header.json").get("run")
        data = {} if data.get("tag") or (run and data.get("run") not in (None, run)) else data
    return data


# ---------------------------------------------------------------------------
# The header: when, what code, what machine, what it costs


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    repo = str(Path(__file__).resolve().parent)
    commit = _run(["git", "-C", repo, "rev-parse", "--short", "HEAD"]) or "unknown"
    return commit + (" (dirty)" if _run(["git", "-C", repo, "status", "--porcelain"]) else "")


def code_metrics() -> dict:
    """Size of the code a newcomer has to read: tracked source files of the repo."""
    repo = Path(__file__).resolve().parent
    chars = lines = files = 0
    for name in _run(["git", "-C", str(repo), "ls-files"]).splitlines():
        path = repo / name
        if path.suffix in (".py", ".rs", ".sh", ".toml", ".html", ".md") and not name.startswith("tests/") \
                and path.is_file():
            text = path.read_text(errors="replace")
            chars, lines, files = chars + len(text), lines + text.count("\n"), files + 1
    return {"code_characters": chars, "code_lines": lines, "code_files": files, "code_tokens_approx": chars // 4}


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpus": "none (CPU)", "num_gpus": 0}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpus=f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)",
                    num_gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def reset(gpu_hour_usd: float, preset: str | None = None):
    """Start a new report: remove every section, write the header."""
    shutil.rmtree(get_base_dir() / "report", ignore_errors=True)
    write_section("header", "speedchat run", {
        "start_time": time.time(), "preset": preset, "git_commit": git_commit(), **machine_info(),
        "gpu_hour_usd": gpu_hour_usd, **code_metrics()})
    print0(f"new report started in {report_dir()}")


# ---------------------------------------------------------------------------
# Generate: the summary, plots, report.md


def _fmt(value, se=None) -> str:
    return "-" if value is None else f"{value:.4f} ± {se:.4f}" if se is not None else f"{value:.4f}"


# each column's evaluation section, and the training sections whose models it depends on
EVALUATED = {"BASE": ("base-eval", ["base-train"]), "MID": ("chat-eval-mid", ["base-train", "mid-train"]),
             "SFT": ("chat-eval-sft", ["base-train", "mid-train", "chat-sft"]),
             "RL": ("chat-eval-rl", ["base-train", "mid-train", "chat-sft", "chat-rl"])}


def chat_columns(sections: dict) -> list[str]:
    """The summary's chat columns: RL only when the run had that stage (SPEEDCHAT_SKIP_RL=1 skips it)."""
    return ["MID", "SFT"] + (["RL"] if sections["chat-rl"] or sections["chat-eval-rl"] else [])


def score_notes(sections: dict) -> list[str]:
    """A note for every figure that is not the standard one (a CORE over fewer tasks or items, a
    ChatCORE over another task set, a subset of problems, pass@k), for every empty cell (why it is
    empty), and for every column measured before a model it depends on was trained again."""
    base, notes = sections["base-eval"], []
    if base.get("core") is None:
        why = "base-eval ran without --eval core (the CPU presets have no CORE bundle)" if base else "base-eval was not run"
        notes.append(f"CORE (BASE): not measured: {why}.")
    elif base.get("missing_tasks") or base.get("max_per_task") is not None:
        missing, cap, n_done = base.get("missing_tasks", []), base.get("max_per_task"), len(base.get("core_tasks", []))
        what = [f"mean over {n_done} of {n_done + len(missing)} tasks (missing {', '.join(missing)})"] if missing else []
        what += [f"at most {cap} items per task"] if cap else []
        notes.append("CORE is not the full benchmark: " + "; ".join(what) + ".")
    notes.append(f"BASE is measured by CORE and bits per byte, {' and '.join(chat_columns(sections))} by chat tasks "
                 "(a base model does not follow the chat format: its greedy samples are below).")
    columns = {}  # a note about the chat columns -> the columns it is about
    for column in chat_columns(sections):
        d, found = sections[EVALUATED[column][0]], []
        if set(d.get("chatcore_tasks", [])) != set(CHATCORE_TASKS):
            found.append(f"ChatCORE averages {', '.join(d.get('chatcore_tasks', [])) or 'nothing'}, not the six tasks of "
                         f"the comparable ChatCORE ({', '.join(CHATCORE_TASKS)})")
        skipped = {}  # the tasks that could not be evaluated, by reason (a hint after the reason left out)
        for task, why in d.get("skipped", {}).items():
            skipped.setdefault(why.split(": ")[0], []).append(task)
        found += [f"{', '.join(tasks)} skipped: {why}" for why, tasks in skipped.items()]
        found += [f"at most {d['max_problems']} problems per task"] if d.get("max_problems") is not None else []
        found += [f"generative tasks pass@{d['num_samples']}"] if d.get("num_samples", 1) > 1 else []
        for note in found if d else ["not evaluated (chat_eval was not run)"]:
            columns.setdefault(note, []).append(column)
    notes += [f"{', '.join(cols)}: {note}." for note, cols in columns.items()]
    for column, (evaluation, trainings) in EVALUATED.items():
        evaluated = sections[evaluation].get("written", math.inf)
        newer = [t for t in trainings if sections[t].get("model_time", 0) > evaluated]
        if newer:
            notes.append(f"The {column} figures were measured before the last run of {', '.join(newer)}: "
                         f"they describe an earlier model.")
    return notes


def summary_table(tag: str | None = None, sections: dict | None = None) -> str:
    """The table of headline scores per stage, then the notes that explain it (score_notes); `sections`:
    the report's sections about `tag`'s model when the caller has read them already."""
    tag = tag or run_tag()
    sections = sections or {name: read_data(name, tag) for name in SECTION_ORDER}
    base = sections["base-eval"]
    chats = {"BASE": {}} | {c: sections[EVALUATED[c][0]] for c in chat_columns(sections)}
    dashes = " - |" * (len(chats) - 1)
    rows = ["| metric | " + " | ".join(chats) + " |", "|---" * (len(chats) + 1) + "|",
            f"| CORE | {_fmt(base.get('core'), base.get('core_se'))} |{dashes}",
            f"| val bpb | {_fmt(base.get('bpb', {}).get('val'))} |{dashes}"]
    extra = sorted({m for d in chats.values() for m in d.get("results", {})} - set(CHATCORE_TASKS))
    for metric in CHATCORE_TASKS + extra:
        cells = [chats[c].get("results", {}).get(metric, {}) for c in chats]
        rows.append(f"| {metric} | " + " | ".join(_fmt(r.get("acc"), r.get("se")) for r in cells) + " |")
    rows.append("| ChatCORE | " + " | ".join(_fmt(d.get("chatcore"), d.get("chatcore_se")) for d in chats.values())
                + " |")
    return "\n".join(rows + [""] + [f"- {n}" for n in score_notes(sections)])


def summary(sections: dict, gpu_hour_usd: float | None) -> list[str]:
    """What was trained, on what, how long each stage took and what it cost: the report's opening lines."""
    header, train = sections["header"], sections["base-train"]
    lines = [f"- run: {header.get('run') or '-'}, preset {header.get('preset') or '-'}, started "
             f"{shown('start_time', header.get('start_time'))}, code {header.get('git_commit', '-')}"]
    if train:
        lines += [f"- model: {train['tag']}, depth {train.get('depth')}, {train.get('parameters', 0):,} parameters, "
                  f"context {train.get('sequence_length')}, vocabulary {train.get('vocab_size', 0):,}",
                  f"- pretraining: {train.get('training_tokens', 0):,} tokens of {train.get('source')} "
                  f"({train.get('tokens_per_scaling_parameter', 0):.1f} per scaling parameter) on {train.get('device')}"]
    lines.append(f"- hardware: {header.get('gpus', '-')}, {header.get('cpu_cores', '-')} CPU cores, "
                 f"torch {header.get('torch', '-')}")
    # each stage's wall clock runs from the end of the stage before it (from `report reset` for the first)
    done = sorted((d["written"], name) for name, d in sections.items() if d and name != "header")
    if "start_time" in header and done:
        ends = [header["start_time"]] + [t for t, _ in done]
        took = ", ".join(f"{name} {format_seconds(t - ends[i])}" for i, (t, name) in enumerate(done))
        hours, num_gpus = (ends[-1] - ends[0]) / 3600, header.get("num_gpus", 0)
        rate = header.get("gpu_hour_usd", DEFAULT_GPU_HOUR_USD) if gpu_hour_usd is None else gpu_hour_usd
        cost = (f"${hours * num_gpus * rate:,.2f} ({num_gpus} GPUs x {hours:.2f} h at ${rate:.2f} per GPU-hour)"
                if num_gpus else "no GPU time")
        lines += [f"- wall clock: {format_seconds(ends[-1] - ends[0])} ({took})", f"- cost: {cost}"]
    scores = [f"{label} {_fmt(d.get(key))}" for label, d, key in (
        ("CORE", sections["base-eval"], "core"),
        *((f"ChatCORE {c}", sections[EVALUATED[c][0]], "chatcore") for c in chat_columns(sections)))]
    return lines + [f"- headline: {', '.join(scores)}, val bpb {_fmt(sections['base-eval'].get('bpb', {}).get('val'))}"]


def plot_curves(sections: dict, out_dir: Path) -> list[str]:
    """One PNG per training stage with its loss curve (and validation bpb when recorded)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("matplotlib is not installed: no plots")
        return []
    written = []
    for section, stage in TRAINING_SECTIONS.items():
        curve = sections[section].get("curve")
        if not curve or not curve.get("step"):
            continue
        has_val = bool(curve.get("val_step"))
        fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(10 if has_val else 5.5, 3.6), squeeze=False)
        axes[0][0].plot(curve["step"], curve["loss"], lw=1)
        axes[0][0].set(title=f"{stage}: training loss", xlabel="step", ylabel="loss")
        if has_val:
            axes[0][1].plot(curve["val_step"], curve["val_bpb"], marker="o", lw=1)
            axes[0][1].set(title=f"{stage}: validation bits per byte", xlabel="step", ylabel="bpb")
        for ax in axes[0]:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(out_dir / f"curve_{stage}.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(f"curve_{stage}.png")
    return written


def generate(copy_to: Path | None, gpu_hour_usd: float | None = None, tag: str | None = None):
    """Write report.md about the model `tag` (default: run_tag()); gpu_hour_usd: the cost estimate's
    rate (default: the one `reset` recorded)."""
    base_dir, tag = get_base_dir(), tag or run_tag()
    sections = {name: read_data(name, tag) for name in SECTION_ORDER}
    pngs = plot_curves(sections, base_dir)
    samples = sections["base-eval"].get("samples")
    parts = ["# speedchat report", "", "## Summary", "", *summary(sections, gpu_hour_usd), "",
             summary_table(tag, sections), ""]
    parts += ["What the base model says (greedy):", "", *[f"- `{s!r}`" for s in samples], ""] if samples else []
    parts += [f"![{p}]({p})" for p in pngs] + [""] if pngs else []
    for name in SECTION_ORDER:
        d = sections[name]
        parts.append(render(d.pop("title", name), d, d.pop("text", "")) if d else f"## {name}\n\n(not run)\n")
    text = "\n".join(parts)
    out = base_dir / "report.md"
    atomic_write(out, text)
    copies = [out]
    if copy_to is not None and copy_to.resolve() != base_dir.resolve():
        atomic_write(copy_to / "report.md", text)
        for png in pngs:
            shutil.copyfile(base_dir / png, copy_to / png)
        copies.append(copy_to / "report.md")
    for path in copies:
        print0(f"wrote {path}")
    return out


# ---------------------------------------------------------------------------
# Compare: two runs side by side


def run_sections(run: str) -> dict:
    """{section: data} of a run: in a folder (a base dir holding report/, or a report folder) the model
    its report describes (as `generate` picks it, never a side experiment's), or a model tag of this
    base dir (the sections kept for it)."""
    folder = Path(run).expanduser()
    folder = folder / "report" if (folder / "report").is_dir() else folder
    if not folder.is_dir():
        return {p.stem: _load(p) for p in sorted((report_dir() / run).glob("*.json"))}
    tag = run_tag(folder)
    sections = {name: read_data(name, tag, folder) for name in SECTION_ORDER if name != "header"}
    return {name: data for name, data in sections.items() if data}


def metrics(sections: dict) -> dict:
    """Every measured number of the sections as {name: (value, standard error or None)}: the floats
    ("base-eval bpb val", "base-eval results ARC-Easy acc"), with the `<key>_se` beside them (chat
    tasks: `se` beside `acc`); not durations or times."""
    out = {}

    def walk(prefix, data):
        for key, value in data.items():
            if isinstance(value, dict):
                walk(f"{prefix} {key}", value)
            elif isinstance(value, float) and not (key in ("se", "written") or key.endswith(("_se", "seconds", "_time"))):
                out[f"{prefix} {key}"] = (value, data.get(f"{key}_se", data.get("se") if key == "acc" else None))

    for name, data in sections.items():
        walk(name, data)
    return out


def compare(a: str, b: str) -> list[str]:
    """The metrics runs `a` and `b` share: both values, B - A, and whether that is within two
    standard errors of the difference (sqrt(se_a^2 + se_b^2); '-' where a value has none)."""
    ma, mb = metrics(run_sections(a)), metrics(run_sections(b))
    shared = [name for name in ma if name in mb]
    if not shared:
        raise UserError(f"{a} and {b} share no metric: name two report folders (a base dir or its report/) or "
                        f"two model tags of this base dir's report ({report_dir()})")
    cell = lambda v, se: f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")  # noqa: E731
    lines = [f"A = {a}, B = {b}: {len(shared)} shared metrics ({len(ma) - len(shared)} only in A, "
             f"{len(mb) - len(shared)} only in B)", "",
             "| metric | A | B | B - A | within 2 SE |", "|---|---|---|---|---|"]
    for name in shared:
        (va, sa), (vb, sb) = ma[name], mb[name]
        within = "-" if sa is None or sb is None else "yes" if abs(vb - va) <= 2 * math.hypot(sa, sb) else "NO"
        lines.append(f"| {name} | {cell(va, sa)} | {cell(vb, sb)} | {vb - va:+.4f} | {within} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Start (reset) or assemble (generate) the run report, or compare "
                                                 "two runs.")
    parser.add_argument("command", choices=["reset", "generate", "compare"],
                        help="reset: start a new report (removes every section) with the header; "
                             "generate: write report.md from the sections written so far; "
                             "compare A B: the metrics two runs share, with both values, the difference and whether "
                             "it is within two standard errors (A, B: a base dir or report folder, or a model tag)")
    parser.add_argument("runs", nargs="*", help="compare: the two runs")
    parser.add_argument("--gpu-hour-usd", type=PRICE, default=os.environ.get("SPEEDCHAT_GPU_HOUR_USD") or None,
                        help="price of one GPU-hour for the cost estimate (default: $SPEEDCHAT_GPU_HOUR_USD; "
                             f"when that is unset, reset uses {DEFAULT_GPU_HOUR_USD:.2f} and generate the rate "
                             "reset recorded)")
    parser.add_argument("--tag", default=None, help="generate: the model to report on (default: the one the "
                                                    "speedrun trained last, else the one trained last)")
    parser.add_argument("--preset", default=None, help="reset: the speedrun preset, for the summary")
    parser.add_argument("--out-dir", type=FOLDER, default=".",
                        help="where generate also copies report.md and the plots ('' for the base dir only)")
    args = parser.parse_args(argv)
    if (args.command == "compare") != (len(args.runs) == 2):
        parser.error("compare takes two runs (A B); reset and generate take none")
    if args.command == "compare":
        print("\n".join(compare(*args.runs)))
    elif args.command == "reset":
        reset(DEFAULT_GPU_HOUR_USD if args.gpu_hour_usd is None else args.gpu_hour_usd, args.preset)
    else:
        generate(Path(args.out_dir) if args.out_dir else None, args.gpu_hour_usd, args.tag)


if __name__ == "__main__":
    run_main(main)
