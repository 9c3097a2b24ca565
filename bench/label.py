"""Labelling throughput: the Ray Data actor pool against the same labeller called in a plain loop.

The baseline is one process, one torch thread (what a one-CPU actor gets), calling the labeller on
the same documents in batches of the same size. The pool runs `label_documents` with 1 and 2 actors
on a local Ray. Prints docs/s end to end and after the first labelled batch, each as pool / (actors ×
baseline), and when that first batch came out (actor start-up: process spawn, imports, model load, paid
once per run, which a longer corpus amortises).

    python bench/label.py
    python bench/label.py --docs 4000 --batch-size 64 --actors 1 2 4 --skip-quality
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from mtnlg_ray.checkpoint import init_checkpoint  # noqa: E402
from mtnlg_ray.config import LabelSection  # noqa: E402
from mtnlg_ray.data.builtin import python_docs_texts  # noqa: E402
from mtnlg_ray.data.label import LABELERS, label_documents  # noqa: E402
from mtnlg_ray.data.quality import train_quality_classifier  # noqa: E402
from mtnlg_ray.tokenizer import train_tokenizer  # noqa: E402


def corpus(n: int, chars: int) -> list[dict]:
    """`n` documents of about `chars` characters, cut from the built-in Python docs at paragraph breaks."""
    pieces, current = [], ""
    for text in python_docs_texts():
        for para in re.split(r"\n\s*\n", text):
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= chars:
                pieces.append(current[: 2 * chars])
                current = ""
    docs = [pieces[i % len(pieces)] for i in range(n)]
    return [{"id": f"{i:08x}", "text": t, "source": "docs", "location": f"bench:{i}"} for i, t in enumerate(docs)]


def junk(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(40, 150)))


def build_models(workdir: Path, want_quality: bool) -> dict[str, Path]:
    tok = train_tokenizer(["builtin:python-docs"], 512, workdir / "tokenizer", show_progress=False)
    models = {"perplexity": init_checkpoint("tiny", tok, workdir / "tiny", seed=0)}
    if want_quality:
        texts = list(python_docs_texts())
        words = re.findall(r"[a-z]+", " ".join(texts).lower())
        rng = random.Random(0)
        (workdir / "junk.jsonl").write_text("".join(json.dumps({"text": junk(rng, words)}) + "\n" for _ in range(300)))
        train_quality_classifier(["builtin:python-docs"], [str(workdir / "junk.jsonl")], workdir / "quality", epochs=3)
        models["quality"] = workdir / "quality"
    return models


def in_process(kind: str, model: Path, docs: list[dict], batch_size: int) -> float:
    """docs/s of the labeller in a plain loop; the model loads before the clock starts."""
    labeler = LABELERS[kind](str(model))
    table = pa.Table.from_pylist(docs)
    labeler(table.slice(0, batch_size))  # warm-up: first-call allocations, lazy imports
    start = time.perf_counter()
    for offset in range(0, len(docs), batch_size):
        labeler(table.slice(offset, batch_size))
    return len(docs) / (time.perf_counter() - start)


def through_pool(kind: str, model: Path, docs: list[dict], batch_size: int, actors: int) -> tuple[float, float, float]:
    """(docs/s end to end, docs/s after the first labelled batch, seconds to that batch) through `label_documents`.

    The second rate leaves out actor start-up (process spawn, imports, model load), paid once per run."""
    cfg = LabelSection(labeler=kind, model=str(model), actors=(actors, actors), batch_size=batch_size)
    ds = ray.data.from_items(docs, override_num_blocks=max(8, len(docs) // batch_size))
    start = time.perf_counter()
    first_at, first_rows, seen = None, 0, 0
    for batch in label_documents(ds, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
        seen += batch.num_rows
        if first_at is None:
            first_at, first_rows = time.perf_counter(), batch.num_rows
    end = time.perf_counter()
    assert seen == len(docs), (seen, len(docs))
    return len(docs) / (end - start), (seen - first_rows) / max(end - first_at, 1e-9), first_at - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1200)
    parser.add_argument("--chars", type=int, default=600, help="about how long each document is")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quality-docs", type=int, default=20000, help="the quality labeller is fast: more docs")
    parser.add_argument("--quality-batch-size", type=int, default=1000)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the baseline gets what one actor gets: one CPU
    docs = corpus(max(args.docs, args.quality_docs if not args.skip_quality else 0), args.chars)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), not args.skip_quality)
        runs = {"perplexity": (docs[: args.docs], args.batch_size)}
        if not args.skip_quality:
            runs["quality"] = (docs[: args.quality_docs], args.quality_batch_size)
        baselines = {kind: in_process(kind, models[kind], d, b) for kind, (d, b) in runs.items()}
        ray.init(num_cpus=max(os.cpu_count() or 1, max(args.actors)), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        for kind, (run_docs, batch) in runs.items():
            base = baselines[kind]
            rows.append((kind, len(run_docs), batch, "in-process loop, 1 thread", base, 1.0, base, 1.0, "-"))
            for n in args.actors:
                rate, steady, first = through_pool(kind, models[kind], run_docs, batch, n)
                run = f"actor pool, {n} actor{'s' if n > 1 else ''}"
                rows.append((kind, len(run_docs), batch, run, rate, rate / (n * base), steady, steady / (n * base),
                             f"{first:.1f}"))
        ray.shutdown()

    print(f"\ndocuments of ~{args.chars} chars, `tiny` model (perplexity); {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    header = ("labeller", "docs", "batch", "run", "docs/s", "vs n×loop", "after 1st", "vs n×loop", "1st batch s")
    print("{:<11} {:>6} {:>6} {:<27} {:>9} {:>10} {:>10} {:>10} {:>12}".format(*header))
    for kind, n_docs, batch, run, rate, ratio, steady, steady_ratio, first in rows:
        print(f"{kind:<11} {n_docs:>6} {batch:>6} {run:<27} {rate:>9.1f} {ratio:>9.2f}× {steady:>10.1f} "
              f"{steady_ratio:>9.2f}× {first:>12}")
    print("\ncommand: python bench/label.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
