"""Read raw text from INPUT arguments: files, folders, globs, URIs, or `builtin:python-docs`.

Every file becomes a stream of records: a document (text, location) or a rejected record
(location, reason). `read_corpus` runs that as the first stage of the Ray Data pipeline, one
task per file, so bad records land in `rejected/` instead of stopping the run; `iter_texts`
is the same reader in one process, for tokenizer training.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtnlg_ray.data.builtin import BUILTIN_PYTHON_DOCS, python_docs_texts
from mtnlg_ray.errors import InputError, first_few

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


def resolve_sources(inputs: Sequence[str], output: str | Path | None = None,
                    passed_over: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(INPUT, its files) for each INPUT, a file named by several read once, for the first that names it.

    A folder or glob leaves out, below it, the run's `output` and any dataset a run wrote (a folder
    holding manifest.json beside docs/, rejected/ or tokens/): `prepare corpus/ --output corpus/prepared`
    read its own last output back in as input, duplicating the corpus. What is left out, and the files
    of other types, are appended to `passed_over` (one entry each) for the read stage to report.
    """
    walk = _Walk(_plain(Path(output).expanduser()) if output is not None else None)
    seen: set[str] = set()
    sources = []
    for spec in inputs:
        files = [f for f in dict.fromkeys(_resolve_one(spec, walk)) if f not in seen]
        seen.update(files)
        sources.append((spec, files))
    if passed_over is not None:
        passed_over.extend(walk.passed_over)
    return sources


@dataclass(frozen=True)
class Record:
    """One record of a file: a document when `reason` is empty, else a rejected record."""

    location: str  # "path", "path:line", "path:row", "builtin:python-docs:doc"
    text: str | None
    reason: str = ""
    detail: str = ""
    url: str = ""  # from read.url_field, when set and present


# The columns of a rejected/ row, whatever stage rejected it.
REJECTED_COLUMNS = ("id", "source", "location", "stage", "reason", "detail")

# Whole-file problems: the single-process reader raises on these, the pipeline rejects the file.
FILE_REASONS = frozenset({"unreadable_file", "missing_column"})


def rejected_schema():
    """The Arrow schema of every rejected/ row: the `REJECTED_COLUMNS`, all strings."""
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in REJECTED_COLUMNS])


def iter_texts(
    inputs: Sequence[str], text_field: str = "text", skipped: Counter[str] | None = None,
    max_chars: int | None = None, piece_chars: int | None = None, txt_mode: str = "file",
) -> Iterator[str]:
    """Return an iterator over every document's text in INPUTs, in `resolve_inputs` order.

    A .txt file is read by `txt_mode` as `data prepare` reads it (by default one document). In .jsonl / .jsonl.gz each line is a JSON object whose
    `text_field` holds the text; in .parquet the column `text_field` does. Records that
    cannot be used are skipped: counted in `skipped` by reason ("bad_json", "not_object",
    "missing_field", "not_text", "bad_utf8", "empty") and logged per file. The inputs are
    resolved (and bad ones raise `InputError`) before this returns; a missing or non-text
    Parquet column, a broken gzip or a broken Parquet file raises `InputError` while iterating.
    With `max_chars`, documents are as `data prepare` reads them (`read.max_chars`, `read.piece_chars`):
    a longer .txt in pieces, a longer record skipped as "oversized".
    """
    items = resolve_inputs(inputs)
    return _iter_items(items, text_field, skipped if skipped is not None else Counter(), max_chars, piece_chars,
                       txt_mode)


def _iter_items(items: list[str], text_field: str, counts: Counter[str], max_chars: int | None = None,
                piece_chars: int | None = None, txt_mode: str = "file") -> Iterator[str]:
    for item in items:
        lost: Counter[str] = Counter()
        for record in iter_records(item, text_field, txt_mode=txt_mode, max_chars=max_chars, piece_chars=piece_chars):
            if not record.reason:
                yield record.text
            elif record.reason in FILE_REASONS:
                raise InputError(f"{record.location}: {record.detail}")
            else:
                lost[record.reason] += 1
        counts.update(lost)
        if lost:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(lost.items()))
            log.warning("%s: skipped %s", item, reasons)


