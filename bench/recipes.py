"""The tuning record of an experiment, for bench/results/: ae.report's row of each run, with the
final model's bottleneck health and the machine, as JSON lines.

    python -m ae.sweep --grid GRID --seeds 5 --parallel 2 --out runs/EXP [train.py flags]   # train
    python -m ae.report runs/EXP                  # report.md, report.jsonl and the plots
    python bench/recipes.py runs/EXP --data DIR --to bench/results/EXP.jsonl [--note TEXT]

Each line is `ae.compare.run_rows`' row (grid line, seed, state, final PSNR and BCE excess, steps
and training seconds to --target, PSNR at each evaluated step) plus `bottleneck_active`: each of
the 4 bottleneck channels' active fraction after conv2's ReLU over the first 1,000 training
images (bench/bottleneck.py; near 0 is a silent channel), for the finished runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ae.compare import DEFAULT_TARGET_DB, RunResult, read_runs, run_rows  # noqa: E402
from ae.errors import OneLineParser, friendly_errors  # noqa: E402
from ae.files import atomic_write, refuse_overwriting  # noqa: E402
from ae.report import check_target  # noqa: E402
from bench.bottleneck import channel_activity  # noqa: E402
from bench.throughput import machine_info  # noqa: E402


def records(results: list[RunResult], data: Path, note: str | None) -> list[dict]:
    import torch

    machine = machine_info(torch.device("cpu"))
    machine = {k: machine[k] for k in ("hostname", "cpu_model", "cpus_usable", "torch")}
    rows = []
    for result, row in zip(results, run_rows(results), strict=True):
        if result.finished:
            active = channel_activity(data, result.out / "model.safetensors")
            row["bottleneck_active"] = [round(fraction, 4) for fraction in active]
        rows.append({**row, "machine": machine, **({"note": note} if note else {})})
    return rows


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python bench/recipes.py", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="an ae.sweep or Slurm array's --out folder")
    parser.add_argument(
        "--data", type=Path, required=True, help="the runs' prepared data (for the bottleneck)"
    )
    parser.add_argument("--to", type=Path, required=True, help="the JSON-lines record to write")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET_DB, help="PSNR (dB) to time")
    parser.add_argument("--note", help="a remark kept on every line (the load, what changed)")
    args = parser.parse_args(argv)
    check_target(args.target)
    results = read_runs([args.experiment], args.target)
    refuse_overwriting(
        [r.out / "metrics.jsonl" for r in results], [(args.to, "the record")], "choose another --to"
    )
    rows = records(results, args.data, args.note)
    atomic_write(args.to, "".join(json.dumps(row) + "\n" for row in rows).encode(), "the record")
    print(f"{len(rows)} runs → {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
