"""The whole corpus pipeline on a large generated .txt: driver memory, docs/s per CPU, and scaling.

Generates a .txt of `--megabytes` MB (paragraphs of made-up words, one in twenty repeated so dedup has
work), then runs `mtnlg-ray data prepare` (`prepare_dataset`, paragraph mode, every default stage: read
in blocks, clean, exact and fuzzy dedup, tokenizer training, packing) on it and on a file twice as
large, in fresh processes, and reports for each: wall seconds, documents per second per CPU, and the
driver's peak RSS (`getrusage`); then t(2x) / t(1x) (target <= 2.2). Issue 19's target is a 2 GB file
with the driver under 2 GB.

    python bench/prepare.py --megabytes 50       # 50 MB and 100 MB
    python bench/prepare.py --megabytes 1024     # the 1 GB / 2 GB run (hours on 2 cores)
    python bench/prepare.py --megabytes 1024 --scales 2   # only the 2 GB file (about 70 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYLLABLES = ["ka", "lo", "mi", "ren", "sto", "vel", "dar", "ni", "qua", "te", "bor", "sil", "un", "fe", "ra", "gho"]


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about `megabytes` MB of paragraphs; returns the paragraph count."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    target = int(megabytes * 1e6)
    written = paragraphs = 0
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as fh:
        while written < target:
            if recent and rng.random() < 0.05:
                paragraph = rng.choice(recent)  # an exact duplicate
            else:
                sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + "."
                             for _ in range(rng.randint(3, 9))]
                paragraph = " ".join(sentences)
                recent = (recent + [paragraph])[-200:]
            fh.write(paragraph + "\n\n")
            written += len(paragraph) + 2
            paragraphs += 1
    return paragraphs


def run_one(corpus: Path, output: Path) -> dict:
    """`prepare_dataset` in this process (a fresh one per size): seconds, documents, driver peak RSS."""
    from common import start_local_ray

    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import prepare_dataset

    start_local_ray(num_cpus=os.cpu_count())  # workers at nice 0, as `mtnlg-ray data prepare` runs them
    config = load_config(overrides=["read.txt_mode=paragraph", "tokenizer.vocab_size=8192", "pack.seq_len=512"],
                         stage="prepare")
    start = time.perf_counter()
    manifest = prepare_dataset([str(corpus)], output, config)
    seconds = time.perf_counter() - start
    stages = {s["name"]: s["seconds"] for s in manifest["stages"]}
    return {"seconds": seconds, "documents_read": manifest["stages"][0]["out"], "documents": manifest["documents"],
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50.0, help="size of the 1x corpus")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2],
                        help="which multiples of --megabytes to run (default 1 2; `--scales 2` runs only the large one)")
    parser.add_argument("--one", nargs=2, metavar=("CORPUS", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), Path(args.one[1]))))
        return

    cpus = os.cpu_count() or 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtnlg-prepare-") as tmp:
        for scale in args.scales:
            corpus = Path(tmp) / f"corpus-{scale}x.txt"
            paragraphs = generate(corpus, args.megabytes * scale, seed=scale)
            proc = subprocess.run([sys.executable, __file__, "--one", str(corpus), str(Path(tmp) / f"out-{scale}x")],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{scale}x failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result |= {"megabytes": corpus.stat().st_size / 1e6, "paragraphs": paragraphs,
                       "docs_per_s_per_cpu": result["documents_read"] / result["seconds"] / cpus}
            results[f"{scale}x"] = result
            corpus.unlink()
    for name, r in results.items():
        print(f"{name}: {r['megabytes']:,.0f} MB, {r['documents_read']:,} documents read, {r['documents']:,} kept, "
              f"{r['seconds']:,.0f} s, {r['docs_per_s_per_cpu']:,.0f} docs/s per CPU, driver peak RSS "
              f"{r['driver_peak_rss_bytes'] / 2**30:.2f} GiB")
        print("    " + ", ".join(f"{stage} {s:,.0f} s" for stage, s in r["stages"].items()))
    ratio = None
    if {"1x", "2x"} <= results.keys():
        ratio = results["2x"]["seconds"] / results["1x"]["seconds"]
        print(f"t(2x) / t(1x) = {ratio:.2f} (target <= 2.2)")
    if args.out:
        args.out.write_text(json.dumps({"cpus": cpus, "results": results, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
