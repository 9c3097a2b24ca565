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


def gpt_probabilities(labeler, texts: list[str], labels: list[str]) -> np.ndarray:
    """Class probabilities of a binary classifier from its (label, confidence) predictions."""
    predicted, confidence = labeler.predict(texts)
    probs = np.zeros((len(texts), 2))
    for i, (label, p) in enumerate(zip(predicted, confidence)):
        j = labels.index(label)
        probs[i, j], probs[i, 1 - j] = p, 1.0 - p
    return probs


def top_k_accuracy(probs: np.ndarray, gold: np.ndarray, k: int) -> float:
    predicted, confidence = probs.argmax(1), probs.max(1)
    kept = np.concatenate([np.flatnonzero(predicted == c)[np.argsort(-confidence[predicted == c])][:k]
                           for c in range(probs.shape[1])])
    return float((predicted[kept] == gold[kept]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--top-k", type=int, default=6000)
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
            p_ngram, p_gpt = ngram.predict_proba(rows.texts), gpt_probabilities(gpt, rows.texts, labels)
            for name, probs in (("ngram", p_ngram), ("gpt", p_gpt), ("mean", (p_ngram + p_gpt) / 2)):
                if split == "dev":
                    row[f"dev_{name}"] = float((probs.argmax(1) == gold).mean())
                else:
                    row[f"pseudo_{name}"] = top_k_accuracy(probs, gold, args.top_k)
        print(json.dumps(row), flush=True)
        results.append(row)
    for key in results[0]:
        if key != "seed":
            print(f"{key}: mean {np.mean([r[key] for r in results]):.4f}")


if __name__ == "__main__":
    main()
