"""Reading and setting the columns of a stage's pyarrow batch (labellers, cleaning).

Kept free of torch (as is `quality.py`), so an actor that only runs the quality labeller starts
without importing it: about 2 s of every actor's start-up on a laptop CPU.
"""

from __future__ import annotations

import pyarrow as pa

from mtnlg_ray.errors import InputError


def column(batch: pa.Table, name: str) -> pa.ChunkedArray:
    """Column `name`, or an InputError naming the columns there are."""
    if name not in batch.column_names:
        columns = ", ".join(batch.column_names)
        raise InputError(f"label: documents have no column {name!r} (columns: {columns})")
    return batch.column(name)


def texts(batch: pa.Table, text_field: str) -> list[str]:
    """The documents' texts, a null as ''."""
    return [t or "" for t in column(batch, text_field).to_pylist()]


def with_column(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """`batch` with column `name` set to `values`, replacing an earlier labelling's column."""
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, values)
    return batch.append_column(name, values)
