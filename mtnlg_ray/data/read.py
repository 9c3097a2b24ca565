"""Read raw text from INPUT arguments: files, folders, globs, or `builtin:python-docs`.

A small single-process reader that feeds tokenizer training; it reads .txt, .jsonl,
.jsonl.gz and .parquet from the local disk.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from mtnlg_ray.data.builtin import BUILTIN_PYTHON_DOCS, python_docs_texts
from mtnlg_ray.errors import InputError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_GLOB_CHARS = frozenset("*?[")


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Expand INPUTs into the list of files to read, `builtin:python-docs` kept as is.

    Inputs keep their order. A folder stands for every supported file below it (names
    starting with "." or "_" left out) and a glob for every supported file it matches,
    each sorted; files of other types there are passed over. A file named twice is read
    once. Raises `InputError` when an input matches no supported file or names a file of
    an unsupported type.
    """
    if not inputs:
        raise InputError("no INPUT given: pass a file, folder, glob or builtin:python-docs")
    resolved: dict[str, None] = {}  # an ordered set
    for spec in inputs:
        resolved.update(dict.fromkeys(_resolve_one(spec)))
    return list(resolved)


def iter_texts(
    inputs: Sequence[str], text_field: str = "text", skipped: Counter[str] | None = None
) -> Iterator[str]:
    """Return an iterator over every document's text in INPUTs, in `resolve_inputs` order.

    A .txt file is one document. In .jsonl / .jsonl.gz each line is a JSON object whose
    `text_field` holds the text; in .parquet the column `text_field` does. Records that
    cannot be used are, for now, skipped: counted in `skipped` by reason ("bad_json",
    "not_object", "missing_field", "not_text", "bad_utf8", "empty") and logged per file.
    The inputs are resolved (and bad ones raise `InputError`) before this returns; a
    missing Parquet column, a broken gzip or a broken Parquet file raises `InputError`
    while iterating.
    """
    items = resolve_inputs(inputs)
    return _iter_items(items, text_field, skipped if skipped is not None else Counter())


def _iter_items(items: list[str], text_field: str, counts: Counter[str]) -> Iterator[str]:
    for item in items:
        if item == BUILTIN_PYTHON_DOCS:
            yield from python_docs_texts()
            continue
        before = counts.copy()
        yield from _read_file(Path(item), text_field, counts)
        lost = counts - before
        if lost:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(lost.items()))
            log.warning("%s: skipped %s", item, reasons)


def _resolve_one(spec: str) -> list[str]:
    if spec == BUILTIN_PYTHON_DOCS:
        return [spec]
    if "://" in spec:
        raise InputError(f"{spec}: only local paths are read here, not URIs")
    path = Path(spec).expanduser()
    if path.is_file():
        if not _supported(path):
            expected = ", ".join(SUFFIXES)
            raise InputError(f"{spec}: unsupported file type, expected one of {expected}")
        return [str(path)]
    if path.is_dir():
        found = _supported_files(_walk_folder(path))
        if not found:
            raise InputError(f"{spec}: folder holds no {', '.join(SUFFIXES)} files")
        return found
    if _GLOB_CHARS & set(spec):
        matches: list[Path] = []
        for match in glob.glob(str(path), recursive=True):
            match_path = Path(match)
            matches.extend(_walk_folder(match_path) if match_path.is_dir() else [match_path])
        found = _supported_files(matches)
        if not found:
            raise InputError(f"{spec}: glob matches no {', '.join(SUFFIXES)} files")
        return found
    raise InputError(f"{spec}: no such file or folder")


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _walk_folder(folder: Path) -> Iterator[Path]:
    # Like pyarrow's dataset discovery: names starting with "." or "_" (`.git`, `_SUCCESS`,
    # `_metadata`) are bookkeeping, not data.
    for path in folder.rglob("*"):
        if not any(part.startswith((".", "_")) for part in path.relative_to(folder).parts):
            yield path


def _supported_files(paths: Iterable[Path]) -> list[str]:
    return sorted(str(p) for p in paths if p.is_file() and _supported(p))


def _read_file(path: Path, text_field: str, skipped: Counter[str]) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(".txt"):
        yield from _read_txt(path, skipped)
    elif name.endswith(".parquet"):
        yield from _read_parquet(path, text_field, skipped)
    elif name.endswith(".jsonl.gz"):
        try:
            with gzip.open(path, "rb") as lines:
                yield from _read_jsonl(lines, text_field, skipped)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{path}: not a readable gzip file ({err})") from None
    else:
        with path.open("rb") as lines:
            yield from _read_jsonl(lines, text_field, skipped)


def _read_txt(path: Path, skipped: Counter[str]) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["bad_utf8"] += 1
        return
    if text:
        yield text
    else:
        skipped["empty"] += 1


def _read_jsonl(lines, text_field: str, skipped: Counter[str]) -> Iterator[str]:
    for raw in lines:
        if not raw.strip():
            continue  # blank lines (a trailing newline) are not records
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            skipped["bad_utf8"] += 1
            continue
        except ValueError:
            skipped["bad_json"] += 1
            continue
        if not isinstance(record, dict):
            skipped["not_object"] += 1
            continue
        if text_field not in record or record[text_field] is None:
            skipped["missing_field"] += 1
            continue
        text = record[text_field]
        if not isinstance(text, str):
            skipped["not_text"] += 1
        elif not text:
            skipped["empty"] += 1
        elif not _is_utf8(text):
            skipped["bad_utf8"] += 1
        else:
            yield text


def _is_utf8(text: str) -> bool:
    # JSON can escape lone surrogates ("\ud83d"), which no UTF-8 encoder accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_parquet(path: Path, text_field: str, skipped: Counter[str]) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    if text_field not in parquet.schema_arrow.names:
        columns = ", ".join(parquet.schema_arrow.names)
        raise InputError(f"{path}: no column {text_field!r} (columns: {columns})")
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"{path}: column {text_field!r} is {column_type}, expected string")
    try:
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    skipped["missing_field"] += 1
                elif not text:
                    skipped["empty"] += 1
                else:
                    yield text
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
