"""The run report.

Each stage writes its own markdown section (and a JSON of its numbers) into
$SPEEDCHAT_BASE_DIR/report/. `python -m report reset` starts a new report with a header
describing the machine and the code; `python -m report generate` joins the sections into
report.md (in the base dir, copied to the current directory), with a summary table of the
headline metrics per stage and PNG plots of the training curves beside it. `python -m report
compare A B` sets two runs (report folders, or model tags) side by side, metric by metric.
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
CHAT_STAGES = ("mid", "sft", "rl")  # the summary's chat columns, each from its chat-eval-<stage> section
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
    """Write one stage's section from `data`: report.md shows each number or string as a
    `- key: value` line, and each entry of a dict of them as `- entry key: value` ({"bpb": {"val":
    0.81}} -> "- val bpb: 0.8100"); anything deeper, such as curves or per-task results, only in the
    JSON (a stage shows those in `text`, markdown that follows). The JSON beside it keeps `data`
    whole, for the summary table and the plots."""
    flat = lambda v: not isinstance(v, (dict, list, tuple))  # noqa: E731
    lines = [f"## {title}", ""]
    for key, value in data.items():
        if flat(value):
            value = {"": value}  # one entry without a name
        if isinstance(value, dict) and all(map(flat, value.values())):
            lines += [f"- {f'{entry} {key}'.strip().replace('_', ' ')}: {shown(key, v)}" for entry, v in value.items()]
    if text:
        lines += ["", text.rstrip()]
    atomic_write(report_dir() / f"{name}.md", "\n".join(lines) + "\n")
    numbers = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(report_dir() / f"{name}.json", numbers)
    if data.get("tag"):  # kept per model tag too, for `compare` after a run of another tag replaced the section
        atomic_write(report_dir() / "tags" / str(data["tag"]) / f"{name}.json", numbers)


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


def read_data(name: str) -> dict:
    path = report_dir() / f"{name}.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


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
    listed = _run(["git", "-C", str(repo), "ls-files"]).splitlines()
    exts = {".py", ".rs", ".sh", ".toml", ".html", ".md"}
    chars = lines = files = 0
    for name in listed:
        path = repo / name
        if path.suffix in exts and path.is_file() and not name.startswith("tests/"):
            text = path.read_text(errors="replace")
            chars, lines, files = chars + len(text), lines + text.count("\n"), files + 1
    try:
        import tomllib

        deps = len(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"])
    except ImportError:  # Python 3.10 has no tomllib
        deps = None
    return {"code_characters": chars, "code_lines": lines, "code_files": files, "code_tokens_approx": chars // 4,
            "dependencies": deps}


def machine_info() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        info["gpus"] = f"{n} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    else:
        info["gpus"] = "none (CPU)"
    return info


def reset(gpu_hour_usd: float):
    """Start a new report: remove old sections, write the header."""
    for path in report_dir().glob("*"):
        if path.is_file():
            path.unlink()
    import torch

    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    write_section("header", "speedchat run", {
        "start_time": time.time(), "git_commit": git_commit(),
        **machine_info(), "num_gpus": num_gpus, "gpu_hour_usd": gpu_hour_usd, **code_metrics()})
    print0(f"new report started in {report_dir()}")


# ---------------------------------------------------------------------------
# Generate: summary table, plots, report.md


def _fmt(metric: dict | None, key="acc") -> str:
    if not metric or metric.get(key) is None:
        return "-"
    value, se = metric[key], metric.get("se")
    return f"{value:.4f} ± {se:.4f}" if se is not None else f"{value:.4f}"


# each column's evaluation section, and the training sections whose models it depends on
EVALUATED = {"BASE": ("base-eval", ["base-train"]), "MID": ("chat-eval-mid", ["base-train", "mid-train"]),
             "SFT": ("chat-eval-sft", ["base-train", "mid-train", "chat-sft"]),
             "RL": ("chat-eval-rl", ["base-train", "mid-train", "chat-sft", "chat-rl"])}


def written(name: str) -> float | None:
    """When section `name` was last written (its file's mtime), None if it was not."""
    path = report_dir() / f"{name}.md"
    return path.stat().st_mtime if path.exists() else None


def stale_notes() -> list[str]:
    """A note for each column evaluated before a training stage it depends on was run again (for
    the same model tag, when both sections name theirs: training another tag changes nothing here)."""
    names = {name for evaluation, trainings in EVALUATED.values() for name in (evaluation, *trainings)}
    when = {name: written(name) for name in names}
    tag = {name: read_data(name).get("tag") for name in names}
    notes = []
    for column, (evaluation, trainings) in EVALUATED.items():
        if when[evaluation] is None:
            continue
        newer = [t for t in trainings if (when[t] or 0) > when[evaluation]
                 and (tag[evaluation] is None or tag[t] in (None, tag[evaluation]))]
        if newer:
            notes.append(f"The {column} figures were measured before the last run of {', '.join(newer)}: "
                         f"they describe an earlier model.")
    return notes


def summary_table() -> str:
    """The summary table, then a note under it for every figure that is not the standard one: a
    CORE over fewer than all tasks or items, a ChatCORE over another task set than the six
    nanochat-comparable ones, a chat evaluation on a subset of problems or with pass@k."""
    base = read_data("base-eval")
    stages = {"base": {}} | {s: read_data(f"chat-eval-{s}") for s in CHAT_STAGES}
    if not stages["rl"]:  # a run without the RL stage (SPEEDCHAT_SKIP_RL=1) has no RL column
        del stages["rl"]
    rows = ["| metric | " + " | ".join(s.upper() for s in stages) + " |", "|---" * len(stages) + "|---|"]
    dashes = " - |" * (len(stages) - 1)
    notes = []
    core = "-"
    if base.get("core") is not None:
        core = _fmt({"acc": base["core"], "se": base.get("core_se")})
        n_done, missing, cap = len(base.get("core_tasks", [])), base.get("missing_tasks", []), base.get("max_per_task")
        if missing or cap is not None:
            core += " (see note)"
            what = [f"mean over {n_done} of {n_done + len(missing)} tasks (missing {', '.join(missing)})"] if missing else []
            what += [f"at most {cap} items per task"] if cap is not None else []
            notes.append("CORE is not the full benchmark: " + "; ".join(what) + ".")
    rows.append(f"| CORE | {core} |{dashes}")
    val_bpb = base.get("bpb", {}).get("val")
    if val_bpb is not None:
        rows.append(f"| val bpb | {val_bpb:.4f} |{dashes}")
    extra = sorted({m for d in stages.values() for m in d.get("results", {})} - set(CHATCORE_TASKS))
    for metric in CHATCORE_TASKS + extra:
        cells = [_fmt(stages[s].get("results", {}).get(metric)) for s in stages]
        rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    cells = []
    for s, d in stages.items():
        if "chatcore" not in d:
            cells.append("-")
            continue
        cell = _fmt({"acc": d["chatcore"], "se": d.get("chatcore_se")})
        tasks = d.get("chatcore_tasks", [])
        if set(tasks) != set(CHATCORE_TASKS):
            cell += " (see note)"
            notes.append(f"ChatCORE {s.upper()} averages {', '.join(tasks)}, not the six tasks of the "
                         f"comparable ChatCORE ({', '.join(CHATCORE_TASKS)}).")
        cells.append(cell)
    rows.append("| ChatCORE | " + " | ".join(cells) + " |")
    notes += stale_notes()
    for s, d in list(stages.items())[1:]:
        if d.get("max_problems") is not None:
            notes.append(f"{s.upper()} chat tasks: at most {d['max_problems']} problems each.")
        if d.get("num_samples", 1) > 1:
            notes.append(f"{s.upper()} generative tasks: pass@{d['num_samples']}.")
    return "\n".join(rows + ([""] + [f"- {n}" for n in notes] if notes else []))


def plot_curves(out_dir: Path) -> list[str]:
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
        curve = read_data(section).get("curve")
        if not curve or not curve.get("step"):
            continue
        has_val = bool(curve.get("val_step"))
        fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(10 if has_val else 5.5, 3.6), squeeze=False)
        ax = axes[0][0]
        ax.plot(curve["step"], curve["loss"], lw=1)
        ax.set(title=f"{stage}: training loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        if has_val:
            ax = axes[0][1]
            ax.plot(curve["val_step"], curve["val_bpb"], marker="o", lw=1)
            ax.set(title=f"{stage}: validation bits per byte", xlabel="step", ylabel="bpb")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"curve_{stage}.png"
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(name)
    return written


def generate(copy_to: Path | None, gpu_hour_usd: float | None = None):
    """Assemble report.md from the sections; gpu_hour_usd: the cost estimate's rate (default: the
    one `reset` recorded)."""
    base_dir = get_base_dir()
    header = read_data("header")
    parts = []
    for name in SECTION_ORDER:
        path = report_dir() / f"{name}.md"
        parts.append(path.read_text() if path.exists() else f"## {name}\n\n(not run)\n")
    pngs = plot_curves(base_dir)
    summary = ["## Summary", "", summary_table(), ""]
    if pngs:
        summary += ["Training curves: " + ", ".join(f"[{p}]({p})" for p in pngs), ""]
        summary += [f"![{p}]({p})" for p in pngs] + [""]
    # the run's time: from `report reset` to the last stage section written (not to now: a report
    # generated again later must not grow), interruptions included
    ends = [t for t in map(written, SECTION_ORDER[1:]) if t is not None]
    if "start_time" in header and ends:
        elapsed = max(ends) - header["start_time"]
        hours = elapsed / 3600
        num_gpus = header.get("num_gpus", 0)
        summary.append(f"Total wall clock time: {int(hours)}h{int(elapsed % 3600 / 60):02d}m")
        if num_gpus:
            rate = header.get("gpu_hour_usd", DEFAULT_GPU_HOUR_USD) if gpu_hour_usd is None else gpu_hour_usd
            summary.append(f"Estimated cost: ${hours * num_gpus * rate:,.2f} ({num_gpus} GPUs x {hours:.2f} h "
                           f"at ${rate:.2f} per GPU-hour)")
    text = "# speedchat report\n\n" + "\n".join(parts[:1]) + "\n" + "\n".join(summary) + "\n\n" + "\n".join(parts[1:])
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
    """{section: data} of a run: a folder (a base dir holding report/, or a report folder), or a
    model tag of this base dir (the sections kept for it)."""
    folder = Path(run).expanduser()
    folder = folder / "report" if (folder / "report").is_dir() else folder
    folder = folder if folder.is_dir() else report_dir() / "tags" / run
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem != "header"}


def metrics(sections: dict) -> dict:
    """Every measured number of the sections as {name: (value, standard error or None)}: the floats
    ("base-eval bpb val", "base-eval results ARC-Easy accuracy"), with the `<key>_se` beside them
    (chat tasks: `se` beside `acc`); not durations or times."""
    out = {}

    def walk(prefix, data):
        for key, value in data.items():
            if isinstance(value, dict):
                walk(f"{prefix} {key}", value)
            elif isinstance(value, float) and not (key == "se" or key.endswith(("_se", "seconds", "_time"))):
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
    parser.add_argument("--out-dir", type=FOLDER, default=".",
                        help="where generate also copies report.md and the plots ('' for the base dir only)")
    args = parser.parse_args(argv)
    if (args.command == "compare") != (len(args.runs) == 2):
        parser.error("compare takes two runs (A B); reset and generate take none")
    if args.command == "compare":
        print("\n".join(compare(*args.runs)))
    elif args.command == "reset":
        reset(DEFAULT_GPU_HOUR_USD if args.gpu_hour_usd is None else args.gpu_hour_usd)
    else:
        generate(Path(args.out_dir) if args.out_dir else None, args.gpu_hour_usd)


if __name__ == "__main__":
    run_main(main)
