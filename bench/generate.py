"""Generation speed on CPU: our KV-cache decoder against Hugging Face `generate` on the exported model.

One process, one set of weights (saved as our checkpoint, exported with `export_hf`, each side loads
its own copy from disk), the same prompt ids, greedy decoding, exactly N new tokens on both sides.
The token sequences must match before a time counts. Prints tokens/s, ours/HF, and t(512)/t(256).

    python bench/generate.py
    python bench/generate.py --preset gpt3-125m --batch 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from common import build_checkpoint, write_result
from transformers import GPT2LMHeadModel

from mtnlg_ray.checkpoint import load_checkpoint, tokenizer_path
from mtnlg_ray.export import export_hf
from mtnlg_ray.model.generate import SamplingParams, generate
from mtnlg_ray.model.gpt import GPT, inference_layout
from mtnlg_ray.tokenizer import eos_id, load_tokenizer

# Prompts are cut from this text; with random weights their content does not matter, only their ids.
PROMPT_TEXT = (
    "The Python interpreter reads a program as a stream of tokens produced by the lexical analyzer. "
    "Each logical line is built from one or more physical lines by following the explicit or implicit "
    "line joining rules. A function definition is an executable statement: its execution binds the "
    "function name in the current local namespace to a function object, a wrapper around the executable "
    "code for the function. Generators are written like regular functions but use the yield statement "
    "whenever they want to return data, and each time next() is called on one, the generator resumes "
    "where it left off, remembering all the data values and which statement was last executed. "
)


def build_models(
    preset: str, seq_len: int, vocab: int, workdir: Path, seed: int
) -> tuple[GPT, GPT2LMHeadModel, list[int], int]:
    """Our model and HF's GPT-2 with the same weights, both read back from disk; plus text ids and EOS."""
    ckpt = build_checkpoint(preset, vocab, workdir, seed, seq_len=seq_len)
    tok = load_tokenizer(tokenizer_path(ckpt))
    export_hf(ckpt, workdir / "hf")
    ours, _ = load_checkpoint(ckpt)
    inference_layout(ours)  # as TextGenerator (mtnlg-ray generate, Serve) loads it
    hf = GPT2LMHeadModel.from_pretrained(workdir / "hf", dtype=torch.float32).eval()
    return ours, hf, tok.encode(PROMPT_TEXT).ids, eos_id(tok)


def make_prompts(ids: list[int], batch: int, length: int) -> list[list[int]]:
    """`batch` different prompts of `length` tokens each (equal lengths: no padding on either side)."""
    while len(ids) < batch * length:
        ids = ids + ids
    return [ids[row * length : (row + 1) * length] for row in range(batch)]


def run_ours(model: GPT, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    return [c.tokens for c in generate(model, prompts, params)]


def run_hf(model: GPT2LMHeadModel, prompts: list[list[int]], new_tokens: int, pad: int) -> list[list[int]]:
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        # eos_token_id=None leaves the logits alone (min_new_tokens would mask EOS) and never stops early.
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
        )
    return out[:, ids.shape[1] :].tolist()


def check_parity(ours: list[list[int]], theirs: list[list[int]], new_tokens: int, what: str) -> None:
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if len(a) != new_tokens or len(b) != new_tokens:
            raise SystemExit(f"{what}, row {row}: expected {new_tokens} tokens, ours {len(a)}, HF {len(b)}")
        if a != b:
            first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            raise SystemExit(
                f"{what}, row {row}: tokens differ from position {first} (ours {a[first]}, HF {b[first]})"
            )


