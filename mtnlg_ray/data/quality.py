"""The GPT-3 / MT-NLG document quality classifier: hashed word n-grams and logistic regression.

`train_quality_classifier` fits it on curated text (positives) against raw crawl (negatives);
`QualityModel` scores documents; `QualityLabeler` is the labeller `mtnlg_ray/data/label.py` runs
in its actor pool (this module imports no torch, so those actors start without it). A model
is a folder of `weights.safetensors` and `quality.json`: loading it never unpickles.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mtnlg_ray.data.columns import texts, with_column
from mtnlg_ray.data.read import iter_texts, resolve_inputs
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError
from mtnlg_ray.publish import check_can_make_folder, publish_directory

FORMAT = "mtnlg-ray/quality/v1"
WEIGHTS = "weights.safetensors"
META = "quality.json"
ORDER = 2  # unigrams and bigrams
BUCKETS = 2**18
THRESHOLD = 0.5
HOLDOUT_FRACTION = 0.1
MIN_DOCUMENTS = 10  # a side: fewer leave no document of it held out to measure accuracy on
TXT_MODES = ("file", "paragraph", "line")  # how a .txt input is read, as `read.txt_mode` in data prepare

# Word tokens are runs of letters/digits; runs of punctuation count as tokens too, so
# symbol junk ("%$#@!") gets features of its own instead of an empty vector.
_TOKEN = re.compile(r"\w+|[^\w\s]+")
_TOKENIZATION = r"lowercase, regex \w+|[^\w\s]+"
_HASHING = "crc32 per token; n-gram keys chained and mixed with splitmix64; bucket = key mod buckets"
_FEATURES = "log(1 + count) per bucket, each document scaled to unit L2 norm"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wrap-around arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_buckets(text: str, order: int = ORDER, buckets: int = BUCKETS) -> np.ndarray:
    """Bucket of every 1..`order`-gram of the document's lowercased word tokens (stable across runs)."""
    tokens = _TOKEN.findall(text.lower())
    hashes = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    keys = hashes
    parts = []
    with np.errstate(over="ignore"):
        for n in range(1, order + 1):
            if n > 1:
                # keys[i] covers tokens i..i+n-1: fold the next token into the (n-1)-gram's key.
                keys = _mix(keys[:-1] + _GOLDEN) ^ hashes[n - 1 :]
            if not len(keys):
                break
            parts.append(_mix(keys ^ (np.uint64(n) * _GOLDEN)) % np.uint64(buckets))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class Features:
    """Sparse rows (CSR): row i's buckets are `indices[indptr[i]:indptr[i+1]]` with `values` alongside."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    def row_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.rows), np.diff(self.indptr))

    def take(self, rows: np.ndarray) -> "Features":
        starts, lengths = self.indptr[rows], np.diff(self.indptr)[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        # Positions of the chosen rows' entries, range by range, without a Python loop.
        positions = np.arange(indptr[-1]) - np.repeat(indptr[:-1] - starts, lengths)
        return Features(indptr, self.indices[positions], self.values[positions])


def featurize(texts: Sequence[str], order: int = ORDER, buckets: int = BUCKETS) -> Features:
    indices, values, lengths = [], [], []
    for text in texts:
        found, counts = np.unique(ngram_buckets(text, order, buckets), return_counts=True)
        weights = np.log1p(counts.astype(np.float64))
        norm = np.sqrt(np.dot(weights, weights))
        indices.append(found)
        values.append(weights / norm if norm > 0 else weights)
        lengths.append(len(found))
    indptr = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return Features(
        indptr,
        np.concatenate([np.zeros(0, np.int64), *indices]),
        np.concatenate([np.zeros(0, np.float64), *values]),
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


class QualityModel:
    """Logistic regression over hashed n-gram features; `score` gives P(curated) per document."""

    def __init__(
        self,
        weight: np.ndarray,
        bias: float,
        order: int = ORDER,
        buckets: int = BUCKETS,
        threshold: float = THRESHOLD,
        metrics: dict | None = None,
    ) -> None:
        self.weight = np.asarray(weight, dtype=np.float32)
        self.bias = np.float32(bias)
        self.order = order
        self.buckets = buckets
        self.threshold = threshold
        self.metrics = metrics or {}

    def logits(self, features: Features) -> np.ndarray:
        contrib = self.weight[features.indices].astype(np.float64) * features.values
        return float(self.bias) + np.bincount(features.row_ids(), weights=contrib, minlength=features.rows)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Quality in [0, 1] per text (float64)."""
        return _sigmoid(self.logits(featurize(texts, self.order, self.buckets)))

    def save(self, output: str | Path) -> Path:
        """Write `weights.safetensors` + `quality.json` into `output`, atomically (old or new, never a mix)."""
        meta = {
            "format": FORMAT,
            "ngram_order": self.order,
            "buckets": self.buckets,
            "tokenization": _TOKENIZATION,
            "hashing": _HASHING,
            "features": _FEATURES,
            # Documents scoring at or above this are classed as curated in `metrics`; the label
            # stage's own cut is `label.threshold` (or GPT-3's Pareto sampling).
            "threshold": self.threshold,
            "metrics": self.metrics,
        }
        tensors = {"weight": self.weight, "bias": np.array([self.bias], dtype=np.float32)}
        return _write_atomically(Path(output), tensors, meta)

    @classmethod
    def read_meta(cls, path: str | Path) -> dict:
        """The validated `quality.json` of a model folder (cheap: no weights read)."""
        path = Path(path)
        meta_file = path / META
        if not meta_file.is_file():
            hint = " (`mtnlg-ray data train-quality-classifier` writes one)"
            raise CheckpointError(f"{meta_file}: missing, {path} is not a quality model{hint}")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{meta_file}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{meta_file}: expected format {FORMAT!r}, got {found!r}")
        for key in ("ngram_order", "buckets"):
            if not isinstance(meta.get(key), int) or meta[key] < 1:
                raise CheckpointError(f"{meta_file}: '{key}' must be a positive integer, got {meta.get(key)!r}")
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path / WEIGHTS}: missing")
        return meta

    @classmethod
    def load(cls, path: str | Path) -> "QualityModel":
        path = Path(path)
        meta = cls.read_meta(path)
        try:
            tensors = load_file(str(path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path / WEIGHTS}: unreadable or truncated safetensors file ({exc})") from None
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if weight is None or bias is None or weight.shape != (meta["buckets"],) or bias.shape != (1,):
            shapes = {k: list(v.shape) for k, v in tensors.items()}
            raise CheckpointError(
                f"{path / WEIGHTS}: expected 'weight' [{meta['buckets']}] and 'bias' [1], found {shapes}"
            )
        threshold = meta.get("threshold", THRESHOLD)
        return cls(weight, float(bias[0]), meta["ngram_order"], meta["buckets"], threshold, meta.get("metrics"))


class QualityLabeler:
    """Adds `quality` ∈ [0, 1] (float64): the hashed n-gram classifier's P(curated)."""

    columns = ("quality",)
    # ~0.2 ms a document on a laptop core: a batch this size is ~1 s of work per actor task, which
    # amortises Ray's per-task cost (a pool at 64 documents a batch ran at 0.42x a plain loop).
    batch_size = 4096

    def __init__(self, model_path: str | Path, text_field: str = "text") -> None:
        self.model = QualityModel.load(model_path)
        self.text_field = text_field

    @staticmethod
    def check(model_path: str | Path) -> None:
        QualityModel.read_meta(model_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = self.model.score(texts(batch, self.text_field))
        return with_column(batch, "quality", pa.array(scores, pa.float64()))


def fit_logistic(
    features: Features,
    labels: np.ndarray,
    buckets: int,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 0.05,
    l2: float = 1e-5,
) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression by minibatch Adam with an L2 penalty; returns (weight, bias)."""
    rng = np.random.default_rng(seed)
    n = features.rows
    positives = float(labels.sum())
    # Each class carries half the loss, so a corpus with few curated documents still learns them.
    sample_weight = np.where(labels > 0, n / (2 * max(positives, 1.0)), n / (2 * max(n - positives, 1.0)))
    params = np.zeros(buckets + 1)  # weights, then the bias
    m, v = np.zeros_like(params), np.zeros_like(params)
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(epochs):
        for rows in np.array_split(rng.permutation(n), max(1, -(-n // batch_size))):
            batch = features.take(rows)
            row_ids = batch.row_ids()
            contrib = params[batch.indices] * batch.values
            z = params[-1] + np.bincount(row_ids, weights=contrib, minlength=len(rows))
            err = (_sigmoid(z) - labels[rows]) * sample_weight[rows] / len(rows)
            grad = l2 * params
            grad[-1] = err.sum()
            grad[:-1] += np.bincount(batch.indices, weights=err[row_ids] * batch.values, minlength=buckets)
            step += 1
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad * grad
            params -= lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
    return params[:-1].astype(np.float32), float(params[-1])


def _holdout_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(n * HOLDOUT_FRACTION)]] = True
    return mask


def train_quality_classifier(
    positive: Sequence[str],
    negative: Sequence[str],
    output: str | Path,
    *,
    epochs: int = 5,
    seed: int = 0,
    txt_mode: str = "file",
) -> dict:
    """Fit the classifier on INPUT specs (`positive`: curated text, `negative`: raw crawl) and save it at `output`.

    A tenth of each side (chosen by `seed`) is held out to measure accuracy; returns the metrics,
    which `quality.json` records too.
    """
    from mtnlg_ray.config import ReadSection  # here: the labeller's import path stays free of torch

    if epochs < 1:
        raise ConfigError(f"epochs: expected a positive integer, got {epochs}")
    _check_output(Path(output))  # before the training, not after it
    if txt_mode not in TXT_MODES:
        raise ConfigError(f"--txt-mode: expected one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
    # Each side's folders and globs are walked once: iter_texts takes the files as they are.
    files = {"positive": resolve_inputs(positive), "negative": resolve_inputs(negative)}
    both = sorted(set(files["positive"]) & set(files["negative"]))
    if both:  # it trained, and reported a holdout accuracy, on a task with no answer
        raise InputError(f"{both[0]}: given as both --positive and --negative text")
    defaults = ReadSection()
    sides = {}
    for name, inputs in (("positive", positive), ("negative", negative)):
        # Documents as `data prepare` reads the text it scores (a long .txt in pieces), so the two see
        # documents of the same lengths: the features' log counts depend on length.
        texts = [t for t in iter_texts(files[name], max_chars=defaults.max_chars, piece_chars=defaults.piece_chars,
                                       txt_mode=txt_mode) if t.strip()]
        if not texts:
            raise InputError(f"--{name} {' '.join(inputs)}: no text found")
        if len(texts) < MIN_DOCUMENTS:  # 1 negative "document" against 485 scored a holdout accuracy of 1.0
            raise InputError(f"--{name} {' '.join(inputs)}: {len(texts)} document{'s' * (len(texts) != 1)}, too "
                             f"few to learn from (at least {MIN_DOCUMENTS}); a .txt file is one document unless "
                             "--txt-mode line or paragraph reads one a line or paragraph")
        sides[name] = texts
    texts = sides["positive"] + sides["negative"]
    labels = np.concatenate([np.ones(len(sides["positive"])), np.zeros(len(sides["negative"]))])
    rng = np.random.default_rng(seed)
    holdout = np.concatenate([_holdout_mask(len(sides[name]), rng) for name in ("positive", "negative")])
    features = featurize(texts)
    train_rows, holdout_rows = np.flatnonzero(~holdout), np.flatnonzero(holdout)
    weight, bias = fit_logistic(features.take(train_rows), labels[train_rows], BUCKETS, epochs=epochs, seed=seed)
    model = QualityModel(weight, bias)
    scores = _sigmoid(model.logits(features))
    predicted = scores >= model.threshold
    likelihood = np.clip(np.where(labels > 0, scores, 1.0 - scores), 1e-12, 1.0)

    def accuracy(rows: np.ndarray) -> float | None:
        return float(np.mean(predicted[rows] == (labels[rows] > 0))) if len(rows) else None

    def log_loss(rows: np.ndarray) -> float | None:
        return float(-np.mean(np.log(likelihood[rows]))) if len(rows) else None

    model.metrics = {
        "positive": len(sides["positive"]),
        "negative": len(sides["negative"]),
        "train": len(train_rows),
        "holdout": len(holdout_rows),
        "train_accuracy": accuracy(train_rows),
        "holdout_accuracy": accuracy(holdout_rows),
        "train_log_loss": log_loss(train_rows),
        "holdout_log_loss": log_loss(holdout_rows),
        "epochs": epochs,
        "seed": seed,
    }
    model.save(output)
    return dict(model.metrics)


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder")
    check_can_make_folder(output)
    if output.is_dir() and any(output.iterdir()) and not (output / META).is_file():
        # Replacing the folder wholesale would delete whatever else the user keeps there.
        raise InputError(f"{output}: folder exists and is not a quality model; choose a new --output")


def _write_atomically(output: Path, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": FORMAT})
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    publish_directory(output, write)
    return output
