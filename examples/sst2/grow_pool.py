"""The self-training pool: SST-2's unlabelled phrases plus sentences cut from the IMDb reviews.

The 66,349 pool phrases of make_splits.py are cut from about 6,900 Rotten Tomatoes snippets, so the
12,000 a teacher is most sure of repeat the same few thousand sentences. This adds N whole sentences
of the pretraining reviews (imdb_text.py's output, in SST-2's spelling) as more unlabelled text for the
teacher to label: each distinct sentence of 6-40 tokens once, a seeded sample. imdb_text.py dropped
every review sharing a word 13-gram with a dev sentence; here a sentence that holds a shorter dev
sentence, or is part of one, is skipped too. The pool phrases keep their SST-2 label only so the
self-training report can score the pseudo-labels; training never reads it, and the IMDb sentences
have none (the report scores the rows that do).

    python examples/sst2/grow_pool.py --pool work/sst2/pool.tsv --reviews work/sst2/imdb.jsonl \
        --dev work/sst2/dev.tsv --sentences 30000 --out work/sst2/selftrain_pool.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from imdb_text import DECONTAM  # data prepare's decontamination rule, by which imdb_text.py dropped reviews
from make_splits import BadInput, read_sst2

_SENTENCE_END = re.compile(r"(?<= [.!?]) ")  # SST-2's spelling puts spaces around an ending mark
MIN_WORDS, MAX_WORDS = 6, 40  # tokens, punctuation included; dev sentences run 19 on average, shorter cuts are fragments


def review_sentences(reviews: Path) -> list[str]:
    """Every distinct sentence of MIN_WORDS-MAX_WORDS tokens in the reviews JSONL, sorted."""
    if not reviews.is_file():
        raise BadInput(f"{reviews}: missing (imdb_text.py's output, one review a line)")
    found: set[str] = set()
    with reviews.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise BadInput(f"{reviews}:{number}: expected a JSON object with a 'text' field holding text")
            for sentence in _SENTENCE_END.split(text):
                if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                    found.add(sentence.strip())
    return sorted(found)


class DevOverlap:
    """Whether a sentence is part of a dev sentence (any span of a dev sentence's tokens), or holds a
    dev sentence of MIN_WORDS-12 tokens (too short for imdb_text.py's 13-gram rule; dev's shortest,
    such as "bad .", are left to equality, which sentences this long cannot meet)."""

    def __init__(self, dev: list[str]):
        self.spans = {" ".join(words[i:j]) for words in (d.split() for d in dev)
                      for i in range(len(words)) for j in range(i + MIN_WORDS, min(len(words), i + MAX_WORDS) + 1)}
        self.short = [f" {d.strip()} " for d in dev if MIN_WORDS <= len(d.split()) < DECONTAM.ngram]  # not "bad ."

    def __call__(self, sentence: str) -> bool:
        padded = f" {sentence} "
        return sentence in self.spans or any(d in padded for d in self.short)


def write_pool(pool: list[dict], sentences: list[str], count: int, seed: int, out: Path,
               overlaps_dev=lambda sentence: False) -> tuple[int, int]:
    """The pool's rows (sentence and label), then `count` seeded sentences (sentence only) that the pool
    does not hold and that do not overlap dev; returns (added, skipped for dev), adding all there are
    when there are fewer than `count`."""
    known = {row["sentence"] for row in pool}
    fresh = [s for s in sentences if s not in known]
    random.Random(seed).shuffle(fresh)
    added: list[str] = []
    skipped = 0
    for sentence in fresh:  # the sample's order does not depend on the dev set
        if len(added) == count:
            break
        if overlaps_dev(sentence):
            skipped += 1
        else:
            added.append(sentence)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in pool:
            fh.write(json.dumps({"sentence": row["sentence"], "label": row["label"]}) + "\n")
        for sentence in added:
            fh.write(json.dumps({"sentence": sentence}) + "\n")
    return len(added), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="make_splits.py's pool.tsv")
    parser.add_argument("--reviews", type=Path, required=True, help="imdb_text.py's JSONL of reviews")
    parser.add_argument("--dev", type=Path, required=True, help="SST-2's dev.tsv: sentences overlapping it are skipped")
    parser.add_argument("--sentences", type=int, default=30000, help="how many review sentences to add")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL pool to write")
    args = parser.parse_args(argv)
    try:
        if args.sentences < 0:
            raise BadInput(f"--sentences {args.sentences}: expected 0 or more")
        pool = read_sst2(args.pool)
        dev = DevOverlap([row["sentence"] for row in read_sst2(args.dev)])
        added, skipped = write_pool(pool, review_sentences(args.reviews), args.sentences, args.seed, args.out, dev)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(pool):,} pool phrases + {added:,} IMDb sentences -> {args.out}; "
          f"{skipped} skipped for overlapping {args.dev.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
