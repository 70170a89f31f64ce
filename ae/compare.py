"""Compare runs: a table with one row per run, one row per grid line, and two plots.

    python -m ae.report EXPERIMENT            # a folder of runs (an ae.sweep or a Slurm array's --out)
    python -m ae.report RUN_A RUN_B ... [--to DIR]

writes into the experiment folder (several folders: their common parent, or --to DIR)
    report.md                one row per run: grid line, seed, state, final PSNR and BCE excess (test,
                             or val with --val-split), steps and training seconds to --target PSNR,
                             wall seconds; then per grid line the mean, worst and spread over its
                             finished seeds, ranked by the worst seed
    report/psnr_runs.png     PSNR against step, one line per run, coloured by grid line
    report/final_psnr.png    final PSNR against each value a grid flag takes (by seed without a grid)
    report.jsonl             the runs' table as JSON lines, one run each (`run_rows`), with its
                             PSNR at each evaluated step: the experiment's record for other tools

Runs that are still going, stopped or failed are listed with their state and left out of the
per-line figures. A torn metrics.jsonl (a run writing, or killed mid-line) is read up to its last
whole line, with a warning; a run whose metrics cannot be read is listed as unreadable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ae.errors import UserError, warn
from ae.files import read_json
from ae.lock import LOCK_NAME
from ae.report import REPORT_DIR, _format, read_metrics, series, write_files
from ae.sweep import RUN_FILE, SUMMARY_FILE, run_info

DEFAULT_TARGET_DB = 20.48  # the study's recipe after 100 epochs (its README figure)
COMPARE_PLOTS = ("psnr_runs", "final_psnr")
MAX_RUNS = 1000


@dataclass
class RunResult:
    """One run folder, read back: what it is (grid line, seed), its state and its figures."""

    out: Path
    label: str  # the grid line's flags, or the folder's name for a run not started by a sweep
    line: int  # the grid line's number (runs of one label share it)
    seed: int | None
    state: str  # finished, running, stopped, failed (exit N), no metrics yet, unreadable (...)
    records: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state == "finished"


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """The run folders among `paths`: each a run (it holds metrics.jsonl or run.json) or a folder of
    runs (its subfolders that do)."""
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UserError(
                f"{path} is not a folder: pass run folders (train.py --out) or an experiment folder"
            )
        if _is_run(path):
            runs.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
        if not children:
            raise UserError(f"{path} holds no runs (no metrics.jsonl or {RUN_FILE} in it or its subfolders)")
        runs += children
    if len(runs) > MAX_RUNS:
        raise UserError(
            f"{len(runs)} runs is more than the {MAX_RUNS} one report compares: pass fewer folders"
        )
    return list(dict.fromkeys(p.resolve() for p in runs))


def is_one_run(path: Path) -> bool:
    """A run folder, or a folder without runs in it (which ae.report's one-run report explains)."""
    return _is_run(path) or not (path.is_dir() and any(p.is_dir() and _is_run(p) for p in path.iterdir()))


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / RUN_FILE).is_file()


