"""Memory per rank when a model is larger than one worker should hold: gpt3-760m on 4 CPU workers.

`mtnlg-ray pretrain` (the real Ray Train path) trains the gpt3-760m preset for one step at tp4 and
at dp4 (FSDP), 4 gloo workers sharing this machine's cores. From each run's `metrics.jsonl` it reads
what the largest rank held: after setup (`start` event: parameters, peak RSS once the model was
built on the meta device, sharded and initialised, before the first step) and after the first step
(`memory` event: gradients and Adam's moments too). Beside them: `mtnlg-ray plan`'s prediction
for the same layout (fp32 weights + gradients + Adam, FSDP over dp) and one process training the
whole model in a fresh process of its own, the baseline a user without parallelism has. Targets (issue 14):
every rank's setup peak <= half the model's fp32 bytes + 1 GB; the planner within 10 % of the
measured state bytes.

    python bench/memory.py                       # gpt3-760m, about 10 minutes on 2 cores
    python bench/memory.py --preset small --vocab 4096   # a quick check of the script
"""

from __future__ import annotations

import argparse
import multiprocessing
import json
import os
import resource
import tempfile
from pathlib import Path

import ray
import torch
from common import SHAKESPEARE, metrics_records, prepare_packed, start_local_ray, write_result

from mtnlg_ray.config import load_config
from mtnlg_ray.model.gpt import GPT, GPTConfig, lm_loss
from mtnlg_ray.model.plan import plan_layout

GIB = 2**30
LAYOUTS = {"tp4": ["parallel.workers=4", "parallel.tp=4"], "dp4": ["parallel.workers=4", "parallel.fsdp=true"]}


def run_layout(name: str, args: argparse.Namespace, dataset: Path, runs: Path) -> dict:
    from mtnlg_ray.train.trainer import pretrain

    settings = [
        f"data.path={dataset}", f"run.storage_path={runs}", f"run.name={name}", f"model.preset={args.preset}",
        "train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=1", "train.eval_every=100",
        "train.eval_batches=1", "train.peak_tflops=1.0", "parallel.cpus_per_worker=0.5", *LAYOUTS[name],
    ]
    result = pretrain(load_config(overrides=settings, stage="pretrain"))
    records = metrics_records(result["run_dir"])
    start = next(r for r in records if r.get("event") == "start")
    held = next(r for r in records if r.get("event") == "memory")
    shape = json.loads((Path(result["run_dir"]) / "final" / "config.json").read_text())["model"]
    return {"start": start, "memory": held, "loss": next(r["loss"] for r in records if "loss" in r), "shape": shape}


def one_process(config, seq_len: int) -> dict:
    """The whole model, its gradients and AdamW's moments in one process, after one step.

    Run in a fresh process (a spawned one): the peak RSS the kernel keeps is the process's
    lifetime high-water mark, and this one has prepared data and driven Ray Train by then."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = torch.randint(0, config.vocab_size, (1, seq_len + 1))
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "grads": grads, "optimizer": moments, "setup_peak_rss": setup_peak,
            "rss_before": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt3-760m")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary trained for the run")
    parser.add_argument("--seq-len", type=int, default=128, help="packed sequence length of the data")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    # A Ray of its own: prepare_dataset and pretrain would otherwise join one running here.
    start_local_ray(num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="mtnlg-memory-") as tmp:
        dataset = prepare_packed(str(SHAKESPEARE), Path(tmp) / "data", args.seq_len, args.vocab)
        measured = {name: run_layout(name, args, dataset, Path(tmp) / "runs") for name in LAYOUTS}
    ray.shutdown()

    start = measured["tp4"]["start"]
    params = start["trainable_parameters"]
    fp32_bytes = 4 * params
    config = GPTConfig.from_dict(measured["tp4"]["shape"])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        single = pool.apply(one_process, (config, args.seq_len))
    bound = fp32_bytes / 2 + 1 * GIB

    rows = []
    for name, run in measured.items():
        tp, dp = run["start"]["tp"], run["start"]["dp"]
        plan = plan_layout(args.preset, tp=tp, pp=1, dp=dp, vocab_size=config.vocab_size)
        state = run["memory"]["local_param_bytes"] + run["memory"]["local_grad_bytes"] + run["memory"]["local_optimizer_bytes"]
        predicted = plan["memory_gb_per_gpu"]["fsdp_fp32_state"] * 1e9
        rows.append({
            "layout": name, "params": run["memory"]["local_param_bytes"], "grads": run["memory"]["local_grad_bytes"],
            "optimizer": run["memory"]["local_optimizer_bytes"], "state": state, "planned_state": predicted,
            "plan_error": predicted / state - 1, "setup_peak_rss": run["start"]["peak_rss_bytes"],
            "step_peak_rss": run["memory"]["peak_rss_bytes"], "setup_within_bound": run["start"]["peak_rss_bytes"] <= bound,
            "loss": run["loss"],
        })
    one_state = single["params"] + single["grads"] + single["optimizer"]
    rows.append({"layout": "one process", "params": single["params"], "grads": single["grads"],
                 "optimizer": single["optimizer"], "state": one_state,
                 "planned_state": plan_layout(args.preset, 1, 1, 1, vocab_size=config.vocab_size)["memory_gb_per_gpu"][
                     "fsdp_fp32_state"] * 1e9,
                 "setup_peak_rss": single["setup_peak_rss"], "step_peak_rss": None})
    rows[-1]["plan_error"] = rows[-1]["planned_state"] / one_state - 1

    print(f"{args.preset}: {params:,} parameters (vocabulary padded to {config.vocab_size}), "
          f"fp32 {fp32_bytes / GIB:.2f} GiB; setup bound = half of that + 1 GiB = {bound / GIB:.2f} GiB")
    print(f"{'layout':<12} {'params':>9} {'grads':>9} {'Adam':>9} {'state':>9} {'plan':>9} {'plan err':>9} "
          f"{'setup RSS':>10} {'step RSS':>10}")
    for r in rows:
        step_rss = f"{r['step_peak_rss'] / GIB:.2f}" if r["step_peak_rss"] else "-"
        print(f"{r['layout']:<12} {r['params'] / GIB:>9.2f} {r['grads'] / GIB:>9.2f} {r['optimizer'] / GIB:>9.2f} "
              f"{r['state'] / GIB:>9.2f} {r['planned_state'] / GIB:>9.2f} {r['plan_error']:>+9.1%} "
              f"{r['setup_peak_rss'] / GIB:>10.2f} {step_rss:>10}")
    print("(GiB per rank, the largest rank; state = params + grads + Adam; plan = `mtnlg-ray plan`'s "
          "fsdp_fp32_state for the same layout)")
    if args.out:
        write_result(args.out, {"preset": args.preset, "parameters": params, "bound": bound, "rows": rows})


if __name__ == "__main__":
    main()
