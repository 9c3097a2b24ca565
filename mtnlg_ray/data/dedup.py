"""Dedup stage of `data prepare`, between clean and pseudo-label: exact and fuzzy duplicates out.

Exact: a 128-bit hash of the normalized text. Fuzzy: MinHash over character n-grams with LSH banding
(MT-NLG / NeMo Curator: 5-grams, 20 bands x 13 rows, Jaccard >= 0.8), candidate pairs checked on their
signatures, then connected components. Every step runs as Ray Data operations; the driver sees counts only.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.expressions import col

from mtnlg_ray.data.read import REJECTED_COLUMNS

if TYPE_CHECKING:
    from mtnlg_ray.config import DedupSection

STAGE = "dedup"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

# Permutations and band hashes come from this seed, so every task (and every run) agrees on them.
MINHASH_SEED = 0x6D746E6C67
# Buckets up to this size are checked pair by pair; a bigger one (boilerplate shared by thousands of
# pages) only against its smallest id, which bounds the work at O(size) instead of O(size^2).
ALL_PAIRS_MAX_BUCKET = 64

_MERSENNE_61 = np.uint64((1 << 61) - 1)
_LOW_32 = np.uint64(0xFFFFFFFF)
_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd, so the rolling polynomial uses all 64 bits
_SHORT_SALT = 0xD6E8FEB86659FD93
# Shingles per MinHash block: two (block x permutations) uint64 arrays stay within L2/L3.
_SHINGLE_BLOCK = 256
# Rows per shuffle partition and groups per partition: groups are coarse shards of the real key, so
# one `map_groups` call handles many keys at numpy speed instead of one Python call per key.
_ROWS_PER_PARTITION = 200_000
_BYTES_PER_PARTITION = 256 << 20
_SHARDS_PER_PARTITION = 8
_MAX_CC_ROUNDS = 64
_DOCS_PER_BLOCK = 1024
# Up to this many edges, connected components run inside one task instead of a few shuffles a round.
_LOCAL_CC_MAX_EDGES = 2_000_000

_SHARD = "_dedup_shard"
_KIND = "_dedup_kind"
_KEY = "_dedup_key"
_SIG = "_dedup_sig"
_EXACT = "_dedup_exact"
_KEPT = "_dedup_kept"
_REASON = "_dedup_reason"
_CHANGED = "_dedup_changed"
_ROLE = "_dedup_role"


# --------------------------------------------------------------------------------------------
# The vectorized core: plain numpy, no Ray. The Ray stage and bench/dedup.py both use it.
# --------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Casefolded, NFC, whitespace runs collapsed to one space, stripped: what "the same text" means.

    Casefolding is applied between NFD and NFC (Unicode's canonical caseless match), so
    precomposed and decomposed accents compare equal before and after folding.
    """
    folded = unicodedata.normalize("NFD", text).casefold()
    return " ".join(unicodedata.normalize("NFC", folded).split())


def exact_digest(normalized: str) -> bytes:
    """128-bit hash of normalized text; collisions are negligible far past a billion documents."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def _fmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every character n-gram of every text, and how many belong to each text.

    All texts are hashed together: one UTF-32 encode, then a rolling polynomial over the
    concatenated code points, keeping only windows that lie inside one text. A text shorter
    than `ngram` is one shingle: its whole self.
    """
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    counts = np.maximum(lengths - ngram + 1, 1)
    hashes = np.empty(int(counts.sum()), dtype=np.uint64)
    if len(texts) == 0:
        return hashes, counts
    points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    out_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    long = lengths >= ngram
    if points.size >= ngram and long.any():
        windows = points.size - ngram + 1
        rolled = points[:windows].copy()
        for k in range(1, ngram):
            rolled *= _ROLL
            rolled += points[k : k + windows]
        # Output slot of each kept window -> its start position in the concatenation.
        long_counts = counts[long]
        shift = np.repeat(starts[long] - out_starts[long], long_counts)
        slots = np.repeat(out_starts[long], long_counts) + _ranges(long_counts)
        hashes[slots] = rolled[slots + shift]
    for d in np.flatnonzero(~long):  # rare: texts shorter than one n-gram
        value = _SHORT_SALT ^ int(lengths[d])
        for p in points[starts[d] : starts[d] + lengths[d]]:
            value = (value * int(_ROLL) + int(p)) & 0xFFFFFFFFFFFFFFFF
        hashes[out_starts[d]] = value
    return _fmix64(hashes), counts


