"""A self-training student's training set, rebuilt from one round's pseudo-labels with another rule.

    python bench/sst2_student_sets.py --round RUN/selftrained-seed0/round1 --pool OUT/pool.tsv \
        --out SET.jsonl [--per-class K] [--skip-spans] [--gold-copies 1]

--round is a `mtnlg-ray self-train` round folder: its teacher's label and confidence for every pool
text (pseudo/docs) and the training set the round used (train.jsonl, the labelled rows first; the
run's self_train_report.json says how many).
The new set holds the labelled rows `--gold-copies` times, then the pool rows the rule keeps:

- by default `self-train`'s own rule (the `--per-class` most confident predictions of each class at
  or over the run's threshold; `--per-class` defaults to the run's `per_class_top_k`, and then the set
  is the round's train.jsonl byte for byte, for a run without soft labels);
- `--skip-spans`: in order of confidence, a pool text that is a word span of a row already kept is
  skipped, so the kept rows come from more distinct sentences (SST-2's pool holds every parse-tree
  phrase of each snippet, and most of a teacher's surest rows are phrases of the same few thousand).

Train a student on it with `mtnlg-ray finetune` as the round did (BENCHMARKS.md, SST-2, 2026-12-06,
later). It prints one JSON line: the rows kept and how many of them the pool's gold labels
(which training never reads) say are right.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    from mtnlg_ray.finetune.data import read_table
    from mtnlg_ray.finetune.selftrain import _pseudo_labels, select_pseudo_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round", type=Path, required=True, help="a self-train round folder (roundN)")
    parser.add_argument("--pool", type=Path, required=True, help="the pool with gold labels, to score the kept rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=None, help="default: the run's per_class_top_k")
    parser.add_argument("--skip-spans", action="store_true")
    parser.add_argument("--gold-copies", type=int, default=1)
    parser.add_argument("--text-field", default="sentence")
    parser.add_argument("--label-field", default="label")
    args = parser.parse_args()

    report = json.loads((args.round.parent / "self_train_report.json").read_text())
    used = [json.loads(line) for line in (args.round / "train.jsonl").read_text().splitlines()]
    labelled = used[:report["labelled"]]  # train.jsonl holds the labelled rows first
    rows = _pseudo_labels(args.round / "pseudo" / "docs")  # self-train's own reader: label, confidence, pool_index
    labels = report["labels"]
    threshold = report["threshold"]
    per_class = args.per_class or report["per_class_top_k"]
    if args.skip_spans:
        kept = keep_distinct(rows, labels, threshold, per_class or len(rows))
    else:
        kept = select_pseudo_labels(rows, labels, threshold, per_class)
    gold = {}
    for _, row in read_table(args.pool, [args.text_field, args.label_field]):
        gold.setdefault(row[args.text_field], str(row[args.label_field]))
    right = sum(gold.get(r["text"]) == r["label"] for r in kept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for row in labelled * args.gold_copies:
            fh.write(json.dumps(row) + "\n")
        for row in kept:
            fh.write(json.dumps({args.text_field: row["text"], args.label_field: row["label"]}) + "\n")
    words = sum(len(r["text"].split()) for r in kept) / max(len(kept), 1)
    print(json.dumps({"out": str(args.out), "labelled": len(labelled) * args.gold_copies, "kept": len(kept),
                      "kept_right": round(right / max(len(kept), 1), 4), "mean_words": round(words, 1)}))


if __name__ == "__main__":
    main()
