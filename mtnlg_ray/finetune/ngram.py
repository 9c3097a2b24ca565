"""A bag-of-n-grams task classifier: softmax regression over the quality classifier's hashed n-gram features.

With a few hundred or thousand labels a small GPT fine-tuned from scratch-sized pretraining is a weaker
teacher than a bag of words: on SST-2 with 1,000 labels this model's 12,000 most confident pool
predictions are 90 % right against 82 % for the fine-tuned GPT's (BENCHMARKS.md). `mtnlg-ray
self-train` can therefore start from it (`selftrain.ngram_teacher`): round 0 fits it on `data.train`,
and the classifier labeller runs it over the pool like any classifier checkpoint. A model is a folder
of `weights.safetensors` and `ngram.json`; loading it never unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mtnlg_ray.data.quality import BUCKETS, ORDER, Features, featurize
from mtnlg_ray.errors import CheckpointError, ConfigError
from mtnlg_ray.publish import publish_directory

FORMAT = "mtnlg-ray/ngram-classifier/v1"
WEIGHTS = "weights.safetensors"
META = "ngram.json"
# Chosen on SST-2's 1,000 labelled rows against its dev set (5 / 10 / 20 epochs x L2 1e-5 / 1e-4 / 1e-3):
# weak regularisation, few passes. 0.710 dev accuracy, as TF-IDF + cross-validated LR (0.708).
EPOCHS = 5
L2 = 1e-5


def is_ngram_classifier(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logits(weight: np.ndarray, bias: np.ndarray, features: Features) -> np.ndarray:
    rows = features.row_ids()
    contrib = weight[features.indices].astype(np.float64) * features.values[:, None]
    out = np.zeros((features.rows, weight.shape[1]))
    np.add.at(out, rows, contrib)
    return out + bias


class NgramClassifier:
    """Softmax regression over hashed word 1..`order`-grams; `predict_proba` gives P(label) per text."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, labels: Sequence[str], order: int = ORDER,
                 metrics: dict | None = None) -> None:
        self.weight = np.asarray(weight, dtype=np.float32)  # [buckets, labels]
        self.bias = np.asarray(bias, dtype=np.float64)
        self.labels = [str(x) for x in labels]
        self.order = order
        self.metrics = metrics or {}

    @property
    def buckets(self) -> int:
        return self.weight.shape[0]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return _softmax(_logits(self.weight, self.bias, featurize(texts, self.order, self.buckets)))

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The most likely label of each text and its probability (what the classifier labeller emits)."""
        probs = self.predict_proba(texts)
        return [self.labels[i] for i in probs.argmax(axis=1)], probs.max(axis=1)

    def save(self, output: str | Path) -> Path:
        """Write `weights.safetensors` + `ngram.json` into `output`, atomically."""
        output = Path(output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())) and not is_ngram_classifier(output):
            raise ConfigError(f"{output}: exists and is not an n-gram classifier; choose a new folder")
        meta = {"format": FORMAT, "labels": self.labels, "ngram_order": self.order, "buckets": self.buckets,
                "features": "the quality classifier's hashed n-grams (mtnlg_ray/data/quality.py)",
                "metrics": self.metrics}
        tensors = {"weight": self.weight, "bias": self.bias.astype(np.float32)}

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / WEIGHTS), metadata={"format": FORMAT})
            (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        output.parent.mkdir(parents=True, exist_ok=True)
        publish_directory(output, write)
        return output

    @classmethod
    def load(cls, path: str | Path) -> "NgramClassifier":
        path = Path(path)
        meta_file = path / META
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{meta_file}: missing, {path} is not an n-gram classifier") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{meta_file}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{meta_file}: expected format {FORMAT!r}, got {found!r}")
        try:
            tensors = load_file(str(path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path / WEIGHTS}: unreadable or truncated safetensors file ({exc})") from None
        labels, buckets = meta.get("labels"), meta.get("buckets")
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if (not isinstance(labels, list) or weight is None or bias is None
                or weight.shape != (buckets, len(labels)) or bias.shape != (len(labels),)):
            shapes = {k: list(v.shape) for k, v in tensors.items()}
            raise CheckpointError(f"{path / WEIGHTS}: expected 'weight' [{buckets}, labels] and 'bias' [labels] "
                                  f"for labels {labels}, found {shapes}")
        return cls(weight, bias, labels, int(meta.get("ngram_order", ORDER)), meta.get("metrics"))


def fit_ngram_classifier(texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str], *,
                         epochs: int = EPOCHS, l2: float = L2, lr: float = 0.05, batch_size: int = 32,
                         seed: int = 0, buckets: int = BUCKETS) -> NgramClassifier:
    """Softmax regression by minibatch Adam with an L2 penalty on every text of `texts`."""
    if len(texts) != len(labels) or not texts:
        raise ConfigError(f"n-gram classifier: {len(texts)} texts and {len(labels)} labels; expected as many, > 0")
    index = {name: i for i, name in enumerate(label_names)}
    targets = np.eye(len(label_names))[[index[y] for y in labels]]
    features = featurize(texts, ORDER, buckets)
    rng = np.random.default_rng(seed)
    params = [np.zeros((buckets, len(label_names))), np.zeros(len(label_names))]  # weight, bias
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(epochs):
        for rows in np.array_split(rng.permutation(features.rows), max(1, -(-features.rows // batch_size))):
            batch = features.take(rows)
            err = (_softmax(_logits(params[0], params[1], batch)) - targets[rows]) / len(rows)
            grad_w = l2 * params[0]
            np.add.at(grad_w, batch.indices, err[batch.row_ids()] * batch.values[:, None])
            step += 1
            for p, g, (m, v) in zip(params, (grad_w, err.sum(axis=0)), moments):
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                p -= lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
    return NgramClassifier(params[0], params[1], label_names,
                           metrics={"train": len(texts), "epochs": epochs, "l2": l2, "seed": seed})