def _ranges(counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(c) for c in counts), vectorized."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


class MinHashBands:
    """MinHash signatures (bands * rows permutations) of character n-grams, and their LSH bucket keys.

    Permutation i hashes a 64-bit shingle x = (hi, lo) as (a1_i * lo + a2_i * hi + b_i) mod (2^61 - 1),
    a multilinear universal hash over the Mersenne prime. With a1, a2 < 2^31 and b < 2^32 the sum
    fits in uint64, so numpy needs no 128-bit product and no division: one fold reduces mod p.
    """

    def __init__(self, bands: int, rows: int, ngram: int, seed: int = MINHASH_SEED):
        self.bands, self.rows, self.ngram = bands, rows, ngram
        self.num_perm = bands * rows
        rng = np.random.default_rng(seed)
        self._a1 = rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64)
        self._a2 = rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64)
        self._band_seeds = _fmix64(np.arange(bands, dtype=np.uint64) + np.uint64(seed))

    def signatures(self, normalized_texts: Sequence[str]) -> np.ndarray:
        """(n, bands * rows) uint32: the low 32 bits of each permutation's minimum."""
        hashes, counts = shingle_hashes(normalized_texts, self.ngram)
        n = len(normalized_texts)
        mins = np.full((n, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        lo, hi = hashes & _LOW_32, hashes >> np.uint64(32)
        doc_starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if n else counts
        block = min(_SHINGLE_BLOCK, hashes.size)
        values_buf = np.empty((block, self.num_perm), dtype=np.uint64)
        scratch_buf = np.empty_like(values_buf)
        for c0 in range(0, hashes.size, block):
            c1 = min(c0 + block, hashes.size)
            first = int(np.searchsorted(doc_starts, c0, side="right")) - 1
            last = int(np.searchsorted(doc_starts, c1, side="left"))
            values, scratch = values_buf[: c1 - c0], scratch_buf[: c1 - c0]
            np.multiply(lo[c0:c1, None], self._a1, out=values)
            np.multiply(hi[c0:c1, None], self._a2, out=scratch)
            values += scratch
            values += self._b
            np.right_shift(values, np.uint64(61), out=scratch)
            values &= _MERSENNE_61
            values += scratch
            segments = np.maximum(doc_starts[first:last], c0) - c0
            block_mins = np.minimum.reduceat(values, segments, axis=0)
            np.minimum(mins[first:last], block_mins, out=mins[first:last])
        return (mins & _LOW_32).astype(np.uint32)

    def bucket_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) int64: one hash per band of `rows` signature values, salted by the band index."""
        n = signatures.shape[0]
        values = signatures.reshape(n, self.bands, self.rows).astype(np.uint64)
        keys = np.repeat(self._band_seeds[None, :], n, axis=0)
        for r in range(self.rows):
            keys = _fmix64(keys ^ values[:, :, r])
        return keys.view(np.int64)


def bucket_pairs(sorted_keys: np.ndarray, max_all_pairs: int = ALL_PAIRS_MAX_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j), i < j, of rows that share a bucket key, given keys sorted (ties by id).

    A bucket of up to `max_all_pairs` rows yields all its pairs; a bigger one pairs each row
    with the bucket's first (smallest id) row only.
    """
    n = sorted_keys.size
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    starts_run = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    run = np.cumsum(starts_run) - 1
    heads = np.flatnonzero(starts_run)
    sizes = np.diff(np.append(heads, n))
    big = sizes[run] > max_all_pairs
    left, right = [], []
    members = np.flatnonzero(big & ~starts_run)
    left.append(heads[run[members]])
    right.append(members)
    small_sizes = sizes[sizes <= max_all_pairs]
    widest = int(small_sizes.max()) if small_sizes.size else 0
    for d in range(1, widest):
        same = (run[:-d] == run[d:]) & ~big[:-d]
        i = np.flatnonzero(same)
        left.append(i)
        right.append(i + d)
    return np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)


