"""Repeated-line removal (`dedup.lines: true`), as CCNet removes boilerplate: a line that appears in
at least `dedup.line_min_docs` documents (menus, cookie notices, "subscribe to our newsletter") is
removed from every document. Line counts come from Ray Data groupbys over (line hash, document text
hash) pairs, like the other dedup steps, so exact copies of a document count once (near copies,
such as a syndicated article under three bylines, count apart and lose their shared lines in every
copy); a document left under `clean.min_words` words is rejected with reason `short_after_line_dedup`.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from mtnlg_ray.data.columns import with_column


def line_key(line: str) -> str:
    """Lines compare after trimming and case-folding, as boilerplate varies in neither much."""
    return hashlib.blake2b(line.strip().casefold().encode("utf-8"), digest_size=8).hexdigest()


def line_keys_batch(batch: pa.Table) -> pa.Table:
    """One row per distinct non-empty line of each document: (line key, the document's exact-dedup key).

    Documents are told apart by their text, not their id: the copies of a document that exact dedup
    will reduce to one count once, so a page repeated three times does not make all its lines boilerplate."""
    from mtnlg_ray.data.minhash import exact_digest, normalize_text

    keys, docs = [], []
    for text in batch.column("text").to_pylist():
        doc = exact_digest(normalize_text(text)).hex()
        for key in {line_key(line) for line in text.split("\n") if line.strip()}:
            keys.append(key)
            docs.append(doc)
    return pa.table({"line": pa.array(keys, pa.string()), "doc": pa.array(docs, pa.string())})


def remove_lines_batch(batch: pa.Table, repeated: set[str], min_words: int) -> pa.Table:
    """Drop the repeated lines from `text`; reject documents left too short."""
    texts, reasons, details = [], [], []
    for text in batch.column("text").to_pylist():
        lines = text.split("\n")
        kept = [line for line in lines if not line.strip() or line_key(line) not in repeated]
        removed = len(lines) - len(kept)
        new = "\n".join(kept).strip("\n")
        words = len(new.split())
        short = removed and words < min_words
        texts.append(new)
        reasons.append("short_after_line_dedup" if short else "")
        details.append(f"{words} words left after removing {removed} repeated lines" if short else "")
    batch = with_column(batch, "text", pa.array(texts, pa.string()))
    batch = with_column(batch, "reason", pa.array(reasons, pa.string()))
    return with_column(batch, "detail", pa.array(details, pa.string()))


def repeated_lines(docs, min_docs: int) -> set[str]:
    """Keys of the lines found in at least `min_docs` documents (a Ray Data groupby)."""
    pairs = docs.select_columns(["text"]).map_batches(line_keys_batch, batch_format="pyarrow")
    distinct = pairs.groupby(["line", "doc"]).count()  # one row per (line, distinct document text)
    counts = distinct.select_columns(["line"]).groupby("line").count()
    frequent = counts.map_batches(_frequent_batch, fn_kwargs={"min_docs": min_docs}, batch_format="pyarrow")
    return {key for batch in frequent.iter_batches(batch_format="pyarrow") for key in batch.column("line").to_pylist()}


def _frequent_batch(batch: pa.Table, min_docs: int) -> pa.Table:
    # Ray Data names a groupby's count column "count()".
    return batch.filter(pc.greater_equal(batch.column("count()"), min_docs)).select(["line"])
