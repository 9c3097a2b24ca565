"""`mtnlg-ray data prepare`: one Ray Data pipeline from raw INPUTs to a dataset directory.

read → URL filter → language → PII → clean → line dedup → exact / fuzzy dedup → pseudo-label →
decontaminate → (sort) → docs/ → tokenizer → blend → tokenize + pack → tokens/ (the optional
stages when configured). Every record that leaves the corpus lands in `rejected/` with its
stage and reason; `manifest.json` records counts in and out and the time of every stage.
Bad records never stop the run; only a missing input, a bad config or an unwritable output do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtnlg_ray.config import Config
from mtnlg_ray.data.read import (REJECTED_COLUMNS, document_id, iter_records, iter_texts, rejected_schema,
                                  resolve_sources)
from mtnlg_ray.data.staging import failed_run_home, publish, staged_output
from mtnlg_ray.errors import InputError, first_few
from mtnlg_ray.publish import publish_file

FORMAT = "mtnlg-ray/dataset/v1"
_SEQ_BITS = 32  # seq = file index << 32 | record index: the corpus order, kept through every stage
_COPY_BITS = 52  # blended copies sort after the originals: copy << 52 | seq


# ---------------------------------------------------------------- batch functions (run in Ray tasks)


def read_batch(
    batch: pa.Table, text_field: str, txt_mode: str, max_chars: int, piece_chars: int | None = None,
    url_field: str | None = None,
) -> pa.Table:
    """Each input row names one file; the output holds one row per record of those files (and its
    `url` when `url_field` is set)."""
    rows: dict[str, list] = {k: [] for k in ("id", "text", "source", "location", "seq", "reason", "detail", "url")}
    ranges = batch.column("byte_range").to_pylist() if "byte_range" in batch.column_names else [None] * batch.num_rows
    for item, source, file_index, byte_range in zip(
        batch.column("item").to_pylist(), batch.column("source").to_pylist(), batch.column("file_index").to_pylist(),
        ranges,
    ):
        byte_range = tuple(byte_range) if byte_range else None
        records = iter_records(item, text_field, txt_mode, max_chars, piece_chars, url_field, byte_range)
        for number, record in enumerate(records):
            rows["id"].append(document_id(record.location))
            rows["text"].append(record.text)
            rows["source"].append(source)
            rows["location"].append(record.location)
            rows["seq"].append((file_index << _SEQ_BITS) | number)
            rows["reason"].append(record.reason)
            rows["detail"].append(record.detail)
            rows["url"].append(record.url)
    urls = {"url": pa.array(rows["url"], pa.string())} if url_field else {}
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "text": pa.array(rows["text"], pa.string()),
            "source": pa.array(rows["source"], pa.string()),
            "location": pa.array(rows["location"], pa.string()),
            "seq": pa.array(rows["seq"], pa.int64()),
            "reason": pa.array(rows["reason"], pa.string()),
            "detail": pa.array(rows["detail"], pa.string()),
            **urls,
        }
    )


def _good_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("reason"), "")).drop_columns(["reason", "detail"])


def _bad_rows(batch: pa.Table, stage: str) -> pa.Table:
    bad = batch.filter(pc.not_equal(batch.column("reason"), ""))
    return pa.table(
        {
            "id": bad.column("id"),
            "source": bad.column("source"),
            "location": bad.column("location"),
            "stage": pa.array([stage] * bad.num_rows, pa.string()),
            "reason": bad.column("reason"),
            "detail": bad.column("detail"),
        }
    )


def blend_batch(batch: pa.Table, weights: dict[str, float], seed: int) -> pa.Table:
    """Repeat each document floor(w) times, plus once more with probability frac(w) (seeded by id)."""
    keep: list[int] = []
    order: list[int] = []
    for row, (doc_id, source, seq) in enumerate(
        zip(batch.column("id").to_pylist(), batch.column("source").to_pylist(), batch.column("seq").to_pylist())
    ):
        weight = weights.get(source, 1.0)
        copies = int(weight)
        if weight - copies > 0:
            draw = np.random.default_rng([seed, int(doc_id, 16)]).random()
            copies += int(draw < weight - copies)
        for copy in range(copies):
            keep.append(row)
            order.append((copy << _COPY_BITS) | seq)
    out = batch.take(pa.array(keep, pa.int64()))
    return out.set_column(out.schema.get_field_index("seq"), "seq", pa.array(order, pa.int64()))


# ---------------------------------------------------------------- the stage runner


@dataclass
class StageReport:
    name: str
    docs_in: int
    docs_out: int
    rejected: int
    seconds: float
    note: str = ""


class NothingLeft(Exception):
    """Raised by a stage that left no document; the pipeline stops, keeping what was rejected."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