def iter_records(
    item: str,
    text_field: str = "text",
    txt_mode: str = "file",
    max_chars: int | None = None,
    piece_chars: int | None = None,
    url_field: str | None = None,
    byte_range: tuple[int, int, int] | None = None,
) -> Iterator[Record]:
    """Records of one resolved item (a file path, a URI, or `builtin:python-docs`).

    `txt_mode` "file" makes a .txt file one document, or, when it is longer than `max_chars`,
    documents of at most `piece_chars` (default `max_chars`) characters cut at paragraph
    boundaries, at line boundaries inside a paragraph that is itself too long, each located at its
    first line; "paragraph" makes one document per run of non-blank lines and "line" one per
    non-empty line. A record over `max_chars` characters becomes a rejected record ("oversized").
    `byte_range` (start, end, number of its first line) reads one block of a large local .txt
    (`txt_blocks`): its records are those the whole file would give there (in file mode, pieces).
    """
    if item == BUILTIN_PYTHON_DOCS:
        records = (Record(f"{item}:{i}", text) for i, text in enumerate(python_docs_texts()))
    else:
        cut = min(piece_chars or max_chars, max_chars) if max_chars is not None else None
        records = _read_file(item, text_field, txt_mode, max_chars, cut, url_field, byte_range)
    for record in records:
        if not record.reason and max_chars is not None and len(record.text) > max_chars:
            yield Record(record.location, None, "oversized", f"{len(record.text)} characters > {max_chars}")
        else:
            yield record


def document_id(location: str) -> str:
    """A stable id: the same record of the same file gets the same id on every run and machine."""
    return hashlib.blake2b(location.encode("utf-8"), digest_size=8).hexdigest()


DATASET_MARKERS = ("docs", "rejected", "tokens")  # beside manifest.json: a folder a run of ours wrote
DATASET_FORMAT = "mtnlg-ray/"  # how the "format" of every manifest.json a run of ours writes starts


def is_dataset(folder: Path) -> bool:
    """Whether `folder` is a dataset a run of ours wrote: our manifest.json beside docs/, rejected/ or tokens/
    (a web project's manifest.json beside its docs/ is not one)."""
    if not (folder / "manifest.json").is_file() or not any((folder / name).is_dir() for name in DATASET_MARKERS):
        return False
    return our_manifest(folder / "manifest.json") is True


