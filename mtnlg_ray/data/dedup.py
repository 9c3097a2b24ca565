"""Dedup stage of `data prepare`, between clean and pseudo-label: exact and near duplicates out.

Exact digests and MinHash LSH buckets (`minhash.py`) meet in one shuffle; candidate pairs are checked on
their signatures, then joined into connected components, all as Ray Data operations; the driver sees counts only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.expressions import col

from mtnlg_ray.data.minhash import (
    MinHashBands,
    bucket_pairs,
    estimated_jaccard,
    exact_digest,
    fingerprint_jaccard,
    normalize_text,
)
from mtnlg_ray.data.read import rejected_schema

if TYPE_CHECKING:
    from mtnlg_ray.config import DedupSection

STAGE = "dedup"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

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
    return ray.data.from_arrow(rejected_schema().empty_table())


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

    Columns: kind (0 exact, 1 band), key (16 bytes), id, signature (band rows only: the low byte of
    each MinHash value rides along so a bucket can check its pairs), shard (a coarse slice of key).
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
        # Each band row carries the document's signature for verifying its bucket's pairs, one byte a
        # value: 4x less to shuffle and spill (the whole uint32 signature on 20 band rows is 20.8 KB a
        # document, 79 GB for 2 GB of paragraphs); _key_edges corrects the bias of 8-bit collisions.
        fingerprints = (signatures & np.uint32(0xFF)).astype(np.uint8)
        parts.append((np.ones(rows.size, np.int8), keys, rows, _fixed_width_column(fingerprints).take(pa.array(rows))))
    kind = np.concatenate([p[0] for p in parts])
    keys = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    width = minhash.num_perm if minhash is not None else 1
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
        width = table.schema.field(_SIG).type.byte_width
        fingerprints = _fixed_width_matrix(table.column(_SIG), np.uint8, width)
        similar = fingerprint_jaccard(estimated_jaccard(fingerprints, left, right)) >= threshold - 1e-9
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
