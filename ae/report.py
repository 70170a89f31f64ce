"""Plots and a Markdown summary of a run, from OUT/metrics.jsonl alone (no W&B needed).

    python -m ae.report OUT
    python -m ae.report EXPERIMENT | RUN_A RUN_B ...   # several runs compared: see ae.compare

writes
    OUT/report/loss.png   train BCE and test BCE vs step, the test split's BCE floor as a horizontal line
    OUT/report/psnr.png   test PSNR vs step (and the noisy input's PSNR for a denoising run)
    OUT/report/speed.png  step time (ms) and throughput (images/s) vs step, two panels
    OUT/report.md         the three plots and a table of the final metrics

A run that is still going (or was killed mid-write) can be reported: a line cut mid-write is skipped,
and one warning counts such lines and the evaluation rows among them. A value outside its key's range
(`VALUE_RANGES`: a loss of 1e308, a negative step time) is left out, with one warning counting the
lines it touched. A plot that cannot be drawn from what is left is skipped with one line, and the rest
of the report is written. Any other unreadable line, or a file without records, is a one-line error.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from ae.errors import OneLineParser, UserError, friendly_errors, warn
from ae.files import atomic_write, made_folder, parse_json, refuse_overwriting

REPORT_DIR = "report"
MAX_STEP = 2**53  # steps and values beyond a float's exact range are not a run's
MAX_METRICS_BYTES = 256 << 20  # a 100-epoch run logging every step writes about 10 MB
MAX_LINE_BYTES = 64 << 10  # train.py's records are under 1 KB
PLOTS = ("loss", "psnr", "speed")
# What a value may be, by the last part of its key ("test/psnr_db" → "psnr_db"); NaN (a window whose
# every step was non-finite) is kept. Other numeric keys: within ±OTHER_LIMIT.
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "loss": (0.0, 1e3),
    "bce": (0.0, 1e3),
    "bce_floor": (0.0, 1.0),
    "bce_excess": (-1.0, 1e3),
    "mse": (0.0, 1.0),
    "psnr_db": (-1e3, math.inf),  # inf: a perfect reconstruction
    "noisy_psnr_db": (-1e3, math.inf),
    "denoise_gain_db": (-1e3, 1e3),
    "step_time_ms": (0.0, 1e9),
    "images_per_s": (0.0, 1e12),
    "lr": (0.0, 10.0),
    "epoch": (0.0, 1e9),
    "skipped_steps": (0.0, float(MAX_STEP)),
}
OTHER_LIMIT = 1e12
# The final-metrics table: (key, label, format), in this order; keys a run lacks are left out.
TABLE = (
    ("test/bce", "test BCE", "{:.5f}"),
    ("test/bce_floor", "BCE floor (test split)", "{:.5f}"),
    ("test/bce_excess", "test BCE above the floor", "{:.5f}"),
    ("test/mse", "test MSE", "{:.6f}"),
    ("test/psnr_db", "test PSNR (dB)", "{:.2f}"),
    ("test/noisy_psnr_db", "noisy input PSNR (dB)", "{:.2f}"),
    ("test/denoise_gain_db", "denoising gain (dB)", "{:.2f}"),
    ("train/loss", "train loss (BCE, last window)", "{:.5f}"),
    ("train/step_time_ms", "step time (ms, last window)", "{:.2f}"),
    ("train/images_per_s", "throughput (images/s, last window)", "{:,.0f}"),
    ("train/lr", "learning rate", "{:g}"),
    ("train/epoch", "epochs trained", "{:.2f}"),
    ("train/skipped_steps", "skipped non-finite steps", "{:d}"),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, each with an integer "step"; one-line errors for a bad file."""
    hint = "point ae.report at a run folder written by train.py"
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file (a FIFO or device?): {hint}")
    if not path.is_file():
        raise UserError(f"{path} not found: {hint} (it writes OUT/metrics.jsonl at the first log step)")
    size = path.stat().st_size
    if size > MAX_METRICS_BYTES:
        raise UserError(
            f"{path} is {size:,} bytes, more than the {MAX_METRICS_BYTES:,} ae.report reads: "
            "is it a metrics.jsonl written by train.py?"
        )
    try:
        lines, too_long, torn_tail = _read_lines(path)
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or " ".join(str(err).split())
        raise UserError(f"cannot read {path} ({reason}): the file is corrupt; {hint}") from None
    records = []
    torn: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, parse_int=_int_or_float)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError('no integer "step"')
            if not 0 <= step <= MAX_STEP:
                raise ValueError(f'"step" is outside 0..{MAX_STEP}')
        except ValueError as err:
            if (torn_tail and number == len(lines)) or _cut_record(line):
                torn.append(line)
                continue
            reason = " ".join(str(err).split())
            raise UserError(
                f"{path} line {number} is not a metrics record ({reason}): the file is corrupt"
            ) from None
        records.append(record)
    if too_long:
        warn(
            f"{path}: leaving out {too_long} line(s) longer than {MAX_LINE_BYTES:,} bytes (train.py writes "
            "none); the report is without them"
        )
    if torn:
        evaluations = sum('"test/' in line or '"val/' in line for line in torn)
        last = ", the unfinished last line among them" if torn_tail and torn[-1] == lines[-1] else ""
        warn(
            f"{path}: skipping {len(torn)} line(s) cut mid-write{last} (a run still writing, or killed), "
            f"{evaluations} of them evaluation rows; the report is without them"
        )
    _leave_out_of_range(path, records)
    if not records:
        raise UserError(f"{path} has no metrics records yet: let the run reach its first log step, or {hint}")
    return records


