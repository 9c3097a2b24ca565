"""Split SST-2 for the self-training experiment: 1,000 labelled train sentences, the rest as an unlabelled pool.

Writes into OUT: pretrain.jsonl (every train sentence as one document, no labels), labelled.tsv
(a seeded sample of --labelled sentences with labels), pool.tsv (the other train sentences; their
labels stay in the file only so the report can score the pseudo-labels, training never reads them)
and dev.tsv (a copy of the dev split).

    python examples/sst2/make_splits.py --sst2 ../shared/data/sst2 --out work/sst2
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
from pathlib import Path


class BadInput(Exception):
    """A file that is not SST-2's: one line naming the file (and line) and what was expected."""


def read_tsv(path: Path) -> list[dict]:
    """The rows of a tab-separated file with a header line, as dicts (report.py reads timings.tsv so)."""
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def read_sst2(path: Path) -> list[dict]:
    """SST-2's `label<TAB>sentence` rows, every label 0 or 1 and every sentence non-empty."""
    if not path.is_file():
        raise BadInput(f"{path}: missing (the SST-2 folder must hold train.tsv and dev.tsv)")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = []
        try:
            if not reader.fieldnames or not {"label", "sentence"} <= set(reader.fieldnames):
                raise BadInput(f"{path}:1: expected the header line 'label<TAB>sentence', got {reader.fieldnames}")
            for row in reader:
                line = reader.line_num
                if row["label"] not in ("0", "1"):
                    raise BadInput(f"{path}:{line}: label {row['label']!r}, expected 0 or 1")
                if not (row["sentence"] or "").strip():
                    raise BadInput(f"{path}:{line}: empty sentence")
                rows.append(row)
        except UnicodeDecodeError:
            data = path.read_bytes()  # the reader decodes ahead in chunks: find the line in the whole file
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data.count(b"\n", 0, exc.start) + 1
                raise BadInput(f"{path}:{line}: not UTF-8 text "
                               f"(byte {data[exc.start]:#04x}: {exc.reason})") from None
            raise
    if not rows:
        raise BadInput(f"{path}: no rows after the header")
    return rows


def write_tsv(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["label", "sentence"], delimiter="\t",
                                quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writeheader()
        writer.writerows({"label": r["label"], "sentence": r["sentence"]} for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sst2", type=Path, required=True, help="folder with train.tsv and dev.tsv")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labelled", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        if args.labelled < 1:  # -k sliced from the end: all but k rows "labelled", k in the pool
            raise BadInput(f"--labelled {args.labelled}: expected 1 or more")
        train = read_sst2(args.sst2 / "train.tsv")
        read_sst2(args.sst2 / "dev.tsv")
        if len(train) <= args.labelled:
            raise BadInput(f"{args.sst2 / 'train.tsv'}: {len(train)} rows, expected more than --labelled "
                           f"{args.labelled} (the rest are the unlabelled pool)")
        try:  # an --out that is a file, or below one, was mkdir's traceback
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BadInput(f"{args.out}: cannot make the output folder ({err.strerror})") from None
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    with (args.out / "pretrain.jsonl").open("w", encoding="utf-8") as fh:
        for row in train:
            fh.write(json.dumps({"text": row["sentence"]}) + "\n")
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    write_tsv(args.out / "labelled.tsv", [train[i] for i in order[: args.labelled]])
    write_tsv(args.out / "pool.tsv", [train[i] for i in order[args.labelled :]])
    shutil.copyfile(args.sst2 / "dev.tsv", args.out / "dev.tsv")
    print(f"{args.out}: {len(train)} pretraining sentences, {args.labelled} labelled, "
          f"{len(train) - args.labelled} in the pool")


if __name__ == "__main__":
    main()
