"""GPU path check (run on a lent GPU, never in CI): bf16, SDPA flash attention, MFU, generation.

Prints one JSON object and writes it to $OUT/gpu.json when OUT is set:
  - the bf16 matmul peak measured in this run (8192^3 products),
  - forward+backward of the model under SDPA's FLASH_ATTENTION backend only (fails if flash can't run),
  - training-step tokens/s and MFU of a preset (bf16 autocast, fp32 master weights, fused AdamW),
    eager and torch.compile'd, MFU against both the measured peak and the datasheet peak,
  - KV-cache generation tokens/s at batch 1 and 16.

    python bench/gpu_check.py --preset gpt3-350m --micro-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common  # noqa: F401  (puts this checkout on sys.path before the mtnlg_ray imports)
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtnlg_ray.model import GPT, PRESETS, lm_loss
from mtnlg_ray.model.flops import flops_per_token, get_gpu
from mtnlg_ray.model.generate import SamplingParams, generate


def timed(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, reps=20, warmup=5)
    return 2 * 8192**3 / seconds / 1e12


def train_step_fn(model, optimizer, x, y):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure_training(config, micro_batch: int, compile_model: bool, peak_measured: float, peak_sheet: float) -> dict:
    torch.manual_seed(0)
    model = GPT(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x = torch.randint(0, config.vocab_size, (micro_batch, config.seq_len + 1), device="cuda")
    inputs, targets = x[:, :-1], x[:, 1:]
    run = torch.compile(model) if compile_model else model
    step = train_step_fn(run, optimizer, inputs, targets)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        seconds = timed(step, reps=10, warmup=3)
    tokens = micro_batch * config.seq_len
    achieved = flops_per_token(config) * tokens / seconds / 1e12
    result = {
        "compile": compile_model,
        "micro_batch": micro_batch,
        "seq_len": config.seq_len,
        "first_step_s": round(first, 2),
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds),
        "model_tflops": round(achieved, 1),
        "mfu_vs_measured_peak": round(achieved / peak_measured, 4),
        "mfu_vs_datasheet_peak": round(achieved / peak_sheet, 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    del model, optimizer, run
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def measure_generation(config, batch: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).cuda().to(torch.bfloat16).eval()
    prompts = [list(range(1, 33)) for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, stop_at_eos=False)
    generate(model, prompts, SamplingParams(max_tokens=8, temperature=0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    produced = sum(len(o.tokens) for o in out)
    return {"batch": batch, "new_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(produced / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt3-350m")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--gen-preset", default="gpt3-125m")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = True
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    peak = matmul_peak()
    sheet = get_gpu("h200-141gb").peak_tflops_bf16
    report["matmul_bf16_tflops_measured"] = round(peak, 1)
    report["datasheet_bf16_tflops"] = sheet
    print(json.dumps(report), flush=True)

    config = PRESETS[args.preset]
    report["preset"] = args.preset
    report["train"] = [measure_training(config, args.micro_batch, False, peak, sheet)]
    print(json.dumps(report["train"][-1]), flush=True)
    if not args.no_compile:
        try:
            report["train"].append(measure_training(config, args.micro_batch, True, peak, sheet))
        except Exception as exc:  # a compile failure is a finding to report, not a reason to lose the rest
            report["train"].append({"compile": True, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(json.dumps(report["train"][-1]), flush=True)

    gen_config = PRESETS[args.gen_preset]
    report["generate_preset"] = args.gen_preset
    report["generate"] = [measure_generation(gen_config, b, 256) for b in (1, 16)]
    print(json.dumps(report["generate"]), flush=True)

    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(text)


if __name__ == "__main__":
    main()