def _read_lines(path: Path) -> tuple[list[str], int, bool]:
    """The file's lines (without newlines), how many longer than MAX_LINE_BYTES were read past
    without being kept (memory stays bounded by the line limit), and whether the last line is
    unfinished (no newline)."""
    lines: list[str] = []
    too_long = 0
    with path.open("rb") as file:
        while line := file.readline(MAX_LINE_BYTES + 1):
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):
                    line = file.readline(MAX_LINE_BYTES + 1)
                too_long += 1
                continue
            lines.append(line.decode("utf-8"))
    torn_tail = bool(lines) and not lines[-1].endswith("\n")
    return [line.rstrip("\n") for line in lines], too_long, torn_tail


def _int_or_float(text: str) -> int | float:
    """A JSON integer: an int, or past 4,000 digits a float (out of every range, so left out with a
    warning, rather than Python's "exceeds the limit for integer string conversion" at 4,300)."""
    return int(text) if len(text) <= 4000 else float(text)


def _cut_record(line: str) -> bool:
    """A record that a crash cut short: it starts like one (`{"step": N`) but does not end."""
    return line.startswith('{"step": ') and not line.rstrip().endswith("}")


def in_range(key: str, value: Any) -> bool:
    """Is a metrics value plausible for its key (see VALUE_RANGES)? Non-numbers are not checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    low, high = VALUE_RANGES.get(key.rsplit("/", 1)[-1], (-OTHER_LIMIT, OTHER_LIMIT))
    return math.isnan(value) or low <= value <= high


def _leave_out_of_range(path: Path, records: list[dict[str, Any]]) -> None:
    """Drop each value outside its range from its record; one warning counts the lines touched."""
    touched, keys = 0, set()
    for record in records:
        bad = [key for key, value in record.items() if key != "step" and not in_range(key, value)]
        for key in bad:
            del record[key]
        touched += bool(bad)
        keys.update(bad)
    if touched:
        warn(
            f"{path}: left out values outside their range on {touched} line(s) "
            f"({', '.join(sorted(keys))}); the report is drawn without them"
        )


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, sorted by step; a step logged twice keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if (isinstance(value, float) and math.isfinite(value)) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_STEP
        ):
            by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def final_values(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each key's value at the highest step that logged it, plus "step"/"epoch" of the last record."""
    last: dict[str, tuple[int, Any]] = {}
    for record in records:
        for key, value in record.items():
            if key not in last or record["step"] >= last[key][0]:
                last[key] = (record["step"], value)
    return {key: value for key, (_, value) in last.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged yet", ha="center", va="center", transform=ax.transAxes, color="grey")


def _plot(ax, steps: list[int], values: list[float], **style) -> None:
    from matplotlib.ticker import MaxNLocator

    marker = "o" if len(steps) <= 30 else None
    ax.plot(steps, values, marker=marker, markersize=3, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_loss(plt, records, title: str):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for key, label, color in (
        ("train/loss", "train BCE", "tab:blue"),
        ("test/bce", "test BCE", "tab:orange"),
    ):
        steps, values = series(records, key)
        if steps:
            _plot(ax, steps, values, label=label, color=color)
            drawn = True
    floor_steps, floors = series(records, "test/bce_floor")
    if floors:
        ax.axhline(
            floors[-1], color="black", linestyle="--", linewidth=1, label=f"BCE floor {floors[-1]:.4f}"
        )
    if not drawn:
        _no_data(ax, "loss")
    ax.set(xlabel="step", ylabel="binary cross-entropy", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    if drawn or floors:
        ax.legend()
    return fig


def plot_psnr(plt, records, title: str):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    curves = (
        ("test/psnr_db", "test PSNR (reconstruction)", "tab:green"),
        ("test/noisy_psnr_db", "noisy input PSNR", "tab:red"),
    )
    drawn = False
    for key, label, color in curves:
        steps, values = series(records, key)
        if steps:
            _plot(ax, steps, values, label=label, color=color)
            drawn = True
    if drawn:
        ax.legend()
    else:
        _no_data(ax, "test PSNR")
    ax.set(xlabel="step", ylabel="PSNR (dB)", title=f"{title}: test PSNR")
    ax.grid(alpha=0.3)
    return fig


def plot_speed(plt, records, title: str):
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for ax, key, label, color in (
        (top, "train/step_time_ms", "step time (ms)", "tab:purple"),
        (bottom, "train/images_per_s", "images/s", "tab:brown"),
    ):
        steps, values = series(records, key)
        if steps:
            _plot(ax, steps, values, color=color)
        else:
            _no_data(ax, label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    top.set_title(f"{title}: training speed")
    bottom.set_xlabel("step")
    fig.tight_layout()
    return fig


def _png(plt, fig) -> bytes:
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _format(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError, OverflowError):
        return f"{value:g}"


def markdown(out: Path, records: Sequence[dict[str, Any]], skipped: frozenset[str] = frozenset()) -> str:
    final = final_values(records)
    last_step = max(r["step"] for r in records)
    epoch = final.get("epoch")
    lines = [
        f"# Training report: {out.resolve().name}",
        "",
        f"From `{out / 'metrics.jsonl'}`: {len(records)} records, last at step {last_step}"
        + (f" (epoch {epoch})" if epoch is not None else "")
        + ".",
        "",
        "## Final metrics",
        "",
        "| metric | value | key |",
        "|---|---:|---|",
    ]
    for key, label, fmt in TABLE:
        if key in final:
            lines.append(f"| {label} | {_format(final[key], fmt)} | `{key}` |")
    test_steps, _ = series(records, "test/bce")
    if test_steps:
        lines += ["", f"Test metrics are from the last evaluation, at step {test_steps[-1]}."]
    grid = final.get("test/reconstructions")
    lines.append("")
    for name, heading in zip(PLOTS, ("Loss", "Test PSNR", "Training speed"), strict=True):
        image = (
            f"![{name}]({REPORT_DIR}/{name}.png)" if name not in skipped else "(not drawn: see the warning)"
        )
        lines += [f"## {heading}", "", image, ""]
    if isinstance(grid, str) and (out / grid).is_file():
        lines += ["## Last reconstructions", "", f"![reconstructions]({grid})", ""]
    return "\n".join(lines)


def write_report(out: Path) -> list[Path]:
    """Write OUT/report/{loss,psnr,speed}.png and OUT/report.md; returns the paths written."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"run folder {out} not found: pass the --out folder of a train.py run")
    records = read_metrics(out / "metrics.jsonl")
    plots = dict(zip(PLOTS, (plot_loss, plot_psnr, plot_speed), strict=True))
    return write_files(
        out, [out / "metrics.jsonl"], plots, records, lambda skipped: markdown(out, records, skipped)
    )


def write_files(
    dest: Path,
    inputs: list[Path],
    plots: dict[str, Any],
    data: Any,
    text: Callable[[frozenset[str]], str],
    beside: dict[str, bytes] | None = None,
) -> list[Path]:
    """Write DEST/report/NAME.png for each `plots` entry (NAME: plot(plt, data, title)),
    DEST/report.md (`text(names of the plots that could not be drawn)`) and each `beside` file
    (DEST/NAME: its bytes), refusing to overwrite `inputs`; returns the paths written. A plot that
    cannot be drawn is skipped with a warning."""
    report_dir = dest / REPORT_DIR
    paths = [report_dir / f"{name}.png" for name in plots]
    beside_paths = {dest / name: data for name, data in (beside or {}).items()}
    refuse_overwriting(
        inputs,
        [(path, f"the report's {path.name}") for path in [*paths, dest / "report.md", *beside_paths]],
        "replace that link with a plain file",
    )
    plt = _pyplot()
    title = dest.resolve().name
    written = []
    skipped = set()
    with made_folder(report_dir, "the report folder"):
        for path, plot in zip(paths, plots.values(), strict=True):
            image = drawn(plt, plot, data, title, path.name)
            if image is None:
                skipped.add(path.stem)
                continue
            atomic_write(path, image, "the report's plot")
            written.append(path)
    for path, content in beside_paths.items():
        atomic_write(path, content, f"the report's {path.name}")
        written.append(path)
    path = dest / "report.md"
    atomic_write(path, text(frozenset(skipped)).encode("utf-8"), "the report")
    written.append(path)
    return written


def check_target(target: float) -> None:
    """UserError unless --target is a PSNR in (0, 100] dB."""
    if not (math.isfinite(target) and 0 < target <= 100):
        raise UserError(f"--target must be a PSNR in (0, 100] dB, got {target}")


def drawn(plt, plot: Callable, data: Any, title: str, name: str) -> bytes | None:
    """A plot's PNG, or None (with one warning line) when it cannot be computed from these values."""
    try:
        return _png(plt, plot(plt, data, title))
    except Exception as err:  # matplotlib raises many types (LinAlgError, OverflowError, ...)
        plt.close("all")
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        warn(f"skipping {name}: it cannot be drawn from these values ({type(err).__name__}: {reason})")
        return None


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m ae.report",
        description="Plots and a Markdown report from OUT/metrics.jsonl; for several runs, a comparison (ae.compare).",
    )
    p.add_argument(
        "out",
        type=Path,
        nargs="+",
        metavar="OUT",
        help="a run folder (train.py --out), or an experiment folder of runs, or several run folders",
    )
    p.add_argument(
        "--target",
        type=float,
        default=20.48,
        help="several runs: the PSNR (dB) to time, in (0, 100]; default %(default)s",
    )
    p.add_argument(
        "--to",
        type=Path,
        help="several runs: where report.md and report/ go (default: the "
        "experiment folder, or the runs' common parent)",
    )
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ae.compare import is_one_run, write_comparison

    check_target(args.target)
    if len(args.out) == 1 and is_one_run(args.out[0]):
        written = write_report(args.out[0])
    else:
        written = write_comparison(args.out, args.to, args.target)
    for path in written:
        print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
