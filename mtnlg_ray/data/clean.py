"""Clean stage: normalise text, then reject documents that fail Gopher / C4-style quality heuristics.

Runs as a Ray Data `map_batches` over pyarrow batches after reading; every rejected document gets
a reason of its own (e.g. "too_few_words", "duplicate_lines") and a detail with the measured value.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections import Counter

import pyarrow as pa

from mtnlg_ray.config import CleanSection
from mtnlg_ray.data.columns import with_column

# Control characters other than tab and newline (C0, DEL, C1), and the zero-width / BOM marks.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
# What separates lines or words before the control characters go: a page break (form feed, as PDF
# extraction leaves at every page), NEL and the Unicode line / paragraph separators end a line, a
# vertical tab is a space (deleted, they glued the words on either side together).
_LINE_BREAKS = re.compile("[\x0c\x85\u2028\u2029]")
# The spaces other than space and tab that cleaning makes plain spaces (a regex class's body).
OTHER_SPACES = "\u00a0\u2000-\u200a\u202f\u205f\u3000"
_SPACES = re.compile(f"[ \t{OTHER_SPACES}]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_ELLIPSIS_END = re.compile(r"(\.\.\.|…)\s*$")


@functools.cache
def word_pattern() -> re.Pattern:
    """A word: letters and digits with their combining marks. Python's `\\w` leaves the marks out, so
    Hindi, Bengali or Tamil split at every vowel sign and virama ("नमस्ते" into "नमस", "त"), and
    every such document failed the mean-word-length check."""
    marks, start = [], None
    for code in range(sys.maxunicode + 2):
        is_mark = code <= sys.maxunicode and unicodedata.category(chr(code)) in ("Mn", "Mc", "Me")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    return re.compile(f"[\\w{''.join(marks)}]+")


def normalize_text(text: str) -> str:
    """NFC, no control characters, one space between words, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text).replace("\x0b", " "))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def quality_problem(text: str, cfg: CleanSection) -> tuple[str, str] | None:
    """The first heuristic `text` fails, as (reason, detail), or None when it passes them all."""
    words = word_pattern().findall(text)
    n = len(words)
    if n < cfg.min_words:
        return "too_few_words", f"{n} words < {cfg.min_words}"
    if n > cfg.max_words:
        return "too_many_words", f"{n} words > {cfg.max_words}"
    mean = sum(map(len, words)) / n if n else 0.0
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return "mean_word_length", (
            f"mean word length {mean:.1f} outside [{cfg.min_mean_word_length}, {cfg.max_mean_word_length}]"
        )
    symbols = text.count("#") + text.count("...") + text.count("…")
    if n and symbols / n > cfg.max_symbol_ratio:
        return "symbol_ratio", f"{symbols / n:.2f} symbols per word > {cfg.max_symbol_ratio}"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        ellipsis = sum(1 for line in lines if _ELLIPSIS_END.search(line)) / len(lines)
        if ellipsis > cfg.max_ellipsis_lines:
            return "ellipsis_lines", f"{ellipsis:.2f} of lines end in an ellipsis > {cfg.max_ellipsis_lines}"
        repeated = (len(lines) - len(set(lines))) / len(lines)
        if repeated > cfg.max_duplicate_lines:
            return "duplicate_lines", f"{repeated:.2f} of lines repeat > {cfg.max_duplicate_lines}"
    lowered = [w.lower() for w in words]
    total_chars = sum(map(len, lowered)) or 1
    for size, limit in sorted(cfg.max_top_ngram.items()):
        if n < size:
            break
        grams = Counter(tuple(lowered[i : i + size]) for i in range(n - size + 1))
        gram, count = grams.most_common(1)[0]
        if count > 1:
            share = count * sum(map(len, gram)) / total_chars
            if share > limit:
                return "repeated_ngram", f"top {size}-gram covers {share:.2f} of characters > {limit}"
    for size, limit in sorted(cfg.max_duplicate_ngram.items()):
        if n < size:
            break
        share = _duplicate_ngram_share(lowered, size, total_chars)
        if share > limit:
            return "repeated_ngram", f"repeated {size}-grams cover {share:.2f} of characters > {limit}"
    return None


def _duplicate_ngram_share(words: list[str], size: int, total_chars: int) -> float:
    """Share of characters in words that belong to an n-gram seen earlier in the document."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - size + 1):
        gram = tuple(words[i : i + size])
        if gram in seen:
            for j in range(i, i + size):
                covered[j] = True
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def clean_batch(batch: pa.Table, cfg: CleanSection) -> pa.Table:
    """Normalise `text` and fill `reason` / `detail` for documents that fail a heuristic."""
    texts = batch.column("text").to_pylist()
    cleaned, reasons, details = [], [], []
    for text in texts:
        text = normalize_text(text)
        problem = ("empty_after_cleaning", "no text left") if not text else quality_problem(text, cfg)
        cleaned.append(text)
        reasons.append(problem[0] if problem else "")
        details.append(problem[1] if problem else "")
    return with_verdicts(batch, cleaned, reasons, details)


def with_verdicts(batch: pa.Table, texts: list[str], reasons: list[str], details: list[str]) -> pa.Table:
    """`batch` with its `text` replaced and `reason` / `detail` set (added when missing): a stage's verdicts."""
    for name, values in (("text", texts), ("reason", reasons), ("detail", details)):
        batch = with_column(batch, name, pa.array(values, pa.string()))
    return batch