@dataclass
class PipelineRun:
    """Counts and timings as the stages run; becomes manifest.json."""

    stages: list[StageReport] = field(default_factory=list)
    rejected_parts: list = field(default_factory=list)
    split_files: int = 0  # .txt files over read.max_chars, cut into several documents
    pii_redacted: dict[str, int] = field(default_factory=dict)  # replacements by kind (pii.redact)
    repeated_lines: int | None = None  # distinct lines removed as boilerplate (dedup.lines)
    decontaminated: int | None = None  # documents kept with evaluation text cut out (decontam.eval_files)
    on_stage: Callable[[StageReport], None] | None = None
    passed_over: list[str] = field(default_factory=list)  # what folders and globs left out (`resolve_sources`)

    def record(self, report: StageReport) -> None:
        self.stages.append(report)
        if self.on_stage is not None:
            self.on_stage(report)


def _split(ds, stage: str):
    """Materialise a stage's output and part it into (kept documents, rejected rows)."""
    ds = ds.materialize()
    kept = ds.map_batches(_good_rows, batch_format="pyarrow").materialize()
    rejected = ds.map_batches(_bad_rows, fn_kwargs={"stage": stage}, batch_format="pyarrow").materialize()
    return kept, rejected


def _run_stage(run: PipelineRun, name: str, docs, stage_fn, note: str | Callable[[], str] = ""):
    """Run `stage_fn(docs) -> (kept, rejected)`, time it and record the counts (and `note`, or what it
    returns once the stage has run)."""
    start = time.perf_counter()
    docs_in = docs.count()
    kept, rejected = stage_fn(docs)
    kept = kept.materialize()
    rejected = rejected.materialize()
    n_rejected = rejected.count()
    run.rejected_parts.append(rejected)
    note = note() if callable(note) else note
    run.record(StageReport(name, docs_in, kept.count(), n_rejected, time.perf_counter() - start, note))
    if not kept.count():
        raise NothingLeft(name)
    return kept


# ---------------------------------------------------------------- output directory


def _check_models(config: Config) -> None:
    """The labeller's model and a given tokenizer load, checked before anything is cleared or run: they
    are used only late in the pipeline, after hours of curation on a real corpus."""
    from mtnlg_ray.data.label import LABELERS

    if config.label.labeler in LABELERS and config.label.model is not None:
        LABELERS[config.label.labeler].check(config.label.model)
    if config.tokenizer.path:
        from mtnlg_ray.tokenizer import load_tokenizer

        load_tokenizer(_given_tokenizer(config))


def _given_tokenizer(config: Config) -> Path:
    """`tokenizer.path` as a file: a folder's tokenizer.json."""
    source = Path(config.tokenizer.path)
    return source / "tokenizer.json" if source.is_dir() else source


def _staged(output: Path, run_fn: Callable[[Path], dict]) -> dict:
    """Start the pipeline; `run_fn(staging)` writes a run into the staging folder, which on success
    replaces `output`'s dataset (data/staging.py). A run left with no document goes where
    `RunLeftEmpty` says; one that stops any other way (an error, Ctrl-C) leaves the dataset as it was."""
    with staged_output(output) as staging:  # an unusable output is one line before Ray starts
        _start_pipeline()
        try:
            manifest = run_fn(staging)
        except RunLeftEmpty as failed:
            publish(staging, output, failed.home)
            raise failed.error from None
        publish(staging, output)
    return manifest


