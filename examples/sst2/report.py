"""Score every checkpoint of an SST-2 run on the dev set, beside TF-IDF + logistic regression, into results.md.

Reads OUT/labelled.tsv and OUT/dev.tsv (written by make_splits.py), every classifier under
OUT/checkpoints/ (named KIND-seedN: random, pretrained, selftrained) and OUT/timings.tsv (step and
seconds, written by run.sh), and writes OUT/results.md and OUT/results.json: dev accuracy and macro
F1 per checkpoint, the mean and sample standard deviation of each kind over its seeds, the baseline
trained on the same labelled rows, and the wall time of each step.

    python examples/sst2/report.py work/sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from make_splits import read_tsv  # this folder is on sys.path when the script runs

KINDS = ("random", "pretrained", "selftrained")
TITLES = {"random": "fine-tuned from random weights", "pretrained": "fine-tuned from the pretrained model",
          "selftrained": "self-trained: noisy GPT students from the pretrained model"}


def tfidf_baseline(train, dev) -> dict:
    """Word uni- and bigram TF-IDF, logistic regression with C picked by 5-fold cross-validation on `train`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LogisticRegressionCV(Cs=10, cv=5, scoring="accuracy", max_iter=2000).fit(vectorizer.fit_transform(train.texts), train.labels)
    predicted = model.predict(vectorizer.transform(dev.texts))
    gold = dev.labels
    return {"accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, average="macro")), "C": float(model.C_[0])}


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run's output folder (run.sh's OUT)")
    args = parser.parse_args()

    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.evaluate import evaluate_classification

    out = args.out
    train, dev = (read_classification(out / name, "sentence", "label") for name in ("labelled.tsv", "dev.tsv"))
    baseline = tfidf_baseline(train, dev)
    scores: dict[str, dict[str, dict]] = {kind: {} for kind in KINDS}
    for checkpoint in sorted((out / "checkpoints").glob("*-seed*")):
        kind, _, seed = checkpoint.name.rpartition("-seed")
        if kind in scores and seed.isdigit():
            scores[kind][seed] = evaluate_classification(checkpoint, out / "dev.tsv", text_field="sentence")
    timings = read_tsv(out / "timings.tsv") if (out / "timings.tsv").is_file() else []

    lines = [f"# SST-2 with {len(train.rows):,} labels: dev accuracy ({len(dev.rows)} sentences)", "",
             "| model | seeds | accuracy (mean ± sd) | macro F1 (mean ± sd) | per seed (accuracy) |",
             "|---|---:|---:|---:|---|",
             f"| TF-IDF (1-2 grams) + logistic regression, C={baseline['C']:.3g} by 5-fold CV | - | "
             f"{baseline['accuracy']:.4f} | {baseline['macro_f1']:.4f} | deterministic |"]
    summary = {"labelled": len(train.rows), "dev": len(dev.rows), "tfidf_lr": baseline, "kinds": {}, "timings": timings}
    for kind in KINDS:
        runs = scores[kind]
        if not runs:
            continue
        acc = summarise([r["accuracy"] for r in runs.values()])
        f1 = summarise([r["macro_f1"] for r in runs.values()])
        per_seed = ", ".join(f"{seed}: {r['accuracy']:.4f}" for seed, r in sorted(runs.items()))
        lines.append(f"| {TITLES[kind]} | {len(runs)} | {acc[0]:.4f} ± {acc[1]:.4f} | {f1[0]:.4f} ± {f1[1]:.4f} | "
                     f"{per_seed} |")
        summary["kinds"][kind] = {"accuracy_mean": acc[0], "accuracy_sd": acc[1], "macro_f1_mean": f1[0],
                                  "macro_f1_sd": f1[1], "per_seed": runs}
    means = {k: v["accuracy_mean"] for k, v in summary["kinds"].items()}
    checks = []
    if "pretrained" in means:
        checks.append(("pretrained - TF-IDF + LR", means["pretrained"] - baseline["accuracy"], 0.04))
    if {"pretrained", "random"} <= means.keys():
        checks.append(("pretrained - random init", means["pretrained"] - means["random"], 0.04))
    if {"selftrained", "pretrained"} <= means.keys():
        checks.append(("self-trained - pretrained", means["selftrained"] - means["pretrained"], 0.03))
    lines += ["", "| gap (means) | points | target |", "|---|---:|---:|"]
    lines += [f"| {name} | {100 * gap:+.1f} | >= +{100 * target:.0f} |" for name, gap, target in checks]
    summary["gaps"] = {name: gap for name, gap, _ in checks}
    if timings:
        total = sum(float(t["seconds"]) for t in timings)
        lines += ["", "| step | wall |", "|---|---:|"]
        lines += [f"| {t['step']} | {float(t['seconds']) / 60:.1f} min |" for t in timings]
        lines.append(f"| **total** | **{total / 60:.1f} min** |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
