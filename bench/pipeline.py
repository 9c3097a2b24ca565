"""Pipeline parallelism on CPU: the measured bubble against theory, and pp2 against dp2 on the same workers.

`mtnlg-ray pretrain` (Ray Train, 2 gloo workers of one core each) trains the `small` preset at pp2
with 1F1B and with interleaved 1F1B (2 stages a rank) for m = 2, 4 and 8 micro-batches a step
(global batch m x micro-batch, one data-parallel rank). A pipeline step takes t(m) = a*m + b: the
slope a is a micro-batch's pass through one rank's stages, the intercept b the fill and drain. Fit over
the three m, the measured bubble is b / t(m), beside theory: (p - 1) / (m + p - 1) for 1F1B, a v-th of
that interleaved. Then pp2 (1F1B, m = 8) against dp2 (FSDP over the same 2 workers, the same global
batch): tokens/s of each, as a ratio. Step times are the median of the steps after `--skip`.

    python bench/pipeline.py                    # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import ray
from common import (
    SHAKESPEARE,
    metrics_records,
    prepare_packed,
    start_local_ray,
    write_result,
)

from mtnlg_ray.config import load_config

LAYOUTS = {
    "1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "interleaved-1f1b": ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b", "parallel.pp_virtual=2"],
}


def step_times(args, dataset: Path, runs: Path, name: str, batch: int, layout: list[str]) -> tuple[float, float]:
    """(median step seconds, median tokens/s) of one run after the warm-up steps."""
    from mtnlg_ray.train.trainer import pretrain

    settings = [
        f"data.path={dataset}", f"run.storage_path={runs}", f"run.name={name}", f"model.preset={args.preset}",
        f"model.seq_len={args.seq_len}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={batch}", "train.eval_every=1000", f"checkpoint.every_steps={args.steps}",
        "train.peak_tflops=1.0", "parallel.workers=2", *layout,
    ]
    result = pretrain(load_config(overrides=settings, stage="pretrain"))
    records = metrics_records(result["run_dir"])
    # The last step also evaluates and writes the final checkpoint: left out.
    steps = [r for r in records if "loss" in r][args.skip : -1]
    return statistics.median(r["step_time"] for r in steps), statistics.median(r["tokens_per_s"] for r in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--counts", default="2,4,8", help="micro-batches a step to measure")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    pp = 2

    results: dict = {"bubble": {}, "throughput": {}}
    # A Ray of its own: prepare_dataset and pretrain would otherwise join one running here.
    start_local_ray(num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="mtnlg-pipeline-") as tmp:
        dataset = prepare_packed(str(SHAKESPEARE), Path(tmp) / "data", args.seq_len, vocab=2048)
        runs = Path(tmp) / "runs"
        for schedule, layout in LAYOUTS.items():
            virtual = 2 if "interleaved" in schedule else 1
            times = {m: step_times(args, dataset, runs, f"{schedule}-{m}", m * args.micro, layout)[0] for m in counts}
            slope, intercept = np.polyfit(counts, [times[m] for m in counts], 1)
            results["bubble"][schedule] = [
                {"m": m, "step_s": times[m], "measured": intercept / times[m],
                 "theory": (pp - 1) / (m + pp - 1) / virtual} for m in counts
            ]
        batch = max(counts) * args.micro
        for name, layout in {"pp2": LAYOUTS["1f1b"], "dp2": ["parallel.fsdp=true"]}.items():
            results["throughput"][name] = step_times(args, dataset, runs, f"tput-{name}", batch, layout)[1]
    ray.shutdown()

    print(f"{args.preset}, {args.seq_len}-token sequences, micro-batch {args.micro}, 2 workers (one core each)")
    print(f"{'schedule':<18} {'m':>3} {'step s':>8} {'bubble':>8} {'theory':>8}")
    for schedule, rows in results["bubble"].items():
        for row in rows:
            print(f"{schedule:<18} {row['m']:>3} {row['step_s']:>8.3f} {row['measured']:>8.1%} {row['theory']:>8.1%}")
    pp2, dp2 = results["throughput"]["pp2"], results["throughput"]["dp2"]
    print(f"tokens/s at {max(counts) * args.micro} sequences a step: pp2 (1F1B) {pp2:,.0f}, dp2 (FSDP) {dp2:,.0f}, "
          f"pp2/dp2 = {pp2 / dp2:.2f}x")
    if args.out:
        write_result(args.out, {"args": vars(args) | {"out": str(args.out)}, **results})


if __name__ == "__main__":
    main()