def estimated_jaccard(signatures: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Fraction of equal MinHash values for each pair of rows: an unbiased estimate of Jaccard."""
    out = np.empty(left.size, dtype=np.float64)
    step = max(1, (1 << 22) // max(signatures.shape[1], 1))  # bound the (pairs x perms) temporary
    for s in range(0, left.size, step):
        equal = signatures[left[s : s + step]] == signatures[right[s : s + step]]
        out[s : s + step] = equal.mean(axis=1)
    return out


def candidate_pairs(bucket_keys: np.ndarray) -> np.ndarray:
    """In-process LSH: unique (i, j), i < j, of documents sharing a bucket in at least one band.

    `bucket_keys` is (n, bands) from `MinHashBands.bucket_keys`. The Ray stage does the same per
    shuffle shard; this whole-corpus form is for the benchmark and for small inputs.
    """
    n, bands = bucket_keys.shape
    keys = bucket_keys.reshape(-1)
    docs = np.repeat(np.arange(n, dtype=np.int64)[:, None], bands, axis=1).reshape(-1)
    order = np.lexsort((docs, keys))
    left, right = bucket_pairs(keys[order])
    i, j = docs[order][left], docs[order][right]
    codes = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    return np.stack((codes // n, codes % n), axis=1) if n else np.empty((0, 2), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The Ray Data stage.
# --------------------------------------------------------------------------------------------


def dedup_documents(
    ds: ray.data.Dataset, cfg: DedupSection, order_column: str | None = None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Drop exact and near duplicates: (kept, rejected).

    Of every cluster of duplicates the first document survives: the one with the smallest
    `order_column` (a non-negative int64 such as the corpus position), or without one the
    smallest id. `kept` has the input's columns; `rejected` has string columns id, source,
    location, stage, reason, detail, where reason is `exact_duplicate` or `near_duplicate` and
    detail names the surviving id.
    Dedup is a barrier: the input is materialized (it is read for keys and again for the split),
    and so is the result.
    """
    if not (cfg.exact or cfg.fuzzy):
        return ds, _empty_rejected()
    # Arrow blocks whatever the source (from_pandas gives pandas ones; the markers copy this schema),
    # and batches that bundle tiny blocks, so later steps run a task per thousand rows, not per row.
    docs = ds.map_batches(_arrow, batch_format="pyarrow", batch_size=_DOCS_PER_BLOCK).materialize()
    rows = docs.count()
    if rows == 0:
        return docs, _empty_rejected()
    columns = docs.schema().base_schema.names
    missing = [c for c in ("id", "text", "source", "location") if c not in columns]
    if order_column is not None and order_column not in columns:
        missing.append(order_column)
    if missing:
        raise ValueError(f"dedup needs columns {missing} that the dataset lacks (it has {columns})")
    if order_column is not None:
        # Every step picks the smallest id; prefixed with the order, that is the first document.
        docs = docs.map_batches(_ordered_ids, batch_format="pyarrow", fn_kwargs={"order_column": order_column})

    cpus = int(ray.cluster_resources().get("CPU", 1))
    doc_parts = _partitions(rows, docs.size_bytes(), cpus)
    minhash = MinHashBands(cfg.bands, cfg.rows, cfg.ngram) if cfg.fuzzy else None
    key_rows = rows * ((1 if cfg.exact else 0) + (cfg.bands if cfg.fuzzy else 0))
    row_bytes = 4 * cfg.bands * cfg.rows + 64 if cfg.fuzzy else 64
    key_parts = _partitions(key_rows, key_rows * row_bytes, cpus)
    # One shuffle finds both kinds of duplicate: each document's exact digest and its band
    # buckets are rows keyed alike, grouped together, and every group yields edges.
    edges = (
        docs.select_columns(["id", "text"])
        .map_batches(
            _key_rows,
            batch_format="pyarrow",
            batch_size=256,
            fn_kwargs={"minhash": minhash, "exact": cfg.exact, "shards": key_parts * _SHARDS_PER_PARTITION},
        )
        .groupby(_SHARD, num_partitions=key_parts)
        .map_groups(_key_edges, batch_format="pyarrow", fn_kwargs={"threshold": cfg.threshold - cfg.verify_margin})
        .materialize()
    )
    count = edges.count()
    if count == 0:
        return (docs.map_batches(_original_ids, batch_format="pyarrow") if order_column else docs), _empty_rejected()

    # Markers (id, kept id, reason) shaped like document rows, so one groupby over both can
    # resolve each document. Exact edges stay in the fuzzy graph, so an exact duplicate whose
    # twin is itself a near duplicate names the component's survivor.
    shape = {"schema": docs.schema().base_schema, "shards": doc_parts * _SHARDS_PER_PARTITION}
    if cfg.fuzzy and count <= _LOCAL_CC_MAX_EDGES:
        # A small graph: components and markers in one task, all edges in one batch.
        marker_rows = edges.map_batches(
            _local_marker_rows,
            batch_format="pyarrow",
            batch_size=count,
            fn_kwargs={"exact": cfg.exact, "edges_total": count, **shape},
        )
    else:
        parts = []
        if cfg.exact:
            exact = edges.filter(expr=col(_EXACT) == 1)
            parts.append(exact.map_batches(_markers, batch_format="pyarrow", fn_kwargs={"reason": EXACT_DUPLICATE}))
        if cfg.fuzzy:
            near = _connected_components(edges.select_columns(["u", "v"]), count, cpus)
            parts.append(near.map_batches(_markers, batch_format="pyarrow", fn_kwargs={"reason": NEAR_DUPLICATE}))
        markers = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        marker_rows = markers.map_batches(_as_marker_rows, batch_format="pyarrow", fn_kwargs=shape)
    doc_rows = docs.map_batches(_as_doc_rows, batch_format="pyarrow", fn_kwargs={"shards": shape["shards"]})
    # One shuffle resolves every document; materialized, so counting, writing and labelling the
    # kept documents and writing the rejected rows do not each repeat it.
    resolved = (
        doc_rows.union(marker_rows)
        .groupby(_SHARD, num_partitions=doc_parts)
        .map_groups(_resolve_markers, batch_format="pyarrow")
        .materialize()
    )
    kept = resolved.filter(expr=col(_REASON).is_null()).drop_columns([_KEPT, _REASON])
    rejected = resolved.filter(expr=col(_REASON).is_not_null()).map_batches(
        _rejected_rows, batch_format="pyarrow", fn_kwargs={"ordered": order_column is not None}
    )
    if order_column is not None:
        kept = kept.map_batches(_original_ids, batch_format="pyarrow")
    return kept, rejected


def _partitions(rows: int, nbytes: int, cpus: int) -> int:
    """Shuffle partitions: enough to bound each one's size, and to use the cluster when there is work."""
    by_size = max(math.ceil(rows / _ROWS_PER_PARTITION), math.ceil(nbytes / _BYTES_PER_PARTITION))
    by_cpus = min(cpus, math.ceil(rows / 10_000))
    return max(1, by_size, by_cpus)


def _connected_components(edges: ray.data.Dataset, count: int, cpus: int) -> ray.data.Dataset:
    """Edges (u, v), u > v, of an undirected graph -> (u, v) linking every non-minimal node to its component's minimum.

    Alternating large-star and small-star (Kiveris et al., "Connected Components in MapReduce and
    Beyond", 2014): each step is one groupby, O(log^2 n) rounds, no join; a round that moves no
    edge leaves every component a star around its minimum. `count` (edges) sizes the shuffles.
    """
    parts = _partitions(2 * count, 2 * count * 64, cpus)
    shards = parts * _SHARDS_PER_PARTITION
    for _ in range(_MAX_CC_ROUNDS):
        large = (
            edges.map_batches(_both_directions, batch_format="pyarrow", fn_kwargs={"shards": shards})
            .groupby(_SHARD, num_partitions=parts)
            .map_groups(_large_star, batch_format="pyarrow")
        )
        edges = (
            large.map_batches(_shard_by_u, batch_format="pyarrow", fn_kwargs={"shards": shards})
            .groupby(_SHARD, num_partitions=parts)
            .map_groups(_small_star, batch_format="pyarrow")
            .materialize()
        )
        if edges.filter(expr=col(_CHANGED) > 0).count() == 0:
            return edges.select_columns(["u", "v"])
    raise RuntimeError(f"connected components did not converge in {_MAX_CC_ROUNDS} rounds")


def _local_components(edges: pa.Table) -> pa.Table:
    """The distributed rounds of `_connected_components`, run on one table until nothing moves."""
    edges = edges.select(["u", "v"])
    for _ in range(_MAX_CC_ROUNDS):
        edges = _small_star(_large_star(_both_directions(edges, shards=1)))
        if not edges.column(_CHANGED).to_numpy().any():
            return edges.select(["u", "v"])
    raise RuntimeError(f"connected components did not converge in {_MAX_CC_ROUNDS} rounds")


def _empty_rejected() -> ray.data.Dataset:
    return ray.data.from_arrow(pa.table({c: pa.array([], pa.string()) for c in REJECTED_COLUMNS}))


# Batch and group functions. Groups are coarse shards of the real key (see _SHARDS_PER_PARTITION),
# so each function handles many keys at once.


def _arrow(batch: pa.Table) -> pa.Table:
    return batch


# An ordered id is the order as 16 hex digits, then the id: string order is corpus order.
_ORDER_DIGITS = 16
_ORIGINAL_ID = "_dedup_original_id"


def _ordered_ids(batch: pa.Table, *, order_column: str) -> pa.Table:
    order = batch.column(order_column).to_pylist()
    if any(o is None or o < 0 for o in order):
        raise ValueError(f"dedup order column {order_column!r} must hold non-negative integers")
    ids = batch.column("id")
    ordered = [f"{o:0{_ORDER_DIGITS}x}{i}" for o, i in zip(order, ids.cast(pa.string()).to_pylist())]
    index = batch.schema.get_field_index("id")
    return batch.set_column(index, "id", pa.array(ordered, pa.string())).append_column(_ORIGINAL_ID, ids)


def _original_ids(batch: pa.Table) -> pa.Table:
    index = batch.schema.get_field_index("id")
    original = batch.column(_ORIGINAL_ID)
    return batch.set_column(index, "id", original).drop_columns([_ORIGINAL_ID])


def _id_shard(ids: pa.ChunkedArray | pa.Array, shards: int) -> np.ndarray:
    hashed = pd.util.hash_array(np.asarray(ids.to_pandas(), dtype=object))
    return (hashed % np.uint64(shards)).astype(np.int64)


def _fixed_width_matrix(column: pa.ChunkedArray | pa.Array, dtype: type, width: int) -> np.ndarray:
    """(n, width) numpy view of a fixed_size_binary column holding `width` values of `dtype` per row."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    row_bytes = np.dtype(dtype).itemsize * width
    raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    raw = raw[array.offset * row_bytes : (array.offset + len(array)) * row_bytes]
    return raw.view(dtype).reshape(len(array), width)


def _fixed_width_column(matrix: np.ndarray) -> pa.Array:
    n, nbytes = matrix.shape[0], matrix.shape[1] * matrix.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(nbytes), n, [None, pa.py_buffer(np.ascontiguousarray(matrix).tobytes())]
    )


def _key_rows(batch: pa.Table, *, minhash: MinHashBands | None, exact: bool, shards: int) -> pa.Table:
    """Per document: one exact row (key = 128-bit digest) and one row per band (key = bucket hash).

    Columns: kind (0 exact, 1 band), key (16 bytes), id, signature (band rows only; the whole
    signature rides along so a bucket can check its pairs), shard (a coarse slice of key).
    """
    normalized = [normalize_text(t or "") for t in batch.column("text").to_pylist()]
    n = len(normalized)
    ids = batch.column("id")
    parts = []
    if exact:
        keys = np.frombuffer(b"".join(exact_digest(t) for t in normalized), dtype=np.uint64).reshape(n, 2)
        parts.append((np.zeros(n, np.int8), keys, np.arange(n), None))
    if minhash is not None:
        signatures = minhash.signatures(normalized)
        buckets = minhash.bucket_keys(signatures).reshape(-1).view(np.uint64)
        keys = np.stack((buckets, np.zeros_like(buckets)), axis=1)
        rows = np.repeat(np.arange(n), minhash.bands)
        parts.append((np.ones(rows.size, np.int8), keys, rows, _fixed_width_column(signatures).take(pa.array(rows))))
    kind = np.concatenate([p[0] for p in parts])
    keys = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    width = 4 * minhash.num_perm if minhash is not None else 4
    signatures = pa.concat_arrays(
        [p[3] if p[3] is not None else pa.nulls(p[2].size, pa.binary(width)) for p in parts]
    )
    return pa.table(
        {
            _KIND: kind,
            _KEY: _fixed_width_column(keys),
            "id": ids.take(pa.array(rows)),
            _SIG: signatures,
            _SHARD: (keys[:, 0] % np.uint64(shards)).astype(np.int64),
        }
    )


def _key_edges(group: pa.Table, *, threshold: float) -> pa.Table:
    """Edges (u, v, exact), u > v, from rows sharing a key.

    Exact rows: every member of a digest group links to the group's smallest id. Band rows:
    pairs sharing a bucket (see `bucket_pairs`) whose signatures agree on at least `threshold`
    (the configured threshold less its verification margin)
    of their values, which weeds out LSH's false positives.
    """
    table = group.sort_by([(_KIND, "ascending"), (_KEY, "ascending"), ("id", "ascending")])
    kind = table.column(_KIND).to_numpy()
    keys = _fixed_width_matrix(table.column(_KEY), np.uint64, 2)
    new_run = np.ones(table.num_rows, dtype=bool)
    new_run[1:] = (keys[1:] != keys[:-1]).any(axis=1) | (kind[1:] != kind[:-1])
    run = np.cumsum(new_run)
    band_start = int(np.searchsorted(kind, 1))

    exact_members = np.flatnonzero(~new_run[:band_start])
    exact_heads = np.flatnonzero(new_run)[run[exact_members] - 1]
    left, right = bucket_pairs(run[band_start:])
    left, right = left + band_start, right + band_start
    if left.size:
        width = table.schema.field(_SIG).type.byte_width // 4
        signatures = _fixed_width_matrix(table.column(_SIG), np.uint32, width)
        similar = estimated_jaccard(signatures, left, right) >= threshold - 1e-9
        left, right = left[similar], right[similar]
    ids = table.column("id")
    near = pa.table({"u": ids.take(pa.array(right)), "v": ids.take(pa.array(left))})
    # A pair shares buckets in several bands (and identical ids never pair): one edge each.
    near = near.filter(pc.not_equal(near.column("u"), near.column("v"))).group_by(["u", "v"]).aggregate([])
    return pa.concat_tables(
        [
            pa.table(
                {
                    "u": ids.take(pa.array(exact_members)),
                    "v": ids.take(pa.array(exact_heads)),
                    _EXACT: np.ones(exact_members.size, np.int8),
                }
            ),
            near.append_column(_EXACT, pa.array(np.zeros(near.num_rows, np.int8))),
        ]
    )


def _markers(batch: pa.Table, *, reason: str) -> pa.Table:
    return pa.table(
        {"id": batch.column("u"), _KEPT: batch.column("v"), _REASON: pa.array([reason] * batch.num_rows, pa.string())}
    )


def _codes(*columns: pa.ChunkedArray) -> tuple[pa.Array, list[np.ndarray]]:
    """Ids -> int codes whose order is the ids' order, so min/compare run in numpy."""
    values = pa.chunked_array([c for col_ in columns for c in col_.chunks], type=columns[0].type)
    distinct = pc.unique(values)
    distinct = distinct.take(pc.sort_indices(distinct))
    return distinct, [pc.index_in(c, value_set=distinct).to_numpy().astype(np.int64) for c in columns]


def _both_directions(batch: pa.Table, *, shards: int) -> pa.Table:
    u, v = batch.column("u"), batch.column("v")
    node = pa.chunked_array(u.chunks + v.chunks, type=u.type)
    neighbour = pa.chunked_array(v.chunks + u.chunks, type=u.type)
    shard = _id_shard(node, shards) if shards > 1 else np.zeros(len(node), np.int64)
    return pa.table({"node": node, "nbr": neighbour, _SHARD: shard})


def _shard_by_u(batch: pa.Table, *, shards: int) -> pa.Table:
    return batch.append_column(_SHARD, pa.array(_id_shard(batch.column("u"), shards)))


def _unique_edges(ids: pa.Array, u: np.ndarray, v: np.ndarray, changed: np.ndarray) -> pa.Table:
    """Deduplicated (u, v) code pairs back to ids; a pair's change count is the largest of its copies."""
    if u.size == 0:
        empty = ids.slice(0, 0)
        return pa.table({"u": empty, "v": empty, _CHANGED: pa.array([], pa.int64())})
    key = u * len(ids) + v
    order = np.argsort(key, kind="stable")
    key, changed = key[order], changed[order]
    first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    key = key[first]
    return pa.table(
        {
            "u": ids.take(pa.array(key // len(ids))),
            "v": ids.take(pa.array(key % len(ids))),
            _CHANGED: np.maximum.reduceat(changed, first).astype(np.int64),
        }
    )


def _large_star(group: pa.Table) -> pa.Table:
    """Each node links its larger neighbours to the smallest of itself and its neighbours."""
    ids, (node, neighbour) = _codes(group.column("node"), group.column("nbr"))
    smallest = np.arange(len(ids), dtype=np.int64)
    np.minimum.at(smallest, node, neighbour)
    larger = neighbour > node
    u, m, via = neighbour[larger], smallest[node[larger]], node[larger]
    return _unique_edges(ids, u, m, (m < via).astype(np.int64))


def _small_star(group: pa.Table) -> pa.Table:
    """Each node u and its smaller neighbours all link to the smallest of those neighbours."""
    ids, (u, v) = _codes(group.column("u"), group.column("v"))
    count = len(ids)
    smallest = np.full(count, count, dtype=np.int64)
    np.minimum.at(smallest, u, v)
    incoming = np.zeros(count, dtype=np.int64)
    if _CHANGED in group.column_names:
        np.add.at(incoming, u, group.column(_CHANGED).to_numpy())
    nodes = np.unique(u)
    moved = v != smallest[u]
    return _unique_edges(
        ids,
        np.concatenate((nodes, v[moved])),
        np.concatenate((smallest[nodes], smallest[u[moved]])),
        np.concatenate((incoming[nodes], np.ones(int(moved.sum()), dtype=np.int64))),
    )


def _local_marker_rows(edges: pa.Table, *, exact: bool, edges_total: int, schema: pa.Schema, shards: int) -> pa.Table:
    """Every marker of a graph small enough for one task (`_connected_components` does large ones)."""
    if edges.num_rows != edges_total:  # components of part of a graph would be silently wrong
        raise RuntimeError(f"expected all {edges_total} edges in one batch, got {edges.num_rows}")
    parts = [_markers(_local_components(edges), reason=NEAR_DUPLICATE)]
    if exact:
        parts.append(_markers(edges.filter(pc.equal(edges.column(_EXACT), 1)), reason=EXACT_DUPLICATE))
    return _as_marker_rows(pa.concat_tables(parts), schema=schema, shards=shards)


def _as_doc_rows(batch: pa.Table, *, shards: int) -> pa.Table:
    n = batch.num_rows
    return (
        batch.append_column(_KEPT, pa.nulls(n, pa.string()))
        .append_column(_REASON, pa.nulls(n, pa.string()))
        .append_column(_ROLE, pa.array(np.zeros(n, dtype=np.int8)))
        .append_column(_SHARD, pa.array(_id_shard(batch.column("id"), shards)))
    )


def _as_marker_rows(batch: pa.Table, *, schema: pa.Schema, shards: int) -> pa.Table:
    """Markers shaped like document rows (every document column null but id) so both can be unioned."""
    n = batch.num_rows
    columns = {}
    for field in schema:
        if field.name == "id":
            columns["id"] = batch.column("id").cast(field.type)
        elif isinstance(field.type, pa.ExtensionType):
            columns[field.name] = pa.ExtensionArray.from_storage(field.type, pa.nulls(n, field.type.storage_type))
        else:
            columns[field.name] = pa.nulls(n, field.type)
    columns[_KEPT] = batch.column(_KEPT).cast(pa.string())
    columns[_REASON] = batch.column(_REASON)
    columns[_ROLE] = pa.array(np.ones(n, dtype=np.int8))
    columns[_SHARD] = pa.array(_id_shard(batch.column("id"), shards))
    return pa.table(columns)


def _resolve_markers(group: pa.Table) -> pa.Table:
    """Fill each document's (_dedup_kept, _dedup_reason) from the markers with its id.

    A near-duplicate marker names the component's survivor, so it wins for kept; a document that
    also has an exact marker is an exact duplicate.
    """
    is_doc = pc.equal(group.column(_ROLE), 0)
    docs, marks = group.filter(is_doc), group.filter(pc.invert(is_doc))
    kept_by = {}
    for reason in (NEAR_DUPLICATE, EXACT_DUPLICATE):
        these = marks.filter(pc.equal(marks.column(_REASON), reason))
        index = pc.index_in(docs.column("id"), value_set=these.column("id").combine_chunks())
        kept_by[reason] = these.column(_KEPT).take(index)
    kept = pc.coalesce(kept_by[NEAR_DUPLICATE], kept_by[EXACT_DUPLICATE])
    reason = pc.if_else(
        pc.is_valid(kept_by[EXACT_DUPLICATE]),
        pa.scalar(EXACT_DUPLICATE),
        pc.if_else(pc.is_valid(kept), pa.scalar(NEAR_DUPLICATE), pa.scalar(None, pa.string())),
    )
    docs = docs.drop_columns([_KEPT, _REASON, _ROLE, _SHARD])
    return docs.append_column(_KEPT, kept).append_column(_REASON, reason)


def _rejected_rows(batch: pa.Table, *, ordered: bool) -> pa.Table:
    n = batch.num_rows
    kept = batch.column(_KEPT).cast(pa.string())
    ids = batch.column(_ORIGINAL_ID if ordered else "id").cast(pa.string())
    if ordered:
        kept = pc.utf8_slice_codeunits(kept, _ORDER_DIGITS)
    return pa.table(
        {
            "id": ids,
            "source": batch.column("source").cast(pa.string()),
            "location": batch.column("location").cast(pa.string()),
            "stage": pa.array([STAGE] * n, pa.string()),
            "reason": batch.column(_REASON).cast(pa.string()),
            "detail": pc.binary_join_element_wise("duplicate of ", kept, ""),
        }
    )
