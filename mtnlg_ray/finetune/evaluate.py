"""`mtnlg-ray evaluate`: perplexity and bits per byte of a language model, or a classifier's metrics.

Runs in one process on the local CPU (or the GPU when there is one): evaluation sets are small,
and a number for a checkpoint should not depend on a cluster being up.

- `lm` on text (files, folders, globs, `builtin:python-docs`): every document scored as it appears
  in packed training data (after an EOS), in windows of the model's context.
- `lm` on a dataset directory from `data prepare`: next-token loss over its packed `val` sequences.
- `classification` on a labelled file: accuracy and precision / recall / F1 per class and macro.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mtnlg_ray.errors import InputError
from mtnlg_ray.runtime import default_device

LN2 = math.log(2.0)


def _byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for: byte-level BPE spells every byte as one character of its token."""
    vocab = tokenizer.get_vocab_size()
    special = {t for t, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    return np.array([0 if i in special else len(tokenizer.id_to_token(i) or "") for i in range(vocab)])


def evaluate_lm_text(checkpoint: str | Path, inputs: list[str], text_field: str = "text") -> dict:
    from collections import Counter

    from mtnlg_ray.data.label import PerplexityLabeler
    from mtnlg_ray.data.read import iter_texts

    skipped: Counter[str] = Counter()
    texts = [t for t in iter_texts(inputs, text_field, skipped) if t]
    if not texts:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        hint = (f"; --text-field names the field that holds the text, if not '{text_field}' (an SFT "
                "checkpoint is scored on its dev set as it trains)" if skipped.get("missing_field") else "")
        raise InputError(f"{' '.join(inputs)}: no text to evaluate on" + (f" ({why} skipped)" if why else "") + hint)
    scorer = PerplexityLabeler(checkpoint, device=default_device())
    counts = [len(e.ids) for e in scorer.tokenizer.encode_batch(texts, add_special_tokens=False)]
    nll = 0.0
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        for ppl, n in zip(scorer.perplexities(chunk), counts[start : start + 256]):
            if ppl is not None:
                nll += math.log(ppl) * n
    tokens, size = sum(counts), sum(len(t.encode("utf-8")) for t in texts)
    return _lm_numbers(nll, tokens, size, documents=len(texts), skipped=dict(skipped))


def evaluate_lm_tokens(checkpoint: str | Path, dataset: Path, split: str = "val", batch: int = 16) -> dict:
    import torch.nn.functional as F

    from mtnlg_ray.checkpoint import load_checkpoint, tokenizer_path
    from mtnlg_ray.tokenizer import load_tokenizer, tokenizer_hash
    from mtnlg_ray.train.data import TokenShards

    data = TokenShards(dataset, split)
    if len(data) == 0:
        raise InputError(f"{dataset}: the '{split}' split holds no sequences")
    own, theirs = tokenizer_path(checkpoint), dataset / "tokenizer" / "tokenizer.json"
    if theirs.is_file() and tokenizer_hash(own) != tokenizer_hash(theirs):
        raise InputError(f"{dataset}: tokenized with another tokenizer than {checkpoint}; "
                         "evaluate on text instead, or on a dataset prepared with the checkpoint's tokenizer")
    device = default_device()
    model, _ = load_checkpoint(checkpoint, device=device)
    if data.seq_len > model.config.seq_len:
        raise InputError(f"{dataset}: sequences of {data.seq_len} tokens exceed the model's context of "
                         f"{model.config.seq_len}")
    byte_len = _byte_lengths(load_tokenizer(own))
    nll, tokens, size = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(data), batch):
            rows = data.rows(np.arange(start, min(start + batch, len(data)))).to(device)
            logits = model(rows[:, :-1]).float()
            nll += float(F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="sum"))
            targets = rows[:, 1:].cpu().numpy()
            tokens += targets.size
            size += int(byte_len[np.clip(targets, 0, len(byte_len) - 1)].sum())
    return _lm_numbers(nll, tokens, size, sequences=len(data), split=split)


def _lm_numbers(nll: float, tokens: int, size: int, **extra) -> dict:
    return {"task": "lm", "tokens": tokens, "bytes": size, "loss": nll / max(tokens, 1),
            "perplexity": math.exp(nll / max(tokens, 1)), "bits_per_byte": nll / LN2 / max(size, 1), **extra}


def evaluate_classification(checkpoint: str | Path, data: str | Path, text_field: str = "text",
                            label_field: str = "label") -> dict:
    from mtnlg_ray.data.label import ClassifierLabeler
    from mtnlg_ray.finetune.data import read_classification

    ClassifierLabeler.check(checkpoint)
    rows = read_classification(data, text_field, label_field)
    labeler = ClassifierLabeler(checkpoint, device=default_device())
    return {"task": "classification", "labels": labeler.labels, **classifier_metrics(labeler, rows, checkpoint)}


def classifier_metrics(classifier, rows, where: str | Path) -> dict:
    """Accuracy and P/R/F1 of `classifier` (anything with `labels` and `predict(texts) -> (labels,
    confidence)`: the classifier labeller, an n-gram classifier) on labelled `rows`."""
    from mtnlg_ray.finetune.data import check_labels
    from mtnlg_ray.finetune.metrics import classification_metrics

    check_labels(rows, classifier.labels, f"the labels of {where}")
    predicted, _ = classifier.predict(rows.texts)
    index = {label: i for i, label in enumerate(classifier.labels)}
    return classification_metrics([index[x] for x in rows.labels], [index[x] for x in predicted], classifier.labels)


def is_classifier(checkpoint: str | Path) -> bool:
    """A fine-tuned classifier, an n-gram classifier or a mixture folder (what `evaluate` scores as one)."""
    from mtnlg_ray.checkpoint import read_config_json, task_kind
    from mtnlg_ray.data.label import is_classifier_mix
    from mtnlg_ray.finetune.ngram import is_ngram_classifier

    return (is_classifier_mix(checkpoint) or is_ngram_classifier(checkpoint)
            or task_kind(read_config_json(Path(checkpoint))) == "classification")


def evaluate(checkpoint: str | Path, data: list[str], task: str | None = None, text_field: str | None = None,
             label_field: str = "label", split: str | None = None) -> dict:
    """The entry point of `mtnlg-ray evaluate`. A classifier is a fine-tuned GPT or an n-gram
    classifier folder (self-training's bag-of-words teacher); a language model is a GPT checkpoint.
    No `task`: classification for a classifier, else lm (`dev.tsv` against a fine-tune without
    --task used to be read as lm text: "unsupported file type")."""
    from mtnlg_ray.checkpoint import read_checkpoint_config

    if task is None:
        task = "classification" if is_classifier(checkpoint) else "lm"
    if task == "classification":
        if split is not None:  # it was ignored without a word
            raise InputError("--split: picks a split of a prepared dataset (lm); a classification file is scored whole")
        if len(data) != 1:
            raise InputError(f"--data: classification takes one labelled file, got {len(data)}")
        return evaluate_classification(checkpoint, data[0], text_field or "text", label_field)
    if task != "lm":
        raise InputError(f"--task: expected lm or classification, got {task!r}")
    split = split or "val"
    if split not in ("train", "val"):  # was "not a token index of `data prepare`; prepare the dataset again"
        raise InputError(f"--split: expected train or val, got {split!r}")
    read_checkpoint_config(checkpoint)  # one clear line for a missing or broken checkpoint
    if len(data) == 1 and (Path(data[0]) / "tokens" / "index.json").is_file():
        return evaluate_lm_tokens(checkpoint, Path(data[0]), split)
    return evaluate_lm_text(checkpoint, data, text_field or "text")
