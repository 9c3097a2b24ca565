"""Tokenize and pack: documents → fixed sequences of `seq_len + 1` token ids, no padding.

Ray Data tokenizes batches in parallel (order preserved); one writer then streams the ids in
document order, puts `<|endoftext|>` after every document, cuts the stream into sequences
and writes `tokens/{train,val}-NNNNN.npy` shards (uint16 when the vocabulary fits, else
uint32; `np.load(allow_pickle=False)` reads them). A seeded, evenly spread subset of the
sequences is held out for validation. Training reads the shards per data-parallel rank.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from mtnlg_ray.config import PackSection
from mtnlg_ray.publish import publish_file

_TOKENIZERS: dict[tuple, object] = {}


def _tokenizer(path: str):
    # One load per worker process, not per batch. Ray reuses worker processes across runs, and a
    # re-run of `data prepare` on the same output writes a new tokenizer at the same path: the file's
    # identity and modification time are part of the key, so tokens never come from an old one.
    stat = os.stat(path if not os.path.isdir(path) else os.path.join(path, "tokenizer.json"))
    key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _TOKENIZERS:
        from mtnlg_ray.tokenizer import load_tokenizer

        _TOKENIZERS.clear()
        _TOKENIZERS[key] = load_tokenizer(path)
    return _TOKENIZERS[key]


# Documents encoded at a time. Ray Data hands `tokenize_batch` whole blocks (up to the dedup shuffle's
# 200,000 rows / 256 MiB a partition); the `Encoding`s and Python id lists of one encode_batch call
# cost about 130 bytes a token, so a whole 19,250-document block grew one worker by 1.3 GiB.
TOKENIZE_CHUNK_DOCS = 512


def tokenize_batch(batch: pa.Table, tokenizer_path: str) -> pa.Table:
    """Add a `tokens` column (the document's ids, without EOS) to a batch with a `text` column."""
    tokenizer = _tokenizer(tokenizer_path)
    texts = batch.column("text")
    chunks = []
    for start in range(0, batch.num_rows, TOKENIZE_CHUNK_DOCS):
        encodings = tokenizer.encode_batch(texts.slice(start, TOKENIZE_CHUNK_DOCS).to_pylist())
        chunks.append(pa.array([e.ids for e in encodings], pa.list_(pa.uint32())))
    # One contiguous array, so the writer's batches slice it without copying.
    tokens = pa.concat_arrays(chunks) if chunks else pa.array([], pa.list_(pa.uint32()))
    return batch.append_column("tokens", tokens)


@dataclass
class PackedCorpus:
    seq_len: int
    dtype: str
    eos_id: int
    documents: int = 0
    tokens: int = 0  # ids written into sequences, EOS included
    dropped_tail_tokens: int = 0  # the last, incomplete sequence
    train_sequences: int = 0
    val_sequences: int = 0
    val_indices: list[int] = field(default_factory=list)  # positions of held-out sequences in the stream
    # Blended repeats (read.weights > 1) leave out the tokens a validation sequence holds of their
    # original, so validation never scores text that training saw; these are the tokens left out.
    val_repeat_tokens_dropped: int = 0
    shards: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": []})

    def to_json(self) -> dict:
        return asdict(self)


def validation_rule(cfg: PackSection) -> tuple[int, int] | None:
    """(k, offset): every k-th sequence (k = 1 / val_fraction, rounded) from an offset the seed picks."""
    if cfg.val_fraction <= 0:
        return None
    every = max(2, round(1 / cfg.val_fraction))
    return every, int(np.random.default_rng(cfg.seed).integers(every))


class SequenceWriter:
    """Cuts a stream of token ids into `seq_len + 1` sequences and writes them as .npy shards."""

    def __init__(self, output: Path, cfg: PackSection, eos_id: int, vocab_size: int) -> None:
        self.output = output
        self.cfg = cfg
        self.width = cfg.seq_len + 1
        dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        self.result = PackedCorpus(cfg.seq_len, np.dtype(dtype).name, eos_id)
        self.dtype = dtype
        self.pending = np.empty(0, dtype=dtype)
        self.split_rows: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.index = 0
        self._held: dict[int, list[tuple[int, int, int]]] = {}  # original's seq -> (sequence, begin, end)
        self._rule = validation_rule(cfg)
        self._repeats_from: int | None = None  # the first sequence holding a blended repeat: none is validation
        output.mkdir(parents=True, exist_ok=True)

    def add_documents(self, token_lists: list[np.ndarray], origins: np.ndarray | None = None,
                      repeats: np.ndarray | None = None) -> None:
        """Append documents to the stream. With a blend, `origins` names each document's original
        (its `seq`) and `repeats` marks the extra copies, which come after every original. Validation
        sequences are drawn from the originals alone, and a copy leaves out the spans of its original
        that they hold (the pieces around them go in as documents of their own): validation never
        scores text that training saw."""
        if not token_lists:
            return
        eos = np.array([self.result.eos_id], dtype=self.dtype)
        pieces = [self.pending]
        position = self.index * self.width + len(self.pending)  # where the next document starts
        added = 0
        for i, ids in enumerate(token_lists):
            parts = [ids]
            if origins is not None and repeats[i]:
                if self._repeats_from is None:
                    self._start_repeats(position // self.width)
                parts = self._outside_validation(ids, self._held.get(int(origins[i]), []))
            elif origins is not None:
                held = self._validation_spans(position, len(ids))
                if held:
                    self._held[int(origins[i])] = held
            for part in parts:
                pieces.extend((part.astype(self.dtype, copy=False), eos))
                position += len(part) + 1
            added += bool(parts)
        stream = np.concatenate(pieces)
        self.result.documents += added
        whole = len(stream) // self.width
        for row in stream[: whole * self.width].reshape(whole, self.width):
            split = "val" if self._is_validation(self.index) else "train"
            if split == "val":
                self.result.val_indices.append(self.index)
            # A held-out row is copied: a view would keep this whole batch's stream alive until the
            # val shard fills, every k-th sequence pinning a batch.
            self.split_rows[split].append(row.copy() if split == "val" else row)
            self.index += 1
            if len(self.split_rows[split]) >= self.cfg.shard_sequences:
                self._flush(split)
        self.pending = stream[whole * self.width :]

    def _is_validation(self, index: int) -> bool:
        if self._repeats_from is not None and index >= self._repeats_from:
            return False
        return self._rule is not None and index % self._rule[0] == self._rule[1]

    def _start_repeats(self, sequence: int) -> None:
        """The repeats begin inside `sequence` (not cut yet): it and every later one are train."""
        self._repeats_from = sequence
        for origin, spans in list(self._held.items()):
            spans = [span for span in spans if span[0] < sequence]
            if spans:
                self._held[origin] = spans
            else:
                del self._held[origin]

    def _validation_spans(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """(sequence, begin, end): the spans of a document at stream position `start` in validation sequences."""
        spans = []
        for k in range(start // self.width, (start + length) // self.width + 1):
            if self._is_validation(k):
                begin, end = max(0, k * self.width - start), min(length, (k + 1) * self.width - start)
                if begin < end:
                    spans.append((k, begin, end))
        return spans

    def _outside_validation(self, ids: np.ndarray, spans: list[tuple[int, int, int]]) -> list[np.ndarray]:
        parts, cursor = [], 0
        for _, begin, end in spans:
            parts.append(ids[cursor:begin])
            cursor = end
        parts.append(ids[cursor:])
        self.result.val_repeat_tokens_dropped += sum(end - begin for _, begin, end in spans)
        return [part for part in parts if len(part)]

    def _flush(self, split: str) -> None:
        rows = self.split_rows[split]
        if not rows:
            return
        name = f"{split}-{len(self.result.shards[split]):05d}.npy"
        np.save(self.output / name, np.stack(rows), allow_pickle=False)
        self.result.shards[split].append(name)
        setattr(self.result, f"{split}_sequences", getattr(self.result, f"{split}_sequences") + len(rows))
        self.result.tokens += len(rows) * self.width
        self.split_rows[split] = []

    def close(self) -> PackedCorpus:
        # A validation split with nothing in it is no split: give it the last train sequence (not with
        # a blend, whose last sequences repeat text that training holds).
        if self.cfg.val_fraction > 0 and not self.result.val_indices and self._repeats_from is None:
            if not self.split_rows["train"] and self.result.shards["train"]:
                self._reopen_last_train_shard()  # the train rows were just written out: take one back
            if self.split_rows["train"] and self.index >= 2:
                self.split_rows["val"].append(self.split_rows["train"].pop())
                self.result.val_indices.append(self.index - 1)
        self.result.dropped_tail_tokens = int(len(self.pending))
        self._flush("train")
        self._flush("val")
        publish_file(self.output / "index.json", json.dumps(self.result.to_json(), indent=2) + "\n")
        return self.result

    def _reopen_last_train_shard(self) -> None:
        name = self.result.shards["train"].pop()
        rows = list(np.load(self.output / name, allow_pickle=False))
        (self.output / name).unlink()
        self.result.train_sequences -= len(rows)
        self.result.tokens -= len(rows) * self.width
        self.split_rows["train"] = rows


def read_sequences(tokens_dir: str | Path, split: str = "train") -> np.ndarray:
    """All sequences of one split as one (n, seq_len + 1) array; no pickle involved."""
    tokens_dir = Path(tokens_dir)
    index = json.loads((tokens_dir / "index.json").read_text())
    arrays = [np.load(tokens_dir / name, allow_pickle=False) for name in index["shards"][split]]
    width = index["seq_len"] + 1
    return np.concatenate(arrays) if arrays else np.empty((0, width), dtype=index["dtype"])