def our_manifest(path: Path) -> bool | None:
    """Whether a run of ours wrote the manifest.json at `path` (its format starts with ours); None when it
    cannot be read."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    except OSError:
        return None
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(DATASET_FORMAT)


class _Walk:
    """What a folder or glob leaves out below its root: the run's output and (`datasets`) the datasets
    earlier runs wrote there."""

    def __init__(self, output: Path | None, datasets: bool = True) -> None:
        self.output = output
        self.real_output = output.resolve() if output is not None else None  # --output through a symlink
        self.datasets = datasets
        self.passed_over: list[str] = []
        self._found: dict[Path, bool] = {}
        self._real: dict[Path, Path] = {}

    def _is_output(self, folder: Path) -> bool:
        if folder not in self._real:
            self._real[folder] = folder.resolve()
        return self._real[folder] == self.real_output

    def _is_dataset(self, folder: Path) -> bool:
        if folder not in self._found:
            self._found[folder] = self.datasets and is_dataset(folder)
        return self._found[folder]

    def kept(self, paths: Iterable[Path], root: Path) -> list[Path]:
        """`paths` below `root` less those inside the output or a dataset strictly below `root`."""
        root = _plain(root)
        real_root = root.resolve()
        # An output holding the input folder (or being it) leaves out nothing; either path may pass a symlink.
        watch = self.output is not None and any(
            output != folder and output.is_relative_to(folder)
            for output, folder in ((self.output, root), (self.real_output, real_root)))
        kept = []
        for path in paths:
            absolute = _plain(path)
            inside = [a for a in absolute.parents if a != root and a.is_relative_to(root)]
            hit = next((a for a in reversed(inside) if (watch and self._is_output(a)) or self._is_dataset(a)), None)
            if hit is None:
                kept.append(path)
                continue
            what = "this run's output" if watch and self._is_output(hit) else "a prepared dataset"
            entry = f"{_shown(hit)} ({what})"
            if entry not in self.passed_over:
                self.passed_over.append(entry)
        return kept

    def left_out(self, since: int) -> str:
        """The clause naming what was passed over since entry `since`, for an input left with no file."""
        passed = self.passed_over[since:]
        return f" beside what it passes over: {first_few(passed)}" if passed else ""

    def supported(self, paths: Iterable[Path]) -> list[str]:
        paths = list(paths)
        files = [p for p in paths if p.is_file()]
        self.passed_over.extend(f"{p} (a broken link)" for p in sorted(set(paths)) if p.is_symlink() and not p.exists())
        self.passed_over.extend(f"{p} (another file type)" for p in sorted(set(files)) if not _supported(p))
        return _supported_files(files)

    def folder(self, path: Path) -> list[Path]:
        """The files a folder input stands for; a dataset of ours stands for its docs/ (its rejected/ and
        tokens/ hold no text to read)."""
        if is_dataset(path) and (path / "docs").is_dir():
            path = path / "docs"
        return self.kept(_walk_folder(path), path)

    def glob(self, spec: str) -> list[Path]:
        """The files a glob matches. A matched folder is walked as a folder input is; datasets are left out
        only where `**` reaches into them, not where the pattern names their inside (`work/*/docs/*.parquet`)."""
        pattern = Path(spec).expanduser().absolute().parts
        deep = pattern.index("**") if "**" in pattern else None
        found: list[Path] = []
        for match in glob.glob(str(Path(spec).expanduser()), recursive=True):
            match_path = Path(match)
            if match_path.is_dir():
                found.extend(self.folder(match_path))
                continue
            parts = match_path.absolute().parts
            root = Path(*parts[:deep]) if deep is not None else match_path.absolute().parent
            found.extend(self.kept([match_path], root))
        return found


def _plain(path: Path) -> Path:
    """`path` absolute with `..` and `.` taken out, symlinks left as they are: `--output corpus/../corpus/out`
    is the `corpus/out` a walk of corpus/ meets."""
    return Path(os.path.normpath(path.absolute()))


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it, as the user most likely typed it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _resolve_one(spec: str, walk: _Walk | None = None) -> list[str]:
    walk = walk or _Walk(None, datasets=False)
    if spec == BUILTIN_PYTHON_DOCS:
        return [spec]
    if "://" in spec:
        return _resolve_uri(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if not _supported(path):
            expected = ", ".join(SUFFIXES)
            raise InputError(f"{spec}: unsupported file type, expected one of {expected}")
        return [str(path)]
    before = len(walk.passed_over)
    if path.is_dir():
        found = walk.supported(walk.folder(path))
        if not found:
            raise InputError(f"{spec}: folder holds no {', '.join(SUFFIXES)} files" + walk.left_out(before))
        return found
    if _GLOB_CHARS & set(spec):
        found = walk.supported(walk.glob(spec))
        if not found:
            raise InputError(f"{spec}: glob matches no {', '.join(SUFFIXES)} files" + walk.left_out(before))
        return found
    raise InputError(f"{spec}: no such file or folder")


def _resolve_uri(spec: str) -> list[str]:
    """A file or folder on any pyarrow filesystem (s3://, gs://, hdfs://, file://)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from urllib.parse import urlsplit

    parts = urlsplit(spec)
    if _GLOB_CHARS & set(parts.path):  # a query (?endpoint_override=..., as MinIO needs) is no glob
        raise InputError(f"{spec}: globs are read from local paths only; give a folder URI instead")
    try:
        fs, path = pafs.FileSystem.from_uri(spec)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            if not _supported(Path(path)):
                raise InputError(f"{spec}: unsupported file type, expected one of {', '.join(SUFFIXES)}")
            return [spec]
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{spec}: no such file or folder")
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(f"{spec}: cannot open ({err})") from None
    prefix = path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""

    def child(file_path: str) -> str:
        # s3 and gs paths start with the bucket; others (hdfs://host:port/..., file:///...) keep the host.
        host = parts.netloc if file_path.startswith("/") else ""
        return f"{parts.scheme}://{host}{file_path}{query}"

    found = sorted(
        child(i.path)
        for i in listing
        if i.type == pafs.FileType.File
        and _supported(Path(i.path))
        and not any(part.startswith((".", "_")) for part in i.path[len(prefix) :].split("/") if part)
    )
    if not found:
        raise InputError(f"{spec}: folder holds no {', '.join(SUFFIXES)} files")
    return found


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _walk_folder(folder: Path) -> Iterator[Path]:
    # Like pyarrow's dataset discovery: names starting with "." or "_" (`.git`, `_SUCCESS`,
    # `_metadata`) are bookkeeping, not data.
    for path in folder.rglob("*"):
        if not any(part.startswith((".", "_")) for part in path.relative_to(folder).parts):
            yield path


def _supported_files(paths: Iterable[Path]) -> list[str]:
    found = sorted(set(str(p) for p in paths if p.is_file() and _supported(p)))
    for name in found:
        if not _is_utf8(name):  # Linux hands such a name over with its bytes as lone surrogates
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            raise InputError(f"{shown}: the file name is not valid UTF-8; rename it (records are named by their file)")
    return found


def _open(item: str):
    """A binary file object for a local path or a pyarrow-filesystem URI."""
    if "://" in item:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(item)
        with fs.open_input_stream(path) as stream:
            return io.BytesIO(stream.read())
    return open(item, "rb")


def _read_file(
    item: str, text_field: str, txt_mode: str, max_chars: int | None, piece_chars: int | None,
    url_field: str | None = None, byte_range: tuple[int, int, int] | None = None,
) -> Iterator[Record]:
    import pyarrow as pa

    name = item.lower()
    documents = 0  # read before an error: those are kept, and the error says so
    try:
        for record in _file_records(item, name, text_field, txt_mode, max_chars, piece_chars, url_field, byte_range):
            documents += not record.reason
            yield record
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
        kind = "gzip" if name.endswith(".gz") else "Parquet" if name.endswith(".parquet") else "text"
        kept = f"; the {documents:,} documents read before the break are kept" if documents else ""
        yield Record(item, None, "unreadable_file", f"not a readable {kind} file ({err}){kept}")


def _file_records(item: str, name: str, text_field: str, txt_mode: str, max_chars: int | None,
                  piece_chars: int | None, url_field: str | None, byte_range: tuple[int, int, int] | None,
                  ) -> Iterator[Record]:
    if name.endswith(".txt") and byte_range is not None:
        start, end, first_line = byte_range
        with open(item, "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
        yield from _txt_records(item, data, txt_mode, max_chars, piece_chars, first_line - 1, start)
    elif name.endswith(".txt"):
        with _open(item) as fh:
            data = fh.read()
        yield from _txt_records(item, data, txt_mode, max_chars, piece_chars)
    elif name.endswith(".parquet"):
        yield from _parquet_records(item, text_field, url_field)
    elif name.endswith(".jsonl.gz"):
        with _open(item) as raw, gzip.open(raw, "rb") as lines:
            yield from _jsonl_records(item, lines, text_field, url_field)
    else:
        with _open(item) as lines:
            yield from _jsonl_records(item, lines, text_field, url_field)


def _txt_records(
    item: str, data: bytes, txt_mode: str, max_chars: int | None, piece_chars: int | None,
    line_offset: int = 0, byte_offset: int | None = None,
) -> Iterator[Record]:
    """Records of a .txt file's bytes, or (`byte_offset` given) of one block of it starting after
    `line_offset` lines."""
    block = byte_offset is not None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if txt_mode == "file":  # the file (or the block) is the unit: it goes whole
            line = line_offset + data[: err.start].count(b"\n") + 1
            where = f"{item}:{line}" if block else item
            yield Record(where, None, "bad_utf8", f"invalid UTF-8 at byte {err.start + (byte_offset or 0)}")
            return
        # A line or a paragraph is a document: only those holding the bad bytes are rejected, each
        # at its line (one bad byte used to reject the whole file, as one record).
        text = data.decode("utf-8", "surrogateescape")
    if not text.strip():
        if not block:  # a block of blank lines between paragraphs is nothing to report
            yield Record(item, None, "empty", "empty file" if not text else "only white space")
    elif txt_mode == "line":
        for number, line in enumerate(_lines(text), start=line_offset + 1):
            if line.strip():
                yield _unit(f"{item}:{number}", line, "line")
    elif txt_mode == "paragraph":
        for first_line, paragraph in _paragraphs(text):
            yield _unit(f"{item}:{first_line + line_offset}", paragraph, "paragraph")
    elif not block and (max_chars is None or len(text) <= max_chars):
        yield Record(item, text)
    else:
        for first_line, piece in _pieces(text, piece_chars or max_chars or len(text)):
            yield Record(f"{item}:{first_line + line_offset}", piece)


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _unit(where: str, text: str, kind: str) -> Record:
    """A line or paragraph as a document, or as a rejected record when it holds bytes that are not UTF-8."""
    bad = _ESCAPED_BYTE.search(text)
    if bad is None:
        return Record(where, text)
    byte = ord(bad.group()) - 0xDC00
    return Record(where, None, "bad_utf8", f"invalid UTF-8 in this {kind} (byte 0x{byte:02x})")


# A paragraph boundary: a newline followed by a blank line (with or without a carriage return).
_PARAGRAPH_BREAK = re.compile(rb"\n\r?\n")


def txt_blocks(path: str, block_bytes: int, txt_mode: str, chunk_bytes: int = 1 << 23) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of each block of a local .txt file read in parts.

    Blocks are about `block_bytes` long and end at a paragraph boundary (at a line boundary in line
    mode, and in file mode inside a paragraph longer than a block), so no document, line or UTF-8
    character is split. The file is scanned in `chunk_bytes` pieces: memory stays flat whatever its size.
    """
    blocks: list[tuple[int, int, int]] = []
    block_start, block_first = 0, 1
    target = block_bytes
    consumed, newlines = 0, 0  # buf holds the file from `consumed`; `newlines` before it
    buf = b""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= block_bytes:
            return [(0, size, 1)]
        while True:
            chunk = fh.read(chunk_bytes)
            buf += chunk
            while target < size:
                at = max(0, target - consumed)
                found = None if txt_mode == "line" else _PARAGRAPH_BREAK.search(buf, at)
                long_paragraph = txt_mode == "file" and (consumed + len(buf) - target > block_bytes or not chunk)
                if found is None and (txt_mode == "line" or long_paragraph):
                    # line mode, or in file mode (cut into pieces at lines anyway) a paragraph longer
                    # than a block: end at the next line. A paragraph-mode block ends only between
                    # paragraphs, each being a document.
                    line_end = buf.find(b"\n", at)
                    cut = line_end + 1 if line_end >= 0 else None
                else:
                    cut = found.start() + 1 if found is not None else None
                if cut is None:
                    break
                boundary = consumed + cut
                first = newlines + buf[:cut].count(b"\n") + 1
                if boundary > block_start:
                    blocks.append((block_start, boundary, block_first))
                    block_start, block_first = boundary, first
                target = boundary + block_bytes
            if not chunk:
                break
            # Keep what a later search may still need (from the current target on); count the rest.
            keep_from = max(0, min(len(buf), target - consumed) - 2)
            newlines += buf[:keep_from].count(b"\n")
            consumed += keep_from
            buf = buf[keep_from:]
    if size > block_start:
        blocks.append((block_start, size, block_first))
    return blocks


def _pieces(text: str, piece_chars: int) -> Iterator[tuple[int, str]]:
    """(first line number, piece): whole paragraphs packed in order into pieces of at most `piece_chars`.

    A paragraph longer than that is cut between its lines; a single line longer than that becomes
    a piece of its own (the caller rejects it when it is over `read.max_chars`).
    """
    piece: list[str] = []
    size = 0  # len("\n".join(piece))
    first = 0
    for start, paragraph in _paragraphs(text):
        if piece and size + 2 + len(paragraph) <= piece_chars:  # a blank line between paragraphs
            piece += ["", paragraph]
            size += 2 + len(paragraph)
            continue
        if piece:
            yield first, "\n".join(piece)
        if len(paragraph) <= piece_chars:
            piece, size, first = [paragraph], len(paragraph), start
            continue
        piece, size = [], 0
        for offset, line in enumerate(paragraph.split("\n")):
            if piece and size + 1 + len(line) > piece_chars:
                yield first, "\n".join(piece)
                piece, size = [], 0
            if not piece:
                first = start + offset
                size -= 1  # no "\n" before a piece's first line
            piece.append(line)
            size += 1 + len(line)
    if piece:
        yield first, "\n".join(piece)


def _lines(text: str) -> list[str]:
    """Lines as an editor numbers them: split at "\n" (a "\r" before it dropped), nowhere else."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _paragraphs(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, paragraph) for each run of non-blank lines."""
    lines: list[str] = []
    first = 0
    for number, line in enumerate(_lines(text), start=1):
        if line.strip():
            if not lines:
                first = number
            lines.append(line)
        elif lines:
            yield first, "\n".join(lines)
            lines = []
    if lines:
        yield first, "\n".join(lines)


def _jsonl_records(item: str, lines, text_field: str, url_field: str | None = None) -> Iterator[Record]:
    records = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline) are not records
        records += 1
        where = f"{item}:{number}"
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            yield Record(where, None, "bad_utf8", "line is not valid UTF-8")
            continue
        except ValueError as err:
            yield Record(where, None, "bad_json", str(err))
            continue
        except RecursionError:
            yield Record(where, None, "bad_json", "nested too deeply to parse")
            continue
        if not isinstance(record, dict):
            yield Record(where, None, "not_object", f"expected a JSON object, got {type(record).__name__}")
            continue
        if text_field not in record or record[text_field] is None:  # null: as the Parquet reader says it
            detail = f"field {text_field!r} is null" if text_field in record else f"no field {text_field!r}"
            yield Record(where, None, "missing_field", detail)
            continue
        text = record[text_field]
        if not isinstance(text, str):
            yield Record(where, None, "not_text", f"field {text_field!r} is {type(text).__name__}, expected a string")
        elif not text.strip():
            yield Record(where, None, "empty", f"field {text_field!r} is empty" if not text else "only white space")
        elif not _is_utf8(text):
            yield Record(where, None, "bad_utf8", "text holds a lone surrogate")
        else:
            url = record.get(url_field) if url_field else None
            if isinstance(url, str) and not _is_utf8(url):
                yield Record(where, None, "bad_utf8", f"field {url_field!r} holds a lone surrogate")
                continue
            yield Record(where, text, url=url if isinstance(url, str) else "")
    if not records:  # as an empty .txt is: counted in rejected/, not passed over without a word
        yield Record(item, None, "empty", "no record (an empty file)")


def _is_utf8(text: str) -> bool:
    # JSON can escape lone surrogates ("\ud83d"), which no UTF-8 encoder accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Rows of a Parquet file decoded at a time (`_parquet_records`).
PARQUET_BATCH_ROWS = 1024

_NOT_UTF8 = object()  # a Parquet string value whose bytes are not UTF-8 (writers do not all check)


def _strings(column) -> list:
    """The column's values; when some are not UTF-8, those become `_NOT_UTF8` and the rest still read."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    # Bytes without a UTF-8 annotation (older Hive and Impala writers) are decoded here, row by row.
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        try:
            return column.to_pylist()
        except UnicodeDecodeError:
            pass
    values = []
    for raw in column.cast(pa.large_binary()).to_pylist():
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(_NOT_UTF8)
    return values


def _parquet_records(item: str, text_field: str, url_field: str | None = None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(item) as fh:
        parquet = pq.ParquetFile(fh)
        names = parquet.schema_arrow.names
        if text_field not in names:
            yield Record(item, None, "missing_column", f"no column {text_field!r} (columns: {', '.join(names)})")
            return
        column_type = parquet.schema_arrow.field(text_field).type
        if pa.types.is_dictionary(column_type):  # a pandas category column: its values are what count
            column_type = column_type.value_type
        if not any(check(column_type) for check in (pa.types.is_string, pa.types.is_large_string,
                                                    pa.types.is_string_view, pa.types.is_binary,
                                                    pa.types.is_large_binary)):
            yield Record(item, None, "missing_column", f"column {text_field!r} is {column_type}, expected string")
            return
        row = 0
        with_url = url_field is not None and url_field in names and url_field != text_field
        # A bounded batch: pyarrow's default (65,536 rows, or a whole smaller row group) made every
        # document of a docs/ file Python strings at once, in the driver when the tokenizer trains.
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                          columns=[text_field, url_field] if with_url else [text_field]):
            urls = _strings(batch.column(1)) if with_url else [None] * batch.num_rows
            for text, url in zip(_strings(batch.column(0)), urls):
                where = f"{item}:{row}"
                row += 1
                if text is _NOT_UTF8:
                    yield Record(where, None, "bad_utf8", f"column {text_field!r} is not valid UTF-8")
                elif text is None:
                    yield Record(where, None, "missing_field", f"column {text_field!r} is null")
                elif not text.strip():
                    yield Record(where, None, "empty", f"column {text_field!r} is empty" if not text else
                                 "only white space")
                else:
                    yield Record(where, text, url=url if isinstance(url, str) else "")
        if not row:
            yield Record(item, None, "empty", "no row (an empty file)")