def measure(
    ours: GPT, hf: GPT2LMHeadModel, prompts: list[list[int]], lengths: tuple[int, ...], repeats: int, pad: int
) -> list[dict]:
    """Median (and best) seconds of each side at each length, the runs of one repeat taken in rotating order.

    The rotation puts each (side, length) first, second, ... in turn, so a machine that slows down or
    speeds up during the run favours neither side and neither length.
    """
    runs = [(side, n) for n in lengths for side in ("ours", "hf")]
    seconds: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for rep in range(repeats):
        tokens = {}
        for side, n in runs[rep % len(runs) :] + runs[: rep % len(runs)]:
            start = time.perf_counter()
            tokens[side, n] = run_ours(ours, prompts, n) if side == "ours" else run_hf(hf, prompts, n, pad)
            seconds[side, n].append(time.perf_counter() - start)
        for n in lengths:
            check_parity(tokens["ours", n], tokens["hf", n], n, f"batch {len(prompts)}, {n} new tokens")
    rows = []
    for n in lengths:
        ours_t, hf_t = statistics.median(seconds["ours", n]), statistics.median(seconds["hf", n])
        rows.append({
            "batch": len(prompts),
            "new_tokens": n,
            "ours_s": ours_t,
            "hf_s": hf_t,
            "ours_tok_s": len(prompts) * n / ours_t,
            "hf_tok_s": len(prompts) * n / hf_t,
            "speedup": hf_t / ours_t,
            # Each repeat times both sides within seconds of each other, so this ratio cancels the
            # machine's drift over the run (here often +-20 %), which separate medians do not.
            "speedup_paired": statistics.median(h / o for h, o in zip(seconds["hf", n], seconds["ours", n])),
            "speedup_best": min(seconds["hf", n]) / min(seconds["ours", n]),
            "ours_runs_s": seconds["ours", n],
            "hf_runs_s": seconds["hf", n],
        })
    return rows


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process (and the hypervisor's steal) has used since boot; None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait keep a CPU from us.
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def print_table(rows: list[dict], scaling: list[dict], header: str) -> None:
    print(header)
    print()
    print("| batch | new tokens | ours tok/s | HF tok/s | ours / HF (median of per-repeat ratios) "
          "| ours / HF (ratio of medians) | ours / HF (best runs) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['new_tokens']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} "
            f"| {r['speedup_paired']:.2f}x | {r['speedup']:.2f}x | {r['speedup_best']:.2f}x |"
        )
    print()
    print("| batch | ratio | ours (median of per-repeat ratios) | HF | ours (ratio of medians) | HF |")
    print("|---:|---|---:|---:|---:|---:|")
    for s in scaling:
        print(f"| {s['batch']} | t({s['long']} new) / t({s['short']} new) | {s['ours']:.2f} | {s['hf']:.2f} "
              f"| {s['ours_ratio_of_medians']:.2f} | {s['hf_ratio_of_medians']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer trained on builtin:python-docs")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[256, 512], metavar=("SHORT", "LONG"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    short, long = args.new_tokens
    if args.prompt_tokens + long > args.seq_len:
        parser.error(f"--prompt-tokens {args.prompt_tokens} + {long} new tokens exceed --seq-len {args.seq_len}")

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        ours, hf, text_ids, eos = build_models(args.preset, args.seq_len, args.vocab_size, Path(tmp), args.seed)
    config = ours.config
    header = (
        f"preset {args.preset} ({config.n_layer} layers, d_model {config.d_model}, vocab {config.vocab_size}, "
        f"seq_len {config.seq_len}, {ours.num_parameters() / 1e6:.1f}M params, fp32), "
        f"prompt {args.prompt_tokens} tokens, greedy, median of {args.repeats}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )

    timing_started, busy_before, own_before = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    # Warm-up: first calls allocate, pick kernels, and fill HF's lazy caches.
    for batch in args.batch:
        warm = make_prompts(text_ids, batch, args.prompt_tokens)
        check_parity(run_ours(ours, warm, 32), run_hf(hf, warm, 32, eos), 32, f"warm-up batch {batch}")

    rows, scaling = [], []
    for batch in args.batch:
        prompts = make_prompts(text_ids, batch, args.prompt_tokens)
        at_short, at_long = measure(ours, hf, prompts, (short, long), args.repeats, eos)
        rows += [at_short, at_long]
        # As for ours / HF: the median of per-repeat ratios (both lengths timed within seconds of each
        # other) cancels the machine's drift; the ratio of the two medians is kept beside it.
        paired = {
            side: statistics.median(
                long_s / short_s for short_s, long_s in zip(at_short[f"{side}_runs_s"], at_long[f"{side}_runs_s"])
            )
            for side in ("ours", "hf")
        }
        scaling.append({
            "batch": batch,
            "short": short,
            "long": long,
            "ours": paired["ours"],
            "hf": paired["hf"],
            "ours_ratio_of_medians": at_long["ours_s"] / at_short["ours_s"],
            "hf_ratio_of_medians": at_long["hf_s"] / at_short["hf_s"],
        })
    busy_after, own_after = busy_cpu_seconds(), own_cpu_seconds()
    others = None
    if busy_before is not None and busy_after is not None:
        # Another busy process on a 2-core machine stalls torch's worker threads, so say how busy it was.
        others = (busy_after - busy_before - (own_after - own_before)) / (time.perf_counter() - timing_started)

    print_table(rows, scaling, header)
    print()
    print(f"parity: greedy tokens identical in every run; wall time {time.perf_counter() - started:.0f} s")
    if others is not None:
        print(f"other processes used {max(others, 0.0):.2f} of {os.cpu_count()} CPUs on average while this one timed")
        if others > 0.25:
            print("warning: the machine was busy; runs stalled by other processes make these ratios unreliable")
    print("command: python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    if args.json:
        result = {"setup": header, "rows": rows, "scaling": scaling, "other_processes_cpus": others}
        write_result(args.json, result)


if __name__ == "__main__":
    main()
