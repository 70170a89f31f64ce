"""The tuning record: train a recipe for several seeds and tabulate quality and time to quality.

    python bench/recipes.py run --data DIR --work WORK --name NAME [--seeds 0 1 2] [--parallel 2]
                            [-- TRAIN_FLAGS...]      # e.g. -- --recipe fast --val-split 5000
    python bench/recipes.py table WORK/results.jsonl  # markdown: per seed, then mean and worst

`run` starts the real `train.py` once per seed (W&B disabled, a fresh WORK/NAME/seedS folder),
at most --parallel at a time (each with OMP_NUM_THREADS=1 when more than one runs), and appends
one JSON line per run to WORK/results.jsonl: the flags, seed, epochs and steps, the final
evaluation (`test/*`, or `val/*` with --val-split), wall time, the machine, and the time to the
study's quality: the first evaluated step at or above STUDY_PSNR_DB, and the training seconds
up to it (step time from metrics.jsonl; evaluations and start-up excluded), and the final
model's bottleneck health: each of the 4 channels' active fraction after conv2's ReLU over the
first 1,000 training images (bench/bottleneck.py; near 0 is a silent channel). Pass --eval-every
in the train flags for a finer time to quality than once per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bottleneck import channel_activity  # noqa: E402
from bench.throughput import machine_info  # noqa: E402

STUDY_PSNR_DB = 20.48  # the study's recipe after 100 epochs (measured on an H100 before this project)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final evaluation and time to the study's quality, from one run's metrics.jsonl rows."""
    split = "val" if any("val/psnr_db" in r for r in rows) else "test"
    evals = [r for r in rows if f"{split}/psnr_db" in r]
    final = evals[-1]
    reached = next((r["step"] for r in evals if r[f"{split}/psnr_db"] >= STUDY_PSNR_DB), None)
    train_seconds, seconds_to_quality, previous_step = 0.0, None, 0
    for r in (r for r in rows if "train/step_time_ms" in r):
        train_seconds += r["train/step_time_ms"] * (r["step"] - previous_step) / 1000.0
        previous_step = r["step"]
        if reached is not None and seconds_to_quality is None and r["step"] >= reached:
            seconds_to_quality = train_seconds
    return {
        "split": split,
        "steps": final["step"],
        "epochs": final["epoch"],
        "psnr_db": final[f"{split}/psnr_db"],
        "bce_excess": final[f"{split}/bce_excess"],
        "best_psnr_db": max(r[f"{split}/psnr_db"] for r in evals),
        "train_seconds": train_seconds,
        "steps_to_study_quality": reached,
        "train_seconds_to_study_quality": seconds_to_quality,
    }


def run_one(data: Path, work: Path, name: str, seed: int, flags: list[str], threads: int | None) -> dict:
    out = work / name / f"seed{seed}"
    cmd = [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--seed", str(seed)]
    cmd += ["--wandb-mode", "disabled", "--fresh", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    log = work / name / f"seed{seed}.log"
    with log.open("w") as sink:
        result = subprocess.run(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {result.returncode}): see {log}")
    return {
        "name": name,
        "seed": seed,
        "flags": flags,
        **summarize_run(read_metrics(out)),
        "bottleneck_active": [round(f, 4) for f in channel_activity(data, out / "model.safetensors")],
        "wall_s": wall,
        "omp_threads": threads or os.environ.get("OMP_NUM_THREADS"),
        "load_average": [load_start, os.getloadavg()[0]],
    }


def run(args: argparse.Namespace) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / args.name).mkdir(parents=True, exist_ok=True)
    import torch

    machine = machine_info(torch.device("cpu"))
    machine = {k: machine[k] for k in ("hostname", "cpu_model", "cpus_usable", "torch")}
    threads = 1 if args.parallel > 1 else None
    with ThreadPoolExecutor(args.parallel) as pool:
        jobs = [
            pool.submit(run_one, args.data, args.work, args.name, s, args.flags, threads) for s in args.seeds
        ]
        for job in jobs:
            row = {**job.result(), "machine": machine}
            with (args.work / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(path: Path) -> str:
    """Markdown: one line per run, then per name the mean and the worst PSNR over its seeds."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "psnr_db" in r]  # a run stopped by hand has no final evaluation
    lines = [
        "| name | flags | seed | split | epochs | steps | PSNR dB | BCE excess | steps to 20.48 dB | "
        "train s to 20.48 dB | wall s | bottleneck active |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{' '.join(r['flags'])}` | {r['seed']} | {r['split']} | {r['epochs']} | {r['steps']} | "
            f"{r['psnr_db']:.2f} | {r['bce_excess']:.4f} | {_fmt(r['steps_to_study_quality'], 'd')} | "
            f"{_fmt(r['train_seconds_to_study_quality'], '.1f')} | {r['wall_s']:.0f} | "
            f"{' '.join(f'{a:.2f}' for a in r.get('bottleneck_active', [])) or '–'} |"
        )
    lines += [
        "",
        "| name | split | seeds | mean PSNR dB | worst PSNR dB | mean BCE excess |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        psnr = [r["psnr_db"] for r in runs]
        lines.append(
            f"| {name} | {runs[0]['split']} | {','.join(str(r['seed']) for r in runs)} | "
            f"{statistics.mean(psnr):.2f} | {min(psnr):.2f} | {statistics.mean(r['bce_excess'] for r in runs):.4f} |"
        )
    machine = rows[0]["machine"] if rows else {}
    lines.append(
        f"\n{machine.get('cpu_model')}, {machine.get('cpus_usable')} CPUs, torch {machine.get('torch')}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train one recipe for several seeds")
    p_run.add_argument("--data", type=Path, required=True)
    p_run.add_argument("--work", type=Path, required=True)
    p_run.add_argument("--name", required=True)
    p_run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_run.add_argument("--parallel", type=int, default=1, help="runs at a time (each on one thread if > 1)")
    p_run.add_argument("flags", nargs="*", help="train.py flags, after --")
    p_table = sub.add_parser("table", help="markdown table of a results.jsonl")
    p_table.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        print(table(args.results))


if __name__ == "__main__":
    main()
