"""Labelled data for fine-tuning: classification rows (text, label) and SFT pairs (prompt, completion).

Reads TSV/CSV (a header row names the columns), JSONL (optionally .gz) and Parquet. Fine-tuning
sets are small and every row matters, so a bad one stops the command with one line naming the
file, the line and what was expected, before any worker starts.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from mtnlg_ray.errors import InputError, first_few

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass
class LabelledRow:
    text: str
    label: str
    where: str  # file:line, for error messages
    probs: list[float] | None = None  # soft label over the task's labels, when the file carries one


@dataclass
class ClassificationSet:
    rows: list[LabelledRow] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.rows]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in TABLE_SUFFIXES if name.endswith(s)), path.suffix.lower())


def read_table(path: str | Path, columns: Sequence[str], optional: Sequence[str] = ()) -> Iterator[tuple[str, dict]]:
    """(file:line, {column: value}) for each row of a TSV, CSV, JSONL or Parquet file.

    Raises `InputError` for a missing file, an unsupported type, a broken line or a missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = _suffix(path)
    if suffix in (".tsv", ".csv"):
        yield from _delimited(path, columns, optional, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".jsonl.gz"):
        yield from _jsonl(path, columns, optional)
    elif suffix == ".parquet":
        yield from _parquet(path, columns, optional)
    else:
        raise InputError(f"{path}: unsupported file type (expected one of {', '.join(TABLE_SUFFIXES)})")


