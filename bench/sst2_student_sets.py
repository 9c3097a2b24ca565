"""A self-training student's training set, rebuilt from one round's pseudo-labels with another rule.

    python bench/sst2_student_sets.py --round RUN/selftrained-seed0/round1 --pool OUT/pool.tsv \
        --out SET.jsonl [--per-class K] [--skip-spans | --sample-over T | --random-gold] [--gold-labels] \
        [--gold-copies 1] [--seed 0] [--known-by CLASSIFIER]

--round is a `mtnlg-ray self-train` round folder: its teacher's label and confidence for every pool
text (pseudo/docs) and the training set the round used (train.jsonl, the labelled rows first; the
run's self_train_report.json says how many).
The new set holds the labelled rows `--gold-copies` times, then the pool rows the rule keeps:

- by default `self-train`'s own rule (the `--per-class` most confident predictions of each class at
  or over the run's threshold; `--per-class` defaults to the run's `per_class_top_k`, and then the set
  is the round's train.jsonl byte for byte, for a run without soft labels);
- `--skip-spans`: in order of confidence, a pool text that is a word span of a row already kept is
  skipped, so the kept rows come from more distinct sentences (SST-2's pool holds every parse-tree
  phrase of each snippet, and most of a teacher's surest rows are phrases of the same few thousand);
- `--sample-over T`: a seeded random sample (`--seed`) of `--per-class` rows of each predicted class
  among those the teacher gives confidence T or more, so the kept rows are not only its easiest ones.

Two oracles, for analysis only (they read the pool's gold labels, which no product command does):

- `--gold-labels`: each kept row takes its gold label where the pool has one (what the kept rows would
  teach with no label errors);
- `--random-gold`: `--per-class` times the number of classes distinct pool texts, a seeded random
  sample, with their gold labels (what that many true labels on ordinary pool rows teach).

`--known-by CLASSIFIER` also prints the share of kept pool rows that classifier (a checkpoint
`mtnlg-ray evaluate` reads) already gives the kept label with confidence 0.9 or more: rows that
teach a student starting where that classifier stands little it does not know.

Train a student on it with `mtnlg-ray finetune` as the round did (BENCHMARKS.md, SST-2, 2026-12-06,
later). It prints one JSON line: the rows kept and how many of those with a gold label in the pool
(which training never reads) are right.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import common  # noqa: F401  (this checkout on sys.path)


def keep_distinct(rows: list[dict], labels: list[str], threshold: float, per_class: int) -> list[dict]:
    """The most confident rows of each class, skipping any text that is a word span of a row kept before it."""
    spans: set[str] = set()
    kept = {label: [] for label in labels}
    for row in sorted(rows, key=lambda r: -r["confidence"]):  # sorted() is stable: ties keep pool order
        if row["confidence"] < threshold or row["label"] not in kept:
            continue
        if len(kept[row["label"]]) >= per_class or row["text"] in spans:
            continue
        kept[row["label"]].append(row)
        words = row["text"].split()
        spans.update(" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1))
    return sorted((r for rows_ in kept.values() for r in rows_), key=lambda r: r["pool_index"])


def sample_over(rows: list[dict], labels: list[str], threshold: float, per_class: int, seed: int) -> list[dict]:
    """`per_class` rows of each predicted class drawn at random from those at or over `threshold`."""
    rng = random.Random(seed)
    kept = []
    for label in labels:
        mine = [r for r in rows if r["label"] == label and r["confidence"] >= threshold]
        kept.extend(rng.sample(mine, min(per_class, len(mine))))
    return sorted(kept, key=lambda r: r["pool_index"])


def random_gold(gold: dict[str, str], count: int, seed: int) -> list[dict]:
    """`count` distinct pool texts drawn at random, labelled with their gold labels, in pool order."""
    texts = list(gold)  # first occurrence order
    picked = sorted(random.Random(seed).sample(range(len(texts)), min(count, len(texts))))
    return [{"text": texts[i], "label": gold[texts[i]], "pool_index": i} for i in picked]


def known_share(classifier: Path, kept: list[dict], confidence: float = 0.9) -> float:
    """The share of `kept` rows that `classifier` gives the kept label with at least `confidence`."""
    from mtnlg_ray.data.label import ClassifierLabeler

    predicted, sure = ClassifierLabeler(classifier).predict([r["text"] for r in kept])
    return sum(p == r["label"] and c >= confidence for p, r, c in zip(predicted, kept, sure)) / max(len(kept), 1)


def main() -> None:
    from mtnlg_ray.finetune.data import read_table
    from mtnlg_ray.finetune.selftrain import _pseudo_labels, select_pseudo_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round", type=Path, required=True, help="a self-train round folder (roundN)")
    parser.add_argument("--pool", type=Path, required=True, help="the pool with gold labels, to score the kept rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=None, help="default: the run's per_class_top_k")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--skip-spans", action="store_true")
    rule.add_argument("--sample-over", type=float, default=None, metavar="T")
    rule.add_argument("--random-gold", action="store_true", help="oracle: random pool rows, gold labels")
    parser.add_argument("--gold-labels", action="store_true", help="oracle: kept rows take their gold labels")
    parser.add_argument("--gold-copies", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="for --sample-over and --random-gold")
    parser.add_argument("--known-by", type=Path, default=None, metavar="CLASSIFIER")
    parser.add_argument("--text-field", default="sentence")
    parser.add_argument("--label-field", default="label")
    args = parser.parse_args()

    report = json.loads((args.round.parent / "self_train_report.json").read_text())
    used = [json.loads(line) for line in (args.round / "train.jsonl").read_text().splitlines()]
    labelled = used[:report["labelled"]]  # train.jsonl holds the labelled rows first
    rows = _pseudo_labels(args.round / "pseudo" / "docs")  # self-train's own reader: label, confidence, pool_index
    labels = report["labels"]
    threshold = report["threshold"]
    # A run without a per-class cap kept every confident row: a cap of the whole pool keeps the same.
    per_class = args.per_class or report["per_class_top_k"] or len(rows)
    gold = {}
    for _, row in read_table(args.pool, [args.text_field, args.label_field]):
        gold.setdefault(row[args.text_field], str(row[args.label_field]))
    if args.skip_spans:
        kept = keep_distinct(rows, labels, threshold, per_class)
    elif args.sample_over is not None:
        kept = sample_over(rows, labels, args.sample_over, per_class, args.seed)
    elif args.random_gold:
        kept = random_gold(gold, per_class * len(labels), args.seed)
    else:
        kept = select_pseudo_labels(rows, labels, threshold, per_class)
    if args.gold_labels:
        kept = [{**r, "label": gold.get(r["text"], r["label"])} for r in kept]
    scored = [r for r in kept if r["text"] in gold]  # a grown pool's extra sentences have no gold label
    right = sum(gold[r["text"]] == r["label"] for r in scored)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for row in labelled * args.gold_copies:
            fh.write(json.dumps(row) + "\n")
        for row in kept:
            fh.write(json.dumps({args.text_field: row["text"], args.label_field: row["label"]}) + "\n")
    words = sum(len(r["text"].split()) for r in kept) / max(len(kept), 1)
    summary = {"out": str(args.out), "labelled": len(labelled) * args.gold_copies, "kept": len(kept),
               "scored": len(scored), "kept_right": round(right / max(len(scored), 1), 4),
               "mean_words": round(words, 1)}
    if args.known_by is not None:
        summary["known_by"] = {"classifier": str(args.known_by), "share": round(known_share(args.known_by, kept), 4)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