class RunLeftEmpty(Exception):
    """A run with no document left: its rejected/ and manifest.json are staged for `home`."""

    def __init__(self, error: InputError, home: Path) -> None:
        super().__init__(str(error))
        self.error, self.home = error, home


def _write_parquet(ds, folder: Path, columns: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if ds is not None and ds.count():
        ds.select_columns(list(columns)).write_parquet(str(folder))


def _count_by(ds, column: str) -> dict[str, int]:
    """Rows per value of one short column (source, reason); only that column reaches the driver."""
    counts: dict[str, int] = {}
    if ds is None:
        return counts
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=4096):
        for item in pc.value_counts(batch.column(column)).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def _count_empty(ds, column: str) -> int:
    """Rows whose string `column` is empty (not `_count_by`: a URL column has a value a row)."""
    total = 0
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=4096):
        total += pc.sum(pc.equal(batch.column(column), "")).as_py() or 0
    return total


def _read_stage(run: PipelineRun, items: list[tuple[str, list[str]]], config: Config):
    """One read task per file; records that cannot be used go to the rejected rows."""
    import ray.data

    start = time.perf_counter()
    # One read task per file, or per block of a large local .txt; `file_index` orders them (seq).
    parts = []
    for spec, found in items:
        for item in found:
            for byte_range in _blocks(item, config):
                parts.append({"item": item, "source": spec, "byte_range": byte_range})
    files = [{**part, "file_index": index} for index, part in enumerate(parts)]
    raw = ray.data.from_items(files, override_num_blocks=max(1, len(files))).map_batches(
        read_batch,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "text_field": config.data.text_field,
            "txt_mode": config.read.txt_mode,
            "max_chars": config.read.max_chars,
            "piece_chars": config.read.piece_chars,
            "url_field": config.read.url_field,
        },
    ).materialize()
    names = list(dict.fromkeys(f["item"] for f in files))
    blocked = len(files) - len(names)
    note = f"{len(names)} file{'s' * (len(names) != 1)}" + (
        f" ({len(files)} read tasks: large .txt files in blocks)" if blocked else "")
    txt_files = [item for item in names if item.lower().endswith(".txt")]
    if config.read.txt_mode == "file" and txt_files:
        run.split_files = _count_split_files(raw, txt_files)
        if run.split_files:
            piece = min(config.read.piece_chars, config.read.max_chars)
            note += f", {run.split_files} over {config.read.max_chars:,} characters cut into pieces of <= {piece:,}"
    if run.passed_over:
        note += f"; passed over {first_few(run.passed_over)}"
    docs, rejected = _split(raw, "read")
    run.rejected_parts.append(rejected)
    run.record(StageReport("read", len(names), docs.count(), rejected.count(), time.perf_counter() - start, note))
    if not docs.count():
        raise NothingLeft("read")
    return docs


def _redact(run: PipelineRun, docs):
    """The PII stage: redacted documents (nothing rejected); the replacements counted by kind."""
    from mtnlg_ray.data.pii import KINDS, redact_batch

    redacted = docs.map_batches(redact_batch, batch_format="pyarrow").materialize()
    columns = [f"pii_{kind}" for kind in KINDS]
    for kind, column in zip(KINDS, columns):
        run.pii_redacted[kind] = int(redacted.sum(column) or 0)
    return _split(redacted.drop_columns(columns), "pii")


def _remove_repeated_lines(run: PipelineRun, docs, config: Config):
    """The line dedup stage: lines in at least dedup.line_min_docs documents removed from all of them."""
    from mtnlg_ray.data.lines import remove_lines_batch, repeated_lines

    repeated = repeated_lines(docs, config.dedup.line_min_docs)
    run.repeated_lines = len(repeated)
    return _split(docs.map_batches(remove_lines_batch, batch_format="pyarrow",
                                   fn_kwargs={"repeated": repeated, "min_words": config.clean.min_words}), "line dedup")


