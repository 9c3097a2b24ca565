"""Labelling throughput: the Ray Data actor pool against the same labeller called in a plain loop.

The baseline is one process, one torch thread (what a one-CPU actor gets), calling the labeller on
the same documents in batches of the same size. The pool runs `label_documents` with 1 and 2 actors
on a local Ray of its own with workers at nice 0, as the CLI starts one. Each pool run sits between two baseline
runs and is compared with their mean, so the machine's drift over minutes cancels; `--repeats` such
brackets give the medians printed. Reported: docs/s end to end and of the warm pool (after every actor
has delivered a batch), each as pool / (actors x baseline), and when the first batch came out (actor
start-up: process spawn, imports, model load, paid once per run, which a longer corpus amortises).
Batch sizes default to the labellers' own (`label.batch_size: null`).

    python bench/label.py
    python bench/label.py --docs 4000 --batch-size 64 --actors 1 2 4 --skip-quality --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray
import torch
from common import build_checkpoint, command_line, quiet_ray_data, start_local_ray, write_result

from mtnlg_ray.config import LabelSection
from mtnlg_ray.data.builtin import python_docs_texts
from mtnlg_ray.data.label import LABELERS, PerplexityLabeler, QualityLabeler, label_documents
from mtnlg_ray.data.quality import train_quality_classifier


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
    models = {"perplexity": build_checkpoint("tiny", 512, workdir, seed=0)}
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
    """(docs/s end to end, docs/s once every actor has delivered a batch, seconds to the first batch).

    The second rate leaves out actor start-up (process spawn, imports, model load), paid once per
    run: it counts the documents after the `actors`-th output batch over the time after it."""
    cfg = LabelSection(labeler=kind, model=str(model), actors=(actors, actors), batch_size=batch_size)
    ds = ray.data.from_items(docs, override_num_blocks=-(-len(docs) // batch_size))  # a block a batch
    start = time.perf_counter()
    first_at, warm_at, warm_rows, seen, batches = None, None, 0, 0, 0
    for batch in label_documents(ds, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
        seen += batch.num_rows
        batches += 1
        if first_at is None:
            first_at = time.perf_counter()
        if batches == actors:
            warm_at, warm_rows = time.perf_counter(), seen
    end = time.perf_counter()
    assert seen == len(docs), (seen, len(docs))
    return len(docs) / (end - start), (seen - warm_rows) / max(end - warm_at, 1e-9), first_at - start


def bracketed(kind: str, model: Path, docs: list[dict], batch: int, actors: list[int], repeats: int) -> list[dict]:
    """Per actor count, the medians over `repeats` of pool runs each compared with the loop runs around it."""
    runs: dict[int, list[dict]] = {n: [] for n in actors}
    before = in_process(kind, model, docs, batch)
    for _ in range(repeats):
        for n in actors:
            rate, steady, first = through_pool(kind, model, docs, batch, n)
            after = in_process(kind, model, docs, batch)
            base = (before + after) / 2
            runs[n].append({"loop": base, "pool": rate, "ratio": rate / (n * base), "steady": steady,
                            "steady_ratio": steady / (n * base), "first_s": first})
            before = after
    return [
        {"labeller": kind, "docs": len(docs), "batch": batch, "actors": n, "repeats": runs[n],
         **{key: statistics.median(r[key] for r in runs[n]) for key in runs[n][0]}}
        for n in actors
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1280)
    parser.add_argument("--chars", type=int, default=600, help="about how long each document is")
    parser.add_argument("--batch-size", type=int, default=PerplexityLabeler.batch_size)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="bracketed pool runs per actor count")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--quality-docs", type=int, default=61440, help="the quality labeller is fast: more docs")
    parser.add_argument("--quality-batch-size", type=int, default=QualityLabeler.batch_size)
    parser.add_argument("--output", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the baseline gets what one actor gets: one CPU
    docs = corpus(max(0 if args.skip_perplexity else args.docs, 0 if args.skip_quality else args.quality_docs),
                  args.chars)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), not args.skip_quality)
        runs = {} if args.skip_perplexity else {"perplexity": (docs[: args.docs], args.batch_size)}
        if not args.skip_quality:
            runs["quality"] = (docs[: args.quality_docs], args.quality_batch_size)
        # Not one running here (ensure_ray would join it, and refuses num_cpus then).
        start_local_ray(num_cpus=max(os.cpu_count() or 1, max(args.actors)))
        quiet_ray_data()
        for kind, (run_docs, batch) in runs.items():
            rows += bracketed(kind, models[kind], run_docs, batch, args.actors, args.repeats)
        ray.shutdown()

    print(f"\ndocuments of ~{args.chars} chars, `tiny` model (perplexity); {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}; medians of {args.repeats} "
          "pool runs, each against the mean of the loop runs just before and after it")
    header = ("labeller", "docs", "batch", "actors", "loop docs/s", "pool docs/s", "vs n×loop", "warm pool",
              "vs n×loop", "1st batch s")
    print("{:<11} {:>6} {:>6} {:>6} {:>11} {:>11} {:>10} {:>10} {:>10} {:>12}".format(*header))
    for r in rows:
        print(f"{r['labeller']:<11} {r['docs']:>6} {r['batch']:>6} {r['actors']:>6} {r['loop']:>11.1f} "
              f"{r['pool']:>11.1f} {r['ratio']:>9.2f}× {r['steady']:>10.1f} {r['steady_ratio']:>9.2f}× "
              f"{r['first_s']:>12.1f}")
    command = command_line()
    print("\ncommand: " + command)
    if args.output:
        result = {"command": command, "machine": platform.machine(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "ray": ray.__version__, "rows": rows}
        write_result(args.output, result)


if __name__ == "__main__":
    main()
