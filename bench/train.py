"""Pretraining throughput on CPU: `mtnlg-ray pretrain` on one Ray Train worker against a bare PyTorch loop.

Both sides train the same model (same preset, seed and initial weights) on the same packed
sequences, with the same micro-batch, the same number of torch threads, AdamW (0.9, 0.95) and
gradient clipping at 1.0. Ours is the real command path (`mtnlg_ray.train.trainer.pretrain`: Ray
Train `TorchTrainer`, one worker, the default parallel settings); its step times are the wall time
between consecutive step records of the run's `metrics.jsonl`. The baseline is a plain loop in this process, run once before and once after
ours (their mean is the baseline, which cancels a steady drift of the machine's speed). Steps before
`--skip` (warm-up) and the last step (it evaluates and writes the final checkpoint) are left out; tokens/s is
sequences × seq_len over the median step time. MFU is Megatron's FLOPs per token
(`mtnlg_ray.model.flops`) × tokens/s over a matmul peak measured in this run.

    python bench/train.py
    python bench/train.py --preset tiny --seq-len 128 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SHAKESPEARE, command_line, metrics_records, prepare_packed, start_local_ray, write_result

from mtnlg_ray.config import load_config
from mtnlg_ray.model.flops import flops_per_token
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.model.presets import build_on_meta


def train_settings(args: argparse.Namespace, dataset: Path, runs: Path, peak: float) -> list[str]:
    return [
        f"data.path={dataset}", f"run.storage_path={runs}", "run.name=bench",
        f"model.preset={args.preset}", f"model.seq_len={args.seq_len}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}", "train.lr=3e-4", "train.warmup_tokens=0",
        f"train.eval_every={args.steps}", "train.eval_batches=1", f"checkpoint.every_steps={args.steps}",
        "parallel.workers=1", f"parallel.cpus_per_worker={args.threads}", f"train.peak_tflops={peak}",
        f"train.seed={args.seed}",
    ]


def run_ours(settings: list[str]) -> tuple[list[float], dict]:
    from mtnlg_ray.train.trainer import pretrain

    result = pretrain(load_config(overrides=settings, stage="pretrain"))
    records = metrics_records(result["run_dir"])
    start = next(r for r in records if r.get("event") == "start")
    # Wall time from one step's record to the next: whatever the loop does between steps (reporting
    # to Ray Train, logging) counts, not only the step itself (`step_time`).
    steps = [r for r in records if "loss" in r]
    return [steps[0]["step_time"]] + [b["time"] - a["time"] for a, b in zip(steps, steps[1:])], start


def run_bare(cfg, model_config, dataset: Path, steps: int) -> list[float]:
    """The plain loop: no Ray, no mesh, no FSDP; the same model, optimizer groups and data order."""
    from mtnlg_ray.data.pack import read_sequences
    from mtnlg_ray.train.parallel import param_groups

    model = GPT(model_config)
    model.reset_parameters(seed=cfg.train.seed)  # the trainer's initial weights
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay),
        lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps,
    )
    data = torch.from_numpy(read_sequences(dataset / "tokens", "train").astype(np.int64))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.train.seed))
    micro = cfg.train.micro_batch_size
    model.train()
    times = []
    for step in range(steps):
        started = time.perf_counter()
        rows = data[order[(step * micro) % len(data) :][:micro]]
        loss = lm_loss(model(rows[:, :-1]), rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(SHAKESPEARE) if SHAKESPEARE.is_file() else "builtin:python-docs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.steps <= args.skip + 1:
        parser.error("--steps must exceed --skip + 1")

    import ray

    from mtnlg_ray.train.loop import measured_peak_tflops

    # The worker at the priority `mtnlg-ray pretrain` gives it (nice 0), not Ray's default nice 15.
    start_local_ray(num_cpus=args.threads, include_dashboard=False)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        dataset = prepare_packed(args.data, Path(tmp) / "dataset", args.seq_len, args.vocab_size)
        peak = measured_peak_tflops(torch.device("cpu"), trials=15)
        settings = train_settings(args, dataset, Path(tmp) / "runs", peak)
        cfg = load_config(overrides=settings, stage="pretrain")
        vocab = json.loads((dataset / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        model_config = cfg.model.resolve(tokenizer_vocab=vocab)
        # The bare loop runs before and after ours: this VM's speed drifts by 10-20 % over minutes,
        # and bracketing cancels most of a steady drift.
        bare_before = run_bare(cfg, model_config, dataset, args.steps)
        ours_times, start = run_ours(settings)
        bare_after = run_bare(cfg, model_config, dataset, args.steps)
        peak_after = measured_peak_tflops(torch.device("cpu"), trials=15)
    ray.shutdown()

    window = slice(args.skip, args.steps - 1)
    tokens = args.micro_batch * args.seq_len
    ours_tok_s = tokens / statistics.median(ours_times[window])
    bare_runs = [tokens / statistics.median(times[window]) for times in (bare_before, bare_after)]
    bare_tok_s = statistics.mean(bare_runs)
    per_token = flops_per_token(model_config, args.seq_len)
    params = build_on_meta(model_config).num_parameters()
    result = {
        "setup": (f"preset {args.preset} ({model_config.n_layer} layers, d_model {model_config.d_model}, "
                  f"{params / 1e6:.1f}M params), seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
                  f"fp32, {args.threads} threads, steps {args.skip + 1}-{args.steps - 1} of {args.steps}; "
                  f"torch {torch.__version__}, ray {ray.__version__}; data {Path(args.data).name}"),
        "worker_threads": start.get("threads"),
        "peak_tflops": peak,
        "peak_tflops_after": peak_after,
        "ours_tok_s": ours_tok_s,
        "bare_tok_s": bare_tok_s,
        "ratio": ours_tok_s / bare_tok_s,
        "ours_mfu": per_token * ours_tok_s / (peak * 1e12),
        "bare_mfu": per_token * bare_tok_s / (peak * 1e12),
        "bare_tok_s_before_after": bare_runs,
        "ours_step_s": ours_times,
        "bare_step_s_before": bare_before,
        "bare_step_s_after": bare_after,
    }
    print(result["setup"])
    print(f"matmul peak measured in this run: {peak:.3f} TFLOP/s (after the runs: {peak_after:.3f})")
    print()
    print("| run | tokens/s | vs bare loop | MFU |")
    print("|---|---:|---:|---:|")
    print(f"| `mtnlg-ray pretrain`, 1 Ray Train worker | {ours_tok_s:.0f} | **{result['ratio']:.2f}×** "
          f"| {result['ours_mfu'] * 100:.1f} % |")
    print(f"| bare PyTorch loop, this process (mean of a run before and after ours: {bare_runs[0]:.0f}, "
          f"{bare_runs[1]:.0f}) | {bare_tok_s:.0f} | 1.00× | {result['bare_mfu'] * 100:.1f} % |")
    print()
    print(f"worker torch threads: {result['worker_threads']}")
    print("command: " + command_line())
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
