"""How right would self-training's pseudo-labels be if the teacher averaged the n-gram classifier and
the pretrained fine-tune? Reads a finished `examples/sst2/run.sh` OUT, per seed: the round-0 n-gram
teacher (runs/selftrained-seedN/round0/ngram), the pretrained fine-tune (checkpoints/pretrained-seedN)
and pool.tsv, whose hidden labels only score the teachers here. Prints dev accuracy and the accuracy
of the 6,000 most confident pool predictions of each class (what the student trains on) for the
n-gram teacher, the GPT and their mean probability.

    python bench/sst2_teacher_mix.py work/sst2-run --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def kept_accuracy(probs: np.ndarray, gold: np.ndarray, labels: list[str], top_k: int, threshold: float) -> float:
    """How many of the predictions self-training would keep (`select_pseudo_labels`) are right."""
    from mtnlg_ray.finetune.selftrain import select_pseudo_labels

    rows = [{"pool_index": i, "label": labels[j], "confidence": float(p[j])}
            for i, (j, p) in enumerate(zip(probs.argmax(axis=1), probs))]
    kept = select_pseudo_labels(rows, labels, threshold, top_k)
    return sum(labels[gold[r["pool_index"]]] == r["label"] for r in kept) / len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--top-k", type=int, default=6000, help="selftrain.per_class_top_k")
    parser.add_argument("--threshold", type=float, default=0.5, help="selftrain.threshold")
    args = parser.parse_args()

    from mtnlg_ray.data.label import ClassifierLabeler
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.ngram import NgramClassifier

    dev = read_classification(args.out / "dev.tsv", "sentence", "label")
    pool = read_classification(args.out / "pool.tsv", "sentence", "label")
    results = []
    for seed in args.seeds:
        ngram = NgramClassifier.load(args.out / "runs" / f"selftrained-seed{seed}" / "round0" / "ngram")
        gpt = ClassifierLabeler(args.out / "checkpoints" / f"pretrained-seed{seed}", device="cpu")
        labels = ngram.labels
        row = {"seed": seed}
        for split, rows in (("dev", dev), ("pool", pool)):
            gold = np.array([labels.index(y) for y in rows.labels])
            p_ngram = ngram.predict_proba(rows.texts)
            p_gpt = gpt.probabilities(rows.texts)[:, [gpt.labels.index(x) for x in labels]]
            for name, probs in (("ngram", p_ngram), ("gpt", p_gpt), ("mean", (p_ngram + p_gpt) / 2)):
                if split == "dev":
                    row[f"dev_{name}"] = float((probs.argmax(1) == gold).mean())
                else:
                    row[f"pseudo_{name}"] = kept_accuracy(probs, gold, labels, args.top_k, args.threshold)
        print(json.dumps(row), flush=True)
        results.append(row)
    for key in results[0]:
        if key != "seed":
            print(f"{key}: mean {np.mean([r[key] for r in results]):.4f}")


if __name__ == "__main__":
    main()
