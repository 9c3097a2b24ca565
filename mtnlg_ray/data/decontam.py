"""Decontamination stage: cut evaluation text out of the training corpus (GPT-3 / MT-NLG rules).

Word 13-grams of the evaluation files are collected once; a training document that shares one
loses the matched span plus `window` characters on each side. An evaluation item shorter than 13
words matches as a whole when it has at least `min_words` words (GPT-3's floor of 8); shorter items
are phrases too common to tell contamination from chance. Pieces shorter than
`min_fragment` characters are dropped, and a document cut into more than `max_splits` pieces
is dropped whole. Surviving pieces stay one document, joined by a blank line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from mtnlg_ray.config import DecontamSection
from mtnlg_ray.data.clean import normalize_text, with_verdicts, word_pattern


def _gram_key(words: Iterable[str]) -> int:
    # 8-byte digests keep the n-gram set small enough to ship to every task.
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class EvalGrams:
    """Hashed, lowercased word n-grams of the evaluation texts, and the window sizes to look them up with."""

    keys: frozenset[int]
    lengths: tuple[int, ...]  # n, and the lengths of the whole items shorter than n that count

    def __len__(self) -> int:
        return len(self.keys)


def eval_ngrams(texts: Iterable[str], n: int, min_words: int = 8) -> EvalGrams:
    """The n-grams of every evaluation text; a text of `min_words` to n - 1 words is one key of its own."""
    keys: set[int] = set()
    lengths = {n}
    for text in texts:
        # Normalised as training text is (NFC above all): an NFD "café" would be "cafe" plus a mark.
        words = [w.lower() for w in word_pattern().findall(normalize_text(text))]
        if min(min_words, n) <= len(words) < n:
            keys.add(_gram_key(words))
            lengths.add(len(words))
        for i in range(len(words) - n + 1):
            keys.add(_gram_key(words[i : i + n]))
    return EvalGrams(frozenset(keys), tuple(sorted(lengths)))


def contaminated_spans(text: str, grams: EvalGrams) -> list[tuple[int, int]]:
    """Character spans of `text` covered by a matching n-gram (or short item), merged where they overlap."""
    matches = list(word_pattern().finditer(text))
    words = [m.group().lower() for m in matches]
    found: list[tuple[int, int]] = []
    for n in grams.lengths:
        for i in range(len(words) - n + 1):
            if _gram_key(words[i : i + n]) in grams.keys:
                found.append((matches[i].start(), matches[i + n - 1].end()))
    spans: list[tuple[int, int]] = []
    for start, end in sorted(found):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return spans


def decontaminate(text: str, grams: EvalGrams, cfg: DecontamSection) -> tuple[str | None, int]:
    """(the text left, or None when the document is dropped; the number of pieces it was cut into)."""
    spans = contaminated_spans(text, grams)
    if not spans:
        return text, 1
    cuts: list[tuple[int, int]] = []
    for start, end in spans:
        start, end = max(0, start - cfg.window), min(len(text), end + cfg.window)
        if cuts and start <= cuts[-1][1]:
            cuts[-1] = (cuts[-1][0], max(end, cuts[-1][1]))
        else:
            cuts.append((start, end))
    pieces, position = [], 0
    for start, end in cuts:
        pieces.append(text[position:start])
        position = end
    pieces.append(text[position:])
    pieces = [p.strip() for p in pieces]
    split_count = len([p for p in pieces if p])
    if split_count > cfg.max_splits:
        return None, split_count
    kept = [p for p in pieces if len(p) >= cfg.min_fragment]
    return ("\n\n".join(kept) if kept else None), split_count


def decontaminate_batch(batch: pa.Table, grams: EvalGrams, cfg: DecontamSection) -> pa.Table:
    """Cut contaminated spans from `text`; dropped documents get reason "contaminated"."""
    texts, reasons, details = [], [], []
    for text in batch.column("text").to_pylist():
        left, pieces = decontaminate(text, grams, cfg)
        if left is None:
            texts.append(text)
            reasons.append("contaminated")
            if pieces > cfg.max_splits:
                details.append(f"cut into {pieces} pieces, more than {cfg.max_splits}")
            else:
                details.append(f"no piece of {cfg.min_fragment} characters left after cutting")
        else:
            texts.append(left)
            reasons.append("")
            details.append("" if left == text else f"evaluation text cut out ({pieces} pieces kept)")
    return with_verdicts(batch, texts, reasons, details)
