"""Pseudo-label documents through a Ray Data actor pool, then keep, drop or relabel them by those labels.

Three labellers share one interface: a callable class whose `__init__` loads its model once per
actor and whose `__call__` takes a pyarrow batch of documents and returns it with label columns
added. The quality labeller lives in `quality.py`, which imports no torch, so its actors start
without it. `label_documents` runs one over a dataset; `filter_labelled` turns labels into kept and
rejected documents. Sits between dedup and packing in the data pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
import torch.nn.functional as F

from mtnlg_ray.checkpoint import (
    CONFIG,
    check_checkpoint,
    classification_task,
    load_checkpoint,
    load_classifier,
    task_kind,
    tokenizer_path,
)
from mtnlg_ray.config import LabelSection
from mtnlg_ray.data.columns import column as _column, texts as _texts, with_column as _with_column
from mtnlg_ray.data.quality import QualityLabeler
from mtnlg_ray.data.read import rejected_schema
from mtnlg_ray.errors import CheckpointError, ConfigError
from mtnlg_ray.finetune.ngram import NgramClassifier, is_ngram_classifier
from mtnlg_ray.model.classifier import classification_input, pad_right
from mtnlg_ray.model.gpt import GPTConfig
from mtnlg_ray.publish import publish_file
from mtnlg_ray.runtime import default_device
from mtnlg_ray.tokenizer import eos_id, load_tokenizer

STAGE = "label"
REJECTED_SCHEMA = rejected_schema()
# Tokens per forward pass: windows of similar length are batched up to this many (padded) tokens.
MAX_BATCH_TOKENS = 8192


def _set_threads(threads: int | None) -> None:
    """CPU threads for this actor's forward passes (label.threads); Ray gives a 1-CPU actor one."""
    if threads is not None:
        torch.set_num_threads(threads)