def _delimited(path: Path, columns, optional, delimiter: str):
    # A field may be as long as a document: the csv module's default cap is 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    inside = "a tab inside a field" if delimiter == "\t" else "an unquoted comma inside a field? quote it"
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would otherwise
        # stick to the first column's name and make the header seem to lack it.
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
            try:
                header = reader.fieldnames or []
                if not header:  # no header: said as such, not as a header without the column
                    named = ", ".join(map(repr, columns))
                    if path.read_bytes().removeprefix(b"\xef\xbb\xbf").strip():
                        raise InputError(f"{path}:1: blank header line (expected a header naming {named})")
                    raise InputError(f"{path}: empty file (expected a header line naming {named}, then one row "
                                     "per example)")
                missing = [c for c in columns if c not in header]
                if missing:
                    raise InputError(f"{path}:1: no column {missing[0]!r} in the header (columns: {', '.join(header) or 'none'})")
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if any(row.get(c) is None for c in columns):
                        raise InputError(f"{where}: expected {len(header)} {delimiter!r}-separated fields, got fewer")
                    # DictReader's key for the fields past the header's; empty ones (a trailing tab) are harmless
                    if any(extra.strip() for extra in row.get(None) or ()):
                        raise InputError(f"{where}: expected {len(header)} {delimiter!r}-separated fields, got "
                                         f"{len(header) + len(row[None])} ({inside})")
                    yield where, {c: row[c] for c in [*columns, *optional] if c in row}
            except csv.Error as err:
                raise InputError(f"{path}:{reader.line_num}: {err}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _jsonl(path: Path, columns, optional):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:  # a leading byte-order mark is no JSON
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                line = line.rstrip("\r\n")  # parsed with it, a cut string was an "invalid control character"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:  # its own "line 2 column 1" counted within this line
                    at = ("at the end of the line" if err.pos >= len(line.rstrip()) else f"at character {err.pos + 1}")
                    raise InputError(f"{where}: not valid JSON ({err.msg.removesuffix(' at')} {at})") from None
                except ValueError as err:
                    raise InputError(f"{where}: not valid JSON ({err})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
                missing = [c for c in columns if record.get(c) is None]
                if missing:
                    raise InputError(f"{where}: missing field {missing[0]!r}")
                yield where, {c: record[c] for c in [*columns, *optional] if c in record}
    # zlib.error: a .gz whose compressed data is damaged (a cut or a flipped byte), not just its header
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"{path}: unreadable ({err})") from None


def _parquet(path: Path, columns, optional):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for a bad file
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    present = [c for c in [*columns, *optional] if c in table.column_names]
    for number, row in enumerate(table.select(present).to_pylist(), start=1):
        where = f"{path}:row {number}"
        if any(row.get(c) is None for c in columns):
            raise InputError(f"{where}: null in column {next(c for c in columns if row.get(c) is None)!r}")
        yield where, row


def read_classification(path: str | Path, text_field: str, label_field: str) -> ClassificationSet:
    """Every (text, label) row of `path`; labels are kept as strings (SST-2's 0/1 become "0"/"1")."""
    out = ClassificationSet()
    first_kind: tuple[str, bool] | None = None  # where the first label was, and whether it was true / false
    for where, row in read_table(path, [text_field, label_field], optional=["probs"]):
        text, label = row[text_field], row[label_field]
        if not isinstance(text, str):
            raise InputError(f"{where}: field {text_field!r} must be text, got {type(text).__name__}")
        if not text.strip():  # trained as an EOS alone, without a word
            raise InputError(f"{where}: field {text_field!r} is empty (a labelled example needs its text)")
        if isinstance(label, (dict, list)) or str(label).strip() == "":
            raise InputError(f"{where}: field {label_field!r} must be a label (a string or an integer), got {label!r}")
        # A true / false column (BoolQ's) names two classes; true among 0 / 1 made a third called "True"
        first_kind = first_kind or (where, isinstance(label, bool))
        if isinstance(label, bool) != first_kind[1]:
            raise InputError(f"{where}: field {label_field!r} is {label!r}, but {first_kind[0]} holds "
                             f"{'true / false' if first_kind[1] else 'a label that is not true / false'}; give "
                             "every label the same kind")
        probs = row.get("probs")
        if probs is not None and not _distribution(probs):
            raise InputError(f"{where}: field 'probs' must be a list of finite numbers >= 0 with a positive sum "
                             f"(probabilities, not logits), got {probs!r}")
        out.rows.append(LabelledRow(text, label_text(label), where, probs))
    if not out.rows:
        raise InputError(f"{path}: no examples (the file is empty" + (")" if _suffix(Path(path)) in (
            ".jsonl", ".jsonl.gz") else " or holds only a header)"))
    return out


def label_text(label) -> str:
    """A label as the task names it: 1.0 (a float column, as pandas writes one with gaps) is "1"."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label).strip()


def _distribution(probs) -> bool:
    """Soft labels: a list of finite, non-negative numbers that sums to more than 0 (booleans are no numbers)."""
    if not isinstance(probs, list) or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs):
        return False
    return all(math.isfinite(p) and p >= 0 for p in probs) and sum(probs) > 0


def check_labels(data: ClassificationSet, labels: Sequence[str], what: str) -> None:
    """Every row's label must be one of `labels`; soft labels must have one probability per label."""
    known = set(labels)
    for row in data.rows:
        if row.label not in known:  # a wrong label_field (the text column) made every row a label: a few shown
            shown = first_few([repr(x) for x in labels], 10)
            raise InputError(f"{row.where}: label {row.label!r} is not one of the task's labels [{shown}] ({what})")
        if row.probs is not None and len(row.probs) != len(labels):
            raise InputError(f"{row.where}: 'probs' has {len(row.probs)} values for {len(labels)} labels")


def label_set(data: ClassificationSet) -> list[str]:
    """The labels found in a training file, sorted (numerically when they all are integers)."""
    found = set(data.labels)
    if all(x.lstrip("-").isdigit() for x in found):
        return sorted(found, key=int)
    return sorted(found)


@dataclass
class SFTPair:
    prompt: str
    completion: str
    where: str


def read_sft(path: str | Path, prompt_field: str = "prompt", completion_field: str = "completion") -> list[SFTPair]:
    pairs = []
    for where, row in read_table(path, [prompt_field, completion_field]):
        prompt, completion = row[prompt_field], row[completion_field]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InputError(f"{where}: fields {prompt_field!r} and {completion_field!r} must be strings")
        if not completion:
            raise InputError(f"{where}: field {completion_field!r} is empty (nothing to learn)")
        pairs.append(SFTPair(prompt, completion, where))
    if not pairs:
        raise InputError(f"{path}: no examples (the file is empty)")
    return pairs