def _is_locked(path: Path) -> bool:
    """Does a live process hold `path` (OUT/train.lock)? Tried without taking it for long, or writing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EWOULDBLOCK, errno.EACCES)
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


def run_state(out: Path, info: dict[str, Any] | None) -> str:
    """finished (OUT/summary.json), running (OUT/train.lock held), else stopped (checkpoints to resume
    from) or failed (the sweep's last exit code, when it recorded one)."""
    if (out / SUMMARY_FILE).is_file():
        return "finished"
    if _is_locked(out / LOCK_NAME):
        return "running"
    attempts = (info or {}).get("attempts") or []
    code = attempts[-1].get("exit_code") if attempts and isinstance(attempts[-1], dict) else None
    if code not in (None, 0):
        return f"failed (exit {code})"
    if any((out / "checkpoints").glob("step_*")):
        return "stopped (resumable)"
    return "failed" if code is not None else "not finished"


def _seed_of(out: Path, info: dict[str, Any] | None) -> int | None:
    """The run's seed: its run.json, else its newest checkpoint's recipe."""
    if info is not None and isinstance(info.get("seed"), int):
        return info["seed"]
    for state in sorted(out.glob("checkpoints/step_*/trainer_state.json"), reverse=True):
        try:
            seed = read_json(state).get("recipe", {}).get("seed")
        except (UserError, OSError, ValueError, AttributeError):
            continue
        if isinstance(seed, int):
            return seed
    return None


def figures(records: Sequence[dict[str, Any]], target_db: float) -> dict[str, Any]:
    """Final evaluation and time to `target_db`, from one run's metrics records."""
    split = "val" if any("val/psnr_db" in r for r in records) else "test"
    eval_steps, psnr = series(records, f"{split}/psnr_db")
    _, excess = series(records, f"{split}/bce_excess")
    train_steps, step_ms = series(records, "train/step_time_ms")
    reached = next((s for s, v in zip(eval_steps, psnr, strict=True) if v >= target_db), None)
    # Training seconds: each logging window's mean step time × its steps; up to the target, the
    # windows until the one that holds the step where it was reached.
    seconds, to_target, previous = 0.0, None, 0
    for step, ms in zip(train_steps, step_ms, strict=True):
        seconds += ms * (step - previous) / 1000.0
        previous = step
        if reached is not None and to_target is None and step >= reached:
            to_target = seconds
    return {
        "split": split,
        "steps": max(r["step"] for r in records),
        "psnr_db": psnr[-1] if psnr else None,
        "bce_excess": excess[-1] if excess else None,
        "steps_to_target": reached,
        "train_s_to_target": to_target,
        "train_s": seconds if train_steps else None,
        "eval_steps": eval_steps,
        "psnr_curve": psnr,
    }


def read_run(out: Path, target_db: float) -> RunResult:
    info = run_info(out)
    line = info.get("line") if info else None
    label = (info.get("flags") or "(no extra flags)") if info else out.name
    result = RunResult(out, label, line or 0, _seed_of(out, info), run_state(out, info))
    try:
        result.records = read_metrics(out / "metrics.jsonl")
    except UserError as err:
        if (out / "metrics.jsonl").exists():
            warn(f"{out.name}: {err}; listed as unreadable")
            result.state = "unreadable metrics.jsonl"
        elif result.state not in ("running",):
            result.state = (
                f"{result.state}, no metrics yet" if result.state != "not finished" else "no metrics yet"
            )
        return result
    result.figures = figures(result.records, target_db)
    summary = out / SUMMARY_FILE
    if result.finished:
        with contextlib.suppress(UserError, OSError, ValueError, AttributeError):
            result.figures["wall_s"] = read_json(summary).get("wall_time_s")
    return result


def read_runs(paths: Sequence[Path], target_db: float) -> list[RunResult]:
    results = [read_run(out, target_db) for out in find_runs(paths)]
    # Grid lines keep their number (one experiment); runs of other folders get numbers after them,
    # by label. Runs of several experiments whose numbers mean other lines are numbered by label.
    labels: dict[int, set[str]] = {}
    for r in results:
        if r.line:
            labels.setdefault(r.line, set()).add(r.label)
    if any(len(names) > 1 for names in labels.values()):
        for r in results:
            r.line = 0
    numbers = {r.label: r.line for r in results if r.line}
    for r in results:
        if not r.line:
            r.line = numbers.setdefault(r.label, max(numbers.values(), default=0) + 1)
    return sorted(results, key=lambda r: (r.line, r.seed if r.seed is not None else -1, r.out.name))


def line_summaries(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per grid line, over its finished runs with an evaluation: mean, worst and spread of the final
    PSNR; ranked by the worst seed (best first). Lines without a finished run come last."""
    rows = []
    for line in dict.fromkeys(r.line for r in results):
        runs = [r for r in results if r.line == line]
        done = [r for r in runs if r.finished and r.figures.get("psnr_db") is not None]
        psnr = [r.figures["psnr_db"] for r in done]
        reached = [r.figures["steps_to_target"] for r in done]
        to_target = [r.figures["train_s_to_target"] for r in done]
        rows.append(
            {
                "line": line,
                "label": runs[0].label,
                "seeds": [r.seed for r in done],
                "runs": len(runs),
                "mean": statistics.mean(psnr) if psnr else None,
                "worst": min(psnr) if psnr else None,
                "spread": max(psnr) - min(psnr) if psnr else None,
                "bce_excess": statistics.mean(r.figures["bce_excess"] for r in done) if done else None,
                # The slowest seed's; none when a seed never reached the target.
                "worst_steps_to_target": max(reached) if reached and None not in reached else None,
                "worst_train_s_to_target": max(to_target) if to_target and None not in to_target else None,
            }
        )
    return sorted(rows, key=lambda row: (row["worst"] is None, -(row["worst"] or 0.0)))


def run_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One JSON-ready row per run: its folder, grid line, seed, state and figures."""
    return [
        {"run": r.out.name, "line": r.line, "flags": r.label, "seed": r.seed, "state": r.state, **r.figures}
        for r in results
    ]


def _cell(value: Any, fmt: str) -> str:
    return "–" if value is None else _format(value, fmt)


def markdown(
    results: Sequence[RunResult], dest: Path, target_db: float, skipped: frozenset[str] = frozenset()
) -> str:
    states: dict[str, int] = {}
    for r in results:
        states[r.state] = states.get(r.state, 0) + 1
    splits = sorted({r.figures["split"] for r in results if r.figures})
    t = f"{target_db:g} dB"
    lines = [
        f"# Experiment report: {dest.name}",
        "",
        f"{len(results)} runs ({', '.join(f'{n} {s}' for s, n in states.items())}); "
        f"evaluated on {' and '.join(splits) or 'nothing yet'}; target {t}.",
        "",
        "## Runs",
        "",
        f"| run | grid line | seed | state | steps | final PSNR dB | BCE excess | steps to {t} | "
        f"train s to {t} | train s | wall s |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        f = r.figures
        lines.append(
            f"| {r.out.name} | `{r.label}` | {_cell(r.seed, '{:d}')} | {r.state} | {_cell(f.get('steps'), '{:d}')} | "
            f"{_cell(f.get('psnr_db'), '{:.2f}')} | {_cell(f.get('bce_excess'), '{:.4f}')} | "
            f"{_cell(f.get('steps_to_target'), '{:d}')} | {_cell(f.get('train_s_to_target'), '{:.1f}')} | "
            f"{_cell(f.get('train_s'), '{:.1f}')} | {_cell(f.get('wall_s'), '{:.0f}')} |"
        )
    lines += [
        "",
        "## Grid lines, ranked by the worst seed",
        "",
        "| rank | grid line | finished seeds | mean PSNR dB | worst PSNR dB | spread dB | mean BCE excess | "
        f"slowest steps to {t} | slowest train s to {t} |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rank, row in enumerate(line_summaries(results), start=1):
        seeds = ",".join(str(s) for s in row["seeds"]) or "none"
        lines.append(
            f"| {rank} | `{row['label']}` | {seeds} (of {row['runs']}) | {_cell(row['mean'], '{:.2f}')} | "
            f"{_cell(row['worst'], '{:.2f}')} | {_cell(row['spread'], '{:.2f}')} | "
            f"{_cell(row['bce_excess'], '{:.4f}')} | {_cell(row['worst_steps_to_target'], '{:d}')} | "
            f"{_cell(row['worst_train_s_to_target'], '{:.1f}')} |"
        )
    lines += [
        "",
        "Only finished runs count in the per-line figures. Train s: the training steps' time (from "
        "`train/step_time_ms`; no evaluations or start-up); wall s: the trainer's wall time from its "
        'loop\'s start to the end, of the start that finished the run (`summary.json`). "–": not '
        "reached, or not known.",
        "",
        "## PSNR against step",
        "",
        _image("psnr by step", "psnr_runs", skipped),
        "",
        "## Final PSNR against each swept value",
        "",
        _image("final psnr", "final_psnr", skipped),
        "",
    ]
    return "\n".join(lines)


def _image(alt: str, name: str, skipped: frozenset[str]) -> str:
    return "(not drawn: see the warning)" if name in skipped else f"![{alt}]({REPORT_DIR}/{name}.png)"


def swept_values(labels: Sequence[str]) -> dict[str, list[str]]:
    """For each flag whose value differs between the grid lines: its value on each line ("default"
    where a line does not set it; "on" for a flag without a value)."""
    parsed = []
    for label in labels:
        tokens = shlex.split(label) if label.startswith("--") else []
        flags: dict[str, str] = {}
        for i, token in enumerate(tokens):
            if token.startswith("--"):
                name, _, value = token.partition("=")
                following = tokens[i + 1] if i + 1 < len(tokens) else None
                if not value and following is not None and not following.startswith("--"):
                    value = following
                flags[name] = value or "on"
        parsed.append(flags)
    names = dict.fromkeys(name for flags in parsed for name in flags)
    values = {name: [flags.get(name, "default") for flags in parsed] for name in names}
    return {name: v for name, v in values.items() if len(set(v)) > 1}


def _colour(line: int):
    import matplotlib

    return matplotlib.colormaps["tab10"]((line - 1) % 10)


def plot_psnr_runs(plt, results: Sequence[RunResult], title: str):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    labelled: set[int] = set()
    for r in results:
        steps, psnr = r.figures.get("eval_steps"), r.figures.get("psnr_curve")
        if not steps:
            continue
        label = None if r.line in labelled else f"line {r.line}: {r.label}"
        labelled.add(r.line)
        style = "-" if r.finished else ":"
        ax.plot(
            steps, psnr, style, color=_colour(r.line), marker="o", markersize=2.5, alpha=0.85, label=label
        )
    if labelled:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluations logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="PSNR (dB)", title=f"{title}: PSNR by step (dotted: not finished)")
    ax.grid(alpha=0.3)
    return fig


def plot_final_psnr(plt, results: Sequence[RunResult], title: str):
    """Final PSNR of each finished run against each swept flag's value (by seed without a grid)."""
    done = [r for r in results if r.finished and r.figures.get("psnr_db") is not None]
    lines = list(dict.fromkeys(r.line for r in results))
    labels = {r.line: r.label for r in results}
    swept = swept_values([labels[line] for line in lines])
    panels = swept or {"seed": None}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for ax, (flag, values) in zip(axes[0], panels.items(), strict=True):
        if values is None:
            xs = [str(r.seed) for r in done]
        else:
            by_line = dict(zip(lines, values, strict=True))
            order = _value_order(values)
            xs = [by_line[r.line] for r in done]
            ax.set_xticks(range(len(order)), order)
            xs = [order.index(x) for x in xs]
        for r, x in zip(done, xs, strict=True):
            ax.scatter([x], [r.figures["psnr_db"]], color=_colour(r.line), s=30)
        if not done:
            ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel=flag, ylabel="final PSNR (dB)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: final PSNR of each finished run")
    fig.tight_layout()
    return fig


def _value_order(values: Sequence[str]) -> list[str]:
    """Distinct values, numerically sorted when they are all numbers."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def write_comparison(paths: Sequence[Path], dest: Path | None, target_db: float) -> list[Path]:
    """Write DEST/report.md and DEST/report/{psnr_runs,final_psnr}.png; returns the paths written."""
    results = read_runs(paths, target_db)
    if dest is None:
        dest = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    plots = dict(zip(COMPARE_PLOTS, (plot_psnr_runs, plot_final_psnr), strict=True))
    inputs = [r.out / "metrics.jsonl" for r in results]
    record = "".join(json.dumps(row) + "\n" for row in run_rows(results)).encode()
    return write_files(
        dest,
        inputs,
        plots,
        results,
        lambda skipped: markdown(results, dest, target_db, skipped),
        beside={"report.jsonl": record},
    )