def _blocks(item: str, config: Config) -> list[list[int] | None]:
    """The byte ranges a file is read in: several for a local .txt over read.block_bytes, else one
    (None: the whole file)."""
    if not item.lower().endswith(".txt") or "://" in item or item == "builtin:python-docs":
        return [None]
    try:
        if os.path.getsize(item) <= config.read.block_bytes:
            return [None]
    except OSError:
        return [None]  # the read task reports it
    from mtnlg_ray.data.read import txt_blocks

    return [list(block) for block in txt_blocks(item, config.read.block_bytes, config.read.txt_mode)]


def split_files_batch(batch: pa.Table, txt_files: list[str]) -> pa.Table:
    """The .txt files among `txt_files` whose records in `batch` are pieces ("file:line"), not the whole file."""
    whole = set(txt_files)
    pieces = {location.rpartition(":")[0] for location in batch.column("location").to_pylist() if location not in whole}
    return pa.table({"file": pa.array(sorted(pieces & whole), pa.string())})


def _count_split_files(raw, txt_files: list[str]) -> int:
    found = raw.select_columns(["location"]).map_batches(
        split_files_batch, fn_kwargs={"txt_files": txt_files}, batch_format="pyarrow"
    )
    return len({f for batch in found.iter_batches(batch_format="pyarrow") for f in batch.column("file").to_pylist()})