def _checkpoint_tokenizer(checkpoint: str | Path, vocab_size: int):
    """The checkpoint's tokenizer, refused in one line when it does not load or has more tokens than
    the model has embeddings (its ids would index past them)."""
    tokenizer = load_tokenizer(tokenizer_path(checkpoint))
    if tokenizer.get_vocab_size() > vocab_size:
        raise CheckpointError(f"{checkpoint}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                              f"{vocab_size} embeddings")
    return tokenizer


def _check_tokenizer(checkpoint: str | Path, body: dict) -> None:
    """`_checkpoint_tokenizer` against the model that config.json `body` describes, without its weights:
    an actor that failed it would die behind Ray's traceback instead."""
    _checkpoint_tokenizer(checkpoint, GPTConfig.from_dict(body["model"]).vocab_size)


def _length_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, each group's padded size (rows × longest) within `max_tokens`."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def perplexity_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """How to score a sequence of `n_tokens` with a model of `context` positions.

    Each window (start, end, first) feeds tokens[start:end] and predicts tokens[start+1:end+1];
    only targets at positions >= `first` count, so every token from position 1 on is predicted
    exactly once. With `stride == context` the windows are disjoint (each restarts its context);
    a smaller stride overlaps them so later windows keep `context - stride` tokens of history.
    """
    windows, scored, start = [], 0, 0
    while scored < n_tokens - 1:
        end = min(start + context, n_tokens - 1)
        windows.append((start, end, scored + 1))
        scored, start = end, start + stride
    return windows


class PerplexityLabeler:
    """Adds `ppl` (float64): a teacher LM's exp(mean next-token NLL) over each document.

    A document is scored as `[EOS] + tokens`, as it appears after a document boundary in packed
    training data, so its first token is predicted too and even a one-token document has one
    prediction. An empty document has none and gets a null `ppl`. Longer documents are scored in
    windows of the model's context (see `perplexity_windows`); windows are batched by length,
    right-padded, with the padding left out of the loss.
    """

    columns = ("ppl",)
    batch_size = 64  # documents per call; forward passes are batched by tokens inside

    def __init__(
        self,
        checkpoint: str | Path,
        text_field: str = "text",
        stride: int | None = None,
        device: str | None = None,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        threads: int | None = None,
    ) -> None:
        _set_threads(threads)
        self.device = default_device(device)
        self.model, _ = load_checkpoint(checkpoint, device=self.device)
        self.tokenizer = _checkpoint_tokenizer(checkpoint, self.model.config.vocab_size)
        self.eos = eos_id(self.tokenizer)
        self.context = self.model.config.seq_len
        self.stride = stride or self.context
        if not 1 <= self.stride <= self.context:
            raise ConfigError(f"stride: expected 1..{self.context} (the model's context), got {self.stride}")
        self.max_batch_tokens = max_batch_tokens
        self.text_field = text_field

    @staticmethod
    def check(checkpoint: str | Path) -> None:
        body = check_checkpoint(checkpoint)
        if task_kind(body) == "classification":
            # Its body scores text too, but as a fine-tune left it: the perplexities of a near-uniform
            # teacher were taken as a language model's, without a word.
            raise CheckpointError(f"{checkpoint}: a classifier's checkpoint; the perplexity labeller scores text "
                                  "with a language model (a pretraining run's final/)")
        _check_tokenizer(checkpoint, body)

    @torch.inference_mode()
    def perplexities(self, texts: list[str]) -> list[float | None]:
        sequences = [[self.eos, *enc.ids] for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        # One row per window: (document, input tokens, targets with unscored ones as -100).
        docs, inputs, targets = [], [], []
        for doc, seq in enumerate(sequences):
            for start, end, first in perplexity_windows(len(seq), self.context, self.stride):
                skip = first - start - 1
                docs.append(doc)
                inputs.append(seq[start:end])
                targets.append([-100] * skip + seq[start + 1 + skip : end + 1])
        nll = np.zeros(len(texts))
        count = np.zeros(len(texts), dtype=np.int64)
        for group in _length_batches([len(x) for x in inputs], self.max_batch_tokens):
            idx = pad_right([inputs[i] for i in group], 0).to(self.device)
            tgt = pad_right([targets[i] for i in group], -100).to(self.device)
            logits = self.model(idx).float()
            loss = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
            row_nll = loss.sum(dim=1).double().cpu().numpy()
            row_count = (tgt != -100).sum(dim=1).cpu().numpy()
            np.add.at(nll, [docs[i] for i in group], row_nll)
            np.add.at(count, [docs[i] for i in group], row_count)
        return [math.exp(s / c) if c else None for s, c in zip(nll, count)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        ppl = self.perplexities(_texts(batch, self.text_field))
        return _with_column(batch, "ppl", pa.array(ppl, pa.float64()))


class ClassifierLabeler:
    """Adds `label` (string) and `confidence` (float64, the softmax maximum) from a fine-tuned classifier.

    Text is encoded as fine-tuning encodes it (`classification_input`: the first seq_len - 1
    tokens, then EOS). `filter_labelled` turns predictions under `label.threshold` into nulls.
    An n-gram classifier folder (`mtnlg_ray/finetune/ngram.py`, self-training's bag-of-words
    teacher) is labelled with the same columns, and so is a mixture folder (`mix.json`, written by
    `write_classifier_mix`): the mean of its member classifiers' probabilities.
    """

    columns = ("label", "confidence")
    batch_size = 64  # documents per call; forward passes are batched by tokens inside

    def __init__(
        self,
        checkpoint: str | Path,
        text_field: str = "text",
        device: str | None = None,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        threads: int | None = None,
    ) -> None:
        self.text_field = text_field
        self.members: list[ClassifierLabeler] = []
        if is_classifier_mix(checkpoint):
            members, self.labels = read_classifier_mix(checkpoint)
            self.members = [ClassifierLabeler(m, text_field, device, max_batch_tokens, threads) for m in members]
            for member, path in zip(self.members, members):
                _check_member_labels(checkpoint, path, member.labels, self.labels)
            return
        self.ngram = NgramClassifier.load(checkpoint) if is_ngram_classifier(checkpoint) else None
        if self.ngram is not None:
            self.labels = self.ngram.labels
            return
        _set_threads(threads)
        self.device = default_device(device)
        self.model, self.labels = load_classifier(checkpoint, device=self.device)
        self.tokenizer = _checkpoint_tokenizer(checkpoint, self.model.backbone.config.vocab_size)
        self.eos = eos_id(self.tokenizer)
        self.max_batch_tokens = max_batch_tokens

    @staticmethod
    def check(checkpoint: str | Path) -> list[str]:
        """What the actors' `__init__` would refuse, found on the driver; returns the labels it classifies."""
        if is_classifier_mix(checkpoint):
            members, labels = read_classifier_mix(checkpoint)
            for member in members:
                _check_member_labels(checkpoint, member, ClassifierLabeler.check(member), labels)
            return labels
        if is_ngram_classifier(checkpoint):
            return NgramClassifier.load(checkpoint).labels
        body = check_checkpoint(checkpoint, classifier=True)
        _check_tokenizer(checkpoint, body)
        return classification_task(body, Path(checkpoint) / CONFIG)["labels"]

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> np.ndarray:
        """P(label) of each text, [texts, labels] in `self.labels`' order."""
        if self.members:
            return np.mean([member.probabilities(texts) for member in self.members], axis=0)
        if self.ngram is not None:
            return self.ngram.predict_proba(texts)
        seq_len = self.model.backbone.config.seq_len
        rows = [
            classification_input(enc.ids, self.eos, seq_len)
            for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ]
        probs = np.zeros((len(texts), len(self.labels)))
        for group in _length_batches([len(r) for r in rows], self.max_batch_tokens):
            idx = pad_right([rows[i] for i in group], 0).to(self.device)
            lengths = torch.tensor([len(rows[i]) for i in group], device=self.device)
            probs[group] = torch.softmax(self.model(idx, lengths).float(), dim=-1).double().cpu().numpy()
        return probs

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        probs = self.probabilities(texts)
        return [self.labels[i] for i in probs.argmax(axis=1)], probs.max(axis=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels, confidence = self.predict(_texts(batch, self.text_field))
        batch = _with_column(batch, "label", pa.array(labels, pa.string()))
        return _with_column(batch, "confidence", pa.array(confidence, pa.float64()))


MIX = "mix.json"
MIX_FORMAT = "mtnlg-ray/classifier-mix/v1"


def _check_member_labels(mix: str | Path, member: str | Path, found: list[str], labels: list[str]) -> None:
    # Probabilities are averaged column by column: a member with other labels (or another order) would
    # mix one class's probability into another's.
    if found != labels:
        raise CheckpointError(f"{mix}: member {member} classifies {found}, the mixture {labels}")


def is_classifier_mix(path: str | Path) -> bool:
    return (Path(path) / MIX).is_file()


def read_classifier_mix(path: str | Path) -> tuple[list[Path], list[str]]:
    """The member classifiers (absolute paths) and labels of a mixture folder."""
    meta_file = Path(path) / MIX
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != MIX_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {MIX_FORMAT!r}")
        members, labels = [Path(m) for m in meta["members"]], [str(x) for x in meta["labels"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_file}: not a classifier mixture ({err})") from None
    if not members:
        raise CheckpointError(f"{meta_file}: a classifier mixture needs at least one member")
    return members, labels


def write_classifier_mix(members: list[str | Path], labels: list[str], output: str | Path) -> Path:
    """A folder that classifies by the mean of `members`' probabilities; every labeller reads it."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    meta = {"format": MIX_FORMAT, "members": [str(Path(m).resolve()) for m in members], "labels": list(labels)}
    publish_file(output / MIX, json.dumps(meta, indent=2) + "\n")
    return output


LABELERS = {"quality": QualityLabeler, "perplexity": PerplexityLabeler, "classifier": ClassifierLabeler}


def _labeler(cfg: LabelSection) -> type:
    if cfg.labeler is None:
        raise ConfigError(f"label.labeler: expected one of {', '.join(LABELERS)}, got none")
    return LABELERS[cfg.labeler]


def label_documents(ds: ray.data.Dataset, cfg: LabelSection, text_field: str = "text") -> ray.data.Dataset:
    """`ds` with the label columns of `cfg.labeler` added to every row, computed by an actor pool.

    Each actor holds one CPU and loads the model once; each task gives it `cfg.batch_size`
    documents, or the labeller's own `batch_size` when that is None. Ray Data's actor pools
    restart an actor that dies (max_restarts=-1) and resubmit the batches it held
    (max_task_retries=-1) by default; setting them here would go through `map_batches`'
    deprecated **ray_remote_args. So a killed or preempted labeller costs time, never documents.
    Rows keep their order only under `DataContext.execution_options.preserve_order`.
    """
    labeler = _labeler(cfg)
    if cfg.model is None:
        raise ConfigError(f"label.model: expected the {cfg.labeler} model's path, got none")
    labeler.check(cfg.model)  # a missing or wrong model is one line here, not a dead actor pool
    low, high = cfg.actors
    check_pool_fits(cfg)
    return ds.map_batches(
        labeler,
        fn_constructor_args=(str(cfg.model),),
        fn_constructor_kwargs={"text_field": text_field,
                               **({"threads": cfg.threads} if cfg.threads and cfg.labeler != "quality" else {})},
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=1,
        num_gpus=cfg.num_gpus,
        batch_format="pyarrow",
        batch_size=cfg.batch_size or labeler.batch_size,
        udf_modifying_row_count=False,
    )


def check_pool_fits(cfg: LabelSection) -> None:
    """Ray Data waits without end, and without a word, for an actor pool the cluster cannot hold: one
    line instead, unless an autoscaler may add nodes (`label.autoscaling`, or a cluster the Ray cluster
    launcher started). The pipelines call it before reading, too: at the stage it came after the read
    and every curation stage."""
    from mtnlg_ray.runtime import launched_with_autoscaler, workers_that_fit

    actors, num_gpus, autoscaling = cfg.actors[0], cfg.num_gpus, cfg.autoscaling
    if autoscaling:
        return
    fit, cpus, gpus = workers_that_fit(1.0, num_gpus)
    if fit >= actors or launched_with_autoscaler():
        return
    shape = "1 CPU" + (f" and {num_gpus:g} GPU" if num_gpus else "")
    raise ConfigError(f"label.actors: at least {actors} labelling actors of {shape} each, but the Ray cluster "
                      f"has {cpus:g} CPUs and {gpus:g} GPUs ({fit} such actors fit); lower label.actors"
                      + (" or label.num_gpus" if num_gpus else "") + ", or set label.autoscaling=true if nodes "
                      "will be added")


def pareto_draws(ids: list[str], alpha: float, seed: int) -> np.ndarray:
    """One draw of numpy's `pareto(alpha)` (Lomax) per document, fixed by (seed, id) alone.

    The uniform comes from a keyed hash of the id, then the inverse CDF: (1 - u)^(-1/alpha) - 1.
    So a document's fate never depends on how the data was split into batches or blocks.
    """
    key = seed.to_bytes(16, "little", signed=True)
    digests = (hashlib.blake2b(i.encode("utf-8"), digest_size=8, key=key).digest() for i in ids)
    u = np.fromiter((int.from_bytes(d, "little") >> 11 for d in digests), dtype=np.float64, count=len(ids))
    u *= 2.0**-53  # 53 random bits: a uniform double in [0, 1)
    return (1.0 - u) ** (-1.0 / alpha) - 1.0


def _rejections(batch: pa.Table, cfg: LabelSection, cutoff: float | None) -> tuple[np.ndarray, list, list]:
    """(rejected mask, reason per rejected row, detail per rejected row) for one batch."""
    if cfg.labeler == "quality":
        quality = _column(batch, "quality").to_numpy(zero_copy_only=False)
        quality = np.nan_to_num(quality.astype(np.float64), nan=0.0)
        if cfg.filter == "threshold":
            mask = quality < cfg.threshold
            details = [f"quality {q:.4f} < threshold {cfg.threshold:g}" for q in quality[mask]]
        elif cfg.filter == "pareto":
            draws = pareto_draws([str(i) for i in _column(batch, "id").to_pylist()], cfg.pareto_alpha, cfg.seed)
            mask = ~(draws > 1.0 - quality)
            details = [
                f"quality {q:.4f}: pareto draw {d:.4f} <= {1 - q:.4f}"
                for q, d in zip(quality[mask], draws[mask])
            ]
        else:
            mask = np.zeros(len(quality), dtype=bool)
            details = []
        return mask, ["low_quality"] * len(details), details
    ppl = _column(batch, "ppl").to_pylist()
    mask = np.array([p is None or (cutoff is not None and p > cutoff) for p in ppl], dtype=bool)
    reasons, details = [], []
    for p in (ppl[i] for i in np.flatnonzero(mask)):
        reasons.append("empty" if p is None else "high_perplexity")
        details.append("no tokens to score" if p is None
                       else f"ppl {p:.4g} > {cutoff:.4g} (p{cfg.ppl_max_percentile:g})")
    return mask, reasons, details


def _kept_rows(batch: pa.Table, cfg: LabelSection, cutoff: float | None) -> pa.Table:
    mask, _, _ = _rejections(batch, cfg, cutoff)
    return batch.filter(pa.array(~mask))


def stage_name(cfg: LabelSection) -> str:
    """The label stage's name in manifest.json and in rejected/: "label (quality)", ..."""
    return f"{STAGE} ({cfg.labeler})"


def _rejected_rows(batch: pa.Table, cfg: LabelSection, cutoff: float | None) -> pa.Table:
    mask, reasons, details = _rejections(batch, cfg, cutoff)
    rejected = batch.filter(pa.array(mask))
    n = rejected.num_rows
    columns = {name: pc.cast(_column(rejected, name), pa.string()) for name in ("id", "source", "location")}
    columns["stage"] = pa.array([stage_name(cfg)] * n, pa.string())  # as manifest.json names the stage
    columns["reason"] = pa.array(reasons, pa.string())
    columns["detail"] = pa.array(details, pa.string())
    return pa.table(columns, schema=REJECTED_SCHEMA)


def _null_unconfident(batch: pa.Table, threshold: float) -> pa.Table:
    confident = pc.greater_equal(_column(batch, "confidence"), threshold)
    labels = pc.if_else(confident, _column(batch, "label"), pa.scalar(None, pa.string()))
    return _with_column(batch, "label", labels)


def _percentile(ds: ray.data.Dataset, column: str, percentile: float) -> float | None:
    """numpy's (linear) percentile of a numeric column, nulls left out; None when all are null.

    Only that column reaches the driver, 8 bytes a document (Ray Data's `Quantile` aggregate
    gathers the same values into one task, through a shuffle whose actors would hold CPUs).
    """
    parts = [
        batch.column(column).combine_chunks().drop_null().to_numpy()
        for batch in ds.select_columns([column]).iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    values = np.concatenate([np.zeros(0), *parts])
    return float(np.percentile(values, percentile)) if len(values) else None


def _split(ds: ray.data.Dataset, fn: Callable, **kwargs) -> ray.data.Dataset:
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None)


def filter_labelled(ds: ray.data.Dataset, cfg: LabelSection) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(kept, rejected) documents of a labelled dataset, by `cfg.labeler`'s rule.

    quality: `cfg.filter` "threshold" rejects quality < `cfg.threshold`; "pareto" keeps a document
    when a Pareto(`cfg.pareto_alpha`) draw exceeds 1 - quality (GPT-3), the draw fixed by
    (`cfg.seed`, id); "none" keeps all. perplexity: rejects ppl above the `cfg.ppl_max_percentile`
    percentile (over the ppl column alone) and documents with no tokens.
    classifier: rejects nothing; labels with confidence < `cfg.threshold` become null. Texts
    never reach the driver.
    Rejected rows hold id, source, location, stage, reason, detail (strings).
    """
    _labeler(cfg)
    empty = ray.data.from_arrow(REJECTED_SCHEMA.empty_table())
    if cfg.labeler == "classifier":
        return _split(ds, _null_unconfident, threshold=cfg.threshold), empty
    if cfg.labeler == "quality" and cfg.filter == "none":
        return ds, empty
    # Kept, rejected and the percentile all read the labels: compute them once, not once per reader.
    ds = ds.materialize()
    cutoff = None
    if cfg.labeler == "perplexity" and cfg.ppl_max_percentile is not None:
        cutoff = _percentile(ds, "ppl", cfg.ppl_max_percentile)
    return _split(ds, _kept_rows, cfg=cfg, cutoff=cutoff), _split(ds, _rejected_rows, cfg=cfg, cutoff=cutoff)
