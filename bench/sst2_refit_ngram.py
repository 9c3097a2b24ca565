"""A later self-training round whose n-gram teacher is refit on the round before's training set.

    python bench/sst2_refit_ngram.py --round RUN/selftrained-seed0/round1 --out DIR --seed 0 [--check]

`mtnlg-ray self-train` with `selftrain.ngram_every_round` keeps the n-gram classifier fit on the
labelled rows alone in every teacher; round N+1's teacher is the mean of it and round N's student.
Here the n-gram member is instead fit again on round N's `train.jsonl` (the labelled rows and the
pseudo-labels kept from the pool), so each view learns from what the other labelled, as in co-training.
The script writes DIR/ngram (the refit classifier), DIR/teacher (a mixture folder of it and round N's
student, which `mtnlg-ray evaluate --task classification` reads), labels the run's pool with it as the
classifier labeller does, keeps what `select_pseudo_labels` keeps with the run's threshold and
`per_class_top_k`, and writes the next student's set to DIR/train.jsonl (the labelled rows first).
`--check` labels with the run's own round N+1 teacher instead, to confirm the set then equals that
round's train.jsonl byte for byte. Train the student with `mtnlg-ray finetune` (BENCHMARKS.md, SST-2,
2026-12-06, evening).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common  # noqa: F401  (this checkout on sys.path)


def main() -> None:
    from mtnlg_ray.data.label import ClassifierLabeler, write_classifier_mix
    from mtnlg_ray.finetune.ngram import fit_ngram_classifier
    from mtnlg_ray.finetune.selftrain import select_pseudo_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round", type=Path, required=True, help="a finished self-train round folder (roundN)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the run's train.seed (the n-gram fit's shuffling)")
    parser.add_argument("--check", action="store_true", help="label with the run's own next teacher")
    parser.add_argument("--text-field", default="sentence")
    parser.add_argument("--label-field", default="label")
    args = parser.parse_args()

    run = args.round.parent
    report = json.loads((run / "self_train_report.json").read_text())
    labels, number = report["labels"], int(args.round.name.removeprefix("round"))
    used = [json.loads(line) for line in (args.round / "train.jsonl").read_text().splitlines()]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check:
        teacher = run / f"round{number + 1}" / "teacher"
    else:
        ngram = fit_ngram_classifier([r[args.text_field] for r in used], [str(r[args.label_field]) for r in used],
                                     labels, seed=args.seed)
        ngram.save(args.out / "ngram")
        teacher = write_classifier_mix([args.out / "ngram", args.round / "final"], labels, args.out / "teacher")
    texts = [json.loads(line)["text"] for line in (run / "pool.jsonl").read_text().splitlines()]
    predicted, confidence = ClassifierLabeler(teacher).predict(texts)
    rows = [{"text": t, "label": y, "confidence": float(c), "pool_index": i}
            for i, (t, y, c) in enumerate(zip(texts, predicted, confidence))]
    kept = select_pseudo_labels(rows, labels, report["threshold"], report["per_class_top_k"])
    with (args.out / "train.jsonl").open("w", encoding="utf-8") as fh:
        for row in used[:report["labelled"]]:
            fh.write(json.dumps(row) + "\n")
        for row in kept:
            fh.write(json.dumps({args.text_field: row["text"], args.label_field: row["label"]}) + "\n")
    print(json.dumps({"teacher": str(teacher), "kept": len(kept), "out": str(args.out / "train.jsonl")}))


if __name__ == "__main__":
    main()