def _stop_on_empty(run: PipelineRun, staging: Path, output: Path, inputs: Sequence[str], stage: str,
                   started: float) -> RunLeftEmpty:
    """Stage rejected/ and manifest.json for a run that has no document left; the exception to raise."""
    home = failed_run_home(output)
    (staging / "docs").mkdir(parents=True, exist_ok=True)
    rejected_counts = _write_rejected(run, staging)
    total = sum(rejected_counts.values())
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(rejected_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    message = (f"no document survived {stage}: {total:,} rejected ({reasons or 'none'}); "
               f"see {home / 'rejected'}")
    if home != output:
        message += f" (the dataset already in {output} is kept)"
    _write_manifest(staging, {
        **_manifest_head(inputs, run, rejected_counts, documents=0),
        "error": message,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return RunLeftEmpty(InputError(message), home)


def _write_rejected(run: PipelineRun, output: Path) -> dict[str, int]:
    """Every stage's rejected rows into rejected/; returns the counts by reason."""
    rejected_all = _union(run.rejected_parts)
    _write_parquet(rejected_all, output / "rejected", REJECTED_COLUMNS)
    if not any((output / "rejected").iterdir()):
        # No row: one empty file with the columns, so pandas or Arrow reads the folder as a table
        # (`df[df.reason == ...]` raised KeyError on a folder with no file).
        import pyarrow.parquet as pq

        pq.write_table(rejected_schema().empty_table(), output / "rejected" / "none.parquet")
    return dict(sorted(_count_by(rejected_all, "reason").items()))


def _manifest_head(inputs: Sequence[str], run: PipelineRun, rejected: dict[str, int], documents: int) -> dict:
    """The fields every manifest.json starts with: what was read, what each stage did, what is left."""
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": list(inputs),
        "stages": [
            {"name": s.name, "in": s.docs_in, "out": s.docs_out, "rejected": s.rejected,
             "seconds": round(s.seconds, 3), "note": s.note}
            for s in run.stages
        ],
        "split_files": run.split_files,
        # A crawl folder of HTML files would list every one: the first 20, then a count
        **({"passed_over": run.passed_over[:20] + ([f"and {len(run.passed_over) - 20} more"]
                                                   if len(run.passed_over) > 20 else [])} if run.passed_over else {}),
        **({"pii_redacted": run.pii_redacted} if run.pii_redacted else {}),
        **({"repeated_lines_removed": run.repeated_lines} if run.repeated_lines is not None else {}),
        **({"decontaminated_docs": run.decontaminated} if run.decontaminated is not None else {}),
        "rejected": rejected,
        "documents": documents,
    }


def _write_manifest(output: Path, manifest: dict) -> None:
    publish_file(output / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def _start_pipeline() -> None:
    """Connect to Ray for a corpus pipeline: rows keep their order, and Ray Data's console says only
    warnings and errors (its per-operator INFO lines would bury the stage lines; the full log stays
    in the Ray session's ray-data.log)."""
    import ray.data

    from mtnlg_ray.runtime import ensure_ray, quiet_ray_data_console

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    quiet_ray_data_console()


# ---------------------------------------------------------------- the pipeline


def prepare_dataset(
    inputs: Sequence[str],
    output: str | Path,
    config: Config,
    on_stage: Callable[[StageReport], None] | None = None,
) -> dict:
    """Run the whole corpus pipeline on the connected (or a new local) Ray; returns the manifest.

    A run that loses every document at some stage still writes rejected/ and manifest.json, then
    raises `InputError` naming that stage and the rejected counts by reason. An earlier dataset in
    `output` is replaced only when the run completes; a run left empty beside one writes into
    `output/failed-run`.
    """
    started = time.perf_counter()
    output = Path(output)
    passed_over: list[str] = []
    items = resolve_sources(inputs, output, passed_over)  # bad inputs fail here, before any work
    grams = _evaluation_grams(config.decontam)  # read up front: a bad evaluation file is one line, before any work
    unknown = sorted(set(config.read.weights) - set(inputs))
    if unknown:
        raise InputError(f"read.weights: '{unknown[0]}' is not one of the INPUTs ({', '.join(inputs)})")
    for spec, found in items:
        if not found and spec in config.read.weights:
            raise InputError(f"read.weights: every file of '{spec}' is read for an earlier INPUT, so its weight "
                             "would weigh nothing; list it first or weigh the INPUT that names its files")
    if config.label.labeler is not None and config.label.model is None:
        raise InputError("label.model: the labeller needs a model path (set label.model)")
    _check_curation(config)
    _check_models(config)  # before any work
    return _staged(output, lambda staging: _prepare_into(staging, output, items, grams, inputs, config, on_stage,
                                                         started, passed_over))


def _prepare_into(staging: Path, output: Path, items, grams, inputs: Sequence[str], config: Config,
                  on_stage: Callable[[StageReport], None] | None, started: float, passed_over: list[str]) -> dict:
    """`prepare_dataset`'s work, every file written under `staging`."""
    run = PipelineRun(on_stage=on_stage, passed_over=passed_over)
    try:
        docs, read_counts = _curate(run, items, config, grams)
    except NothingLeft as empty:
        raise _stop_on_empty(run, staging, output, inputs, empty.stage, started) from None

    # Dedup shuffles rows; the corpus order comes back from `seq`.
    start = time.perf_counter()
    if config.dedup.exact or config.dedup.fuzzy:
        docs = docs.sort("seq").materialize()
    doc_columns = [c for c in docs.columns() if c not in ("seq",)]
    _write_parquet(docs, staging / "docs", doc_columns)
    kept_counts = _count_by(docs, "source")
    run.record(StageReport("write docs", docs.count(), docs.count(), 0, time.perf_counter() - start))

    tokenizer_file = _tokenizer_for(docs, staging, config, run)

    start = time.perf_counter()
    packed = _pack(docs, staging, tokenizer_file, config)
    run.record(StageReport("tokenize + pack", docs.count(), packed["documents"], 0, time.perf_counter() - start,
                           f"{packed['train_sequences']} train / {packed['val_sequences']} val sequences"))

    rejected_counts = _write_rejected(run, staging)

    from mtnlg_ray.tokenizer import load_tokenizer, tokenizer_hash

    manifest = {
        **_manifest_head(inputs, run, rejected_counts, documents=docs.count()),
        "sources": {
            spec: {
                "files": len(found),
                "weight": config.read.weights.get(spec, 1.0),
                "documents_read": read_counts.get(spec, 0),
                "documents_kept": kept_counts.get(spec, 0),
            }
            for spec, found in items
        },
        "tokenizer": {
            "path": "tokenizer/tokenizer.json",
            "hash": tokenizer_hash(tokenizer_file),
            "vocab_size": load_tokenizer(tokenizer_file).get_vocab_size(),
        },
        "seq_len": config.pack.seq_len,
        "pack": packed,
        # The settings of every stage that ran; the field read and the tokenizer asked for too (a rerun of
        # this manifest's settings needs them).
        "config": config.model_dump(mode="json", include={
            "data": {"text_field"}, "read": True, "filter": True, "lang": True, "pii": True, "clean": True,
            "dedup": True, "label": True, "decontam": True, "tokenizer": True, "pack": True}),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_manifest(staging, manifest)
    return manifest


def _check_curation(config: Config) -> None:
    """The curation settings a stage would trip on, refused before any work: one line each."""
    if config.filter.url_blocklist:
        from mtnlg_ray.data.urls import read_blocklist

        if not config.read.url_field:
            raise InputError("filter.url_blocklist: set read.url_field to the field that holds each document's URL")
        read_blocklist(config.filter.url_blocklist)
    if config.lang.keep is not None:
        from mtnlg_ray.data.language import known_languages

        known = known_languages()
        unknown = [code for code in config.lang.keep if code not in known]
        if unknown or not config.lang.keep:
            raise InputError(f"lang.keep: expected ISO 639-1 codes the identifier knows (such as en, fr, de), "
                             f"got {unknown[0]!r}" if unknown else "lang.keep: expected at least one language code")


def _evaluation_grams(cfg):
    """The n-grams of `decontam.eval_files`, or None without any; refuses files that give no text to match."""
    from mtnlg_ray.data.decontam import eval_ngrams

    if not cfg.eval_files:
        return None
    skipped: Counter[str] = Counter()
    # A .txt evaluation set is one item a line by default (decontam.txt_mode): read whole, a file of short
    # questions was one long item, and none of them matched as the whole it is.
    read_log = logging.getLogger("mtnlg_ray.data.read")
    level = read_log.level
    read_log.setLevel(logging.ERROR)  # its per-file "skipped" lines came before the one-line refusal below
    try:
        grams = eval_ngrams(iter_texts(cfg.eval_files, cfg.text_field, skipped, txt_mode=cfg.txt_mode), cfg.ngram,
                            cfg.min_words)
    except InputError as error:  # a missing evaluation file read like a missing corpus input
        raise InputError(f"decontam.eval_files: {error}") from None
    finally:
        read_log.setLevel(level)
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(skipped.items()))
    if grams and reasons:
        read_log.warning("decontam.eval_files: skipped records (%s)", reasons)
    if not grams:  # e.g. no record has decontam.text_field: decontamination would silently do nothing
        reasons = reasons or "no text"
        raise InputError(f"decontam.eval_files: no evaluation text to match ({reasons}); check "
                         f"decontam.text_field ('{cfg.text_field}') and decontam.min_words ({cfg.min_words})")
    return grams


def _curate(run: PipelineRun, items: list[tuple[str, list[str]]], config: Config, grams=None):
    """read → clean → dedup → label → decontaminate; the kept documents and the documents read per source.

    Raises `NothingLeft` from the first stage that leaves no document.
    """
    import ray

    if config.label.labeler is not None:
        from mtnlg_ray.data.label import check_pool_fits

        check_pool_fits(config.label)  # before the read: the label stage comes after every curation stage
    docs = _read_stage(run, items, config)
    read_counts = _count_by(docs, "source")

    # Cheap filters first, as NeMo Curator, DataTrove and Dolma order them: URL, language, PII, then cleaning.
    if config.filter.url_blocklist:
        from mtnlg_ray.data.urls import read_blocklist, url_batch

        domains = read_blocklist(config.filter.url_blocklist)
        no_url = _count_empty(docs, "url")
        if no_url == docs.count():  # a misspelt read.url_field: the filter would check nothing, silently
            raise InputError(f"read.url_field: no document has a {config.read.url_field!r} field (or column) "
                             "holding its URL; filter.url_blocklist would check nothing")
        docs = _run_stage(run, "url filter", docs, lambda d: _split(
            d.map_batches(url_batch, fn_kwargs={"domains": domains}, batch_format="pyarrow"), "url filter"),
            note=f"{len(domains)} blocked domain{'s' * (len(domains) != 1)}" + (
                f"; {no_url} document{'s' * (no_url != 1)} without a URL passed unchecked" if no_url else ""))

    if config.lang.keep is not None:
        from mtnlg_ray.data.language import language_batch

        docs = _run_stage(run, "language", docs, lambda d: _split(d.map_batches(
            language_batch, fn_kwargs={"keep": config.lang.keep, "min_confidence": config.lang.min_confidence},
            batch_format="pyarrow"), "language"), note=f"keep {', '.join(config.lang.keep)}")

    if config.pii.redact:
        docs = _run_stage(run, "pii", docs, lambda d: _redact(run, d))

    if config.clean.enabled:
        from mtnlg_ray.data.clean import clean_batch

        docs = _run_stage(run, "clean", docs, lambda d: _split(
            d.map_batches(clean_batch, fn_kwargs={"cfg": config.clean}, batch_format="pyarrow"), "clean"))

    if config.dedup.lines:
        docs = _run_stage(run, "line dedup", docs, lambda d: _remove_repeated_lines(run, d, config))

    if config.dedup.exact or config.dedup.fuzzy:
        from mtnlg_ray.data.dedup import dedup_documents

        docs = _run_stage(run, "dedup", docs, lambda d: dedup_documents(d, config.dedup, order_column="seq"))

    if config.label.labeler is not None:
        from mtnlg_ray.data.label import filter_labelled, label_documents, stage_name

        docs = _run_stage(run, stage_name(config.label), docs, lambda d: filter_labelled(
            label_documents(d, config.label), config.label))

    if grams is not None:
        docs = _run_stage(run, "decontaminate", docs, lambda d: _decontaminate(run, d, ray.put(grams), config),
                          note=lambda: f"{len(grams)} evaluation n-grams; {run.decontaminated} kept with text cut out")
    return docs, read_counts


def _decontaminate(run: PipelineRun, docs, grams_ref, config: Config):
    """The decontamination stage; the documents kept with a span cut out are counted (their texts changed
    but the stage's in and out counts do not show it)."""
    from ray.data.expressions import col

    checked = docs.map_batches(_decontaminate_with_ref, fn_kwargs={"grams_ref": [grams_ref], "cfg": config.decontam},
                               batch_format="pyarrow").materialize()
    run.decontaminated = checked.filter(expr=(col("reason") == "") & (col("detail") != "")).count()
    return _split(checked, "decontaminate")


def _decontaminate_with_ref(batch: pa.Table, grams_ref: list, cfg) -> pa.Table:
    import ray

    from mtnlg_ray.data.decontam import decontaminate_batch

    # The ref travels inside a list so Ray passes the reference, not a copy per task argument.
    return decontaminate_batch(batch, ray.get(grams_ref[0]), cfg)


def _union(parts: list):
    parts = [p for p in parts if p.count()]
    if not parts:
        return None
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _tokenizer_for(docs, output: Path, config: Config, run: PipelineRun) -> Path:
    """The configured tokenizer copied into the dataset, or one trained on the kept documents."""
    from mtnlg_ray.tokenizer import load_tokenizer, train_tokenizer

    start = time.perf_counter()
    target = output / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    if config.tokenizer.path:
        source = _given_tokenizer(config)
        load_tokenizer(source)  # one clear line if it is missing or broken
        shutil.copyfile(source, target / "tokenizer.json")
        note = f"copied from {source}"
    else:
        if not docs.count():
            raise InputError("no documents survived the pipeline, so there is no text to train a tokenizer on")
        train_tokenizer([str(output / "docs")], config.tokenizer.vocab_size, target, show_progress=False)
        # The vocabulary it got: a small corpus has fewer distinct pieces than asked for (said on stderr).
        note = f"trained, vocab {load_tokenizer(target / 'tokenizer.json').get_vocab_size()}"
    run.record(StageReport("tokenizer", docs.count(), docs.count(), 0, time.perf_counter() - start, note))
    return target / "tokenizer.json"


def _pack(docs, output: Path, tokenizer_file: Path, config: Config) -> dict:
    from mtnlg_ray.data.pack import SequenceWriter, tokenize_batch
    from mtnlg_ray.tokenizer import eos_id, load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    blended = docs
    if any(w != 1.0 for w in config.read.weights.values()):
        blended = docs.map_batches(
            blend_batch, fn_kwargs={"weights": config.read.weights, "seed": config.pack.seed}, batch_format="pyarrow"
        ).sort("seq")
    # The writer reads the ids (and a blend's seq): the text stays in the tasks, not shipped to the driver.
    tokenized = blended.select_columns(["text", "seq"] if blended is not docs else ["text"]).map_batches(
        tokenize_batch, fn_kwargs={"tokenizer_path": str(tokenizer_file)}, batch_format="pyarrow"
    ).drop_columns(["text"])
    writer = SequenceWriter(output / "tokens", config.pack, eos_id(tok), tok.get_vocab_size())
    for batch in tokenized.iter_batches(batch_format="pyarrow", batch_size=1024):
        column = batch.column("tokens").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        origins = repeats = None
        if "seq" in batch.column_names:  # blended: copy << _COPY_BITS | the original's seq
            seq = batch.column("seq").to_numpy()
            origins, repeats = seq & ((1 << _COPY_BITS) - 1), (seq >> _COPY_BITS) > 0
        writer.add_documents([values[offsets[i] : offsets[i + 1]] for i in range(len(column))], origins, repeats)
    return writer.close().to_json()


# ---------------------------------------------------------------- `mtnlg-ray data label`


def label_corpus(inputs: Sequence[str], output: str | Path, config: Config,
                 on_stage: Callable[[StageReport], None] | None = None) -> dict:
    """Read INPUTs and run only the pseudo-labelling stage; write docs/ (with label columns) and rejected/.

    Like `prepare_dataset`, a run left with no document writes rejected/ and manifest.json, then raises,
    and an earlier dataset in `output` is replaced only by a run that completes.
    """
    from mtnlg_ray.data.label import check_pool_fits, filter_labelled, label_documents, stage_name

    if config.label.labeler is None or config.label.model is None:
        raise InputError("label: both --labeler and --model are needed")
    started = time.perf_counter()
    output = Path(output)
    passed_over: list[str] = []
    items = resolve_sources(inputs, output, passed_over)
    _check_models(config)  # a wrong model is one line before Ray starts (the pool checks again)

    def label_into(staging: Path) -> dict:
        run = PipelineRun(on_stage=on_stage, passed_over=passed_over)
        check_pool_fits(config.label)  # before the read
        try:
            docs = _read_stage(run, items, config)
            docs = _run_stage(run, stage_name(config.label), docs,
                              lambda d: filter_labelled(label_documents(d, config.label), config.label))
        except NothingLeft as empty:
            raise _stop_on_empty(run, staging, output, inputs, empty.stage, started) from None
        _write_parquet(docs, staging / "docs", [c for c in docs.columns() if c != "seq"])
        manifest = {
            **_manifest_head(inputs, run, _write_rejected(run, staging), documents=docs.count()),
            "labeler": config.label.labeler,
            "model": config.label.model,
            "seconds": round(time.perf_counter() - started, 3),
        }
        _write_manifest(staging, manifest)
        return manifest

    return _staged(output, label_into)
