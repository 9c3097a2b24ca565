"""A GPT backbone with a linear classification head: what fine-tuning trains and the classifier labeller runs.

A classification checkpoint is a consolidated checkpoint (`mtnlg_ray/checkpoint.py`) with two additions:
config.json holds `"task": {"kind": "classification", "labels": [...], "pooling": "last" | "mean"}` and
model.safetensors holds `head.weight` (n_labels × d_model) and `head.bias` (n_labels). The backbone keeps
its GPT tensor names, so `load_checkpoint` still reads the checkpoint as a plain language model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mtnlg_ray.checkpoint import CONFIG, WEIGHTS, load_checkpoint, read_checkpoint_config, save_checkpoint
from mtnlg_ray.errors import CheckpointError, ConfigError
from mtnlg_ray.model.gpt import GPT

POOLINGS = ("last", "mean")
HEAD = "head."


class GPTClassifier(nn.Module):
    """Logits over `n_labels` from a pooled final hidden state of right-padded token batches.

    Attention is causal, so padding after a sequence never changes its real positions: "last"
    reads the hidden state at `lengths - 1`, "mean" averages the first `lengths` positions.
    """

    def __init__(self, backbone: GPT, n_labels: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"task.pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
        if n_labels < 1:
            raise ConfigError(f"task.labels: expected at least one label, got {n_labels}")
        self.backbone = backbone
        self.pooling = pooling
        weight = backbone.tok_emb.weight
        self.head = nn.Linear(backbone.config.d_model, n_labels, device=weight.device, dtype=weight.dtype)
        if not weight.is_meta:
            with torch.no_grad():
                self.head.weight.normal_(0.0, backbone.config.init_std)
                self.head.bias.zero_()

    @property
    def n_labels(self) -> int:
        return self.head.out_features

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_labels) for `idx` (B, T) whose row i holds `lengths[i]` real tokens, then padding."""
        h = self.backbone.hidden_states(idx)
        lengths = lengths.to(h.device)
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        else:
            real = (torch.arange(h.shape[1], device=h.device) < lengths[:, None]).to(h.dtype)
            pooled = (h * real[..., None]).sum(dim=1) / lengths[:, None].to(h.dtype)
        return self.head(pooled)


def classification_input(ids: Sequence[int], eos: int, seq_len: int) -> list[int]:
    """The tokens a classifier reads for one text: its first `seq_len - 1` tokens, then EOS.

    The closing EOS gives "last" pooling a position that has seen the whole (truncated) text and
    gives an empty text one token. Fine-tuning and the labeller both encode text this way.
    """
    return [*ids[: seq_len - 1], eos]


def _check_labels(labels: Sequence[str], where: str) -> list[str]:
    labels = list(labels)
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise CheckpointError(f"{where}: task.labels must be a non-empty list of strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        duplicate = next(x for x in labels if labels.count(x) > 1)
        raise CheckpointError(f"{where}: task.labels lists {duplicate!r} twice")
    return labels


def classification_task(body: dict, where: str | Path) -> dict:
    """The validated `task` section of a checkpoint's config.json; one clear line if it is no classifier."""
    task = body.get("task")
    if not isinstance(task, dict) or task.get("kind") != "classification":
        kind = task.get("kind") if isinstance(task, dict) else None
        found = f"task kind {kind!r}" if kind else "no task section (a language model?)"
        raise CheckpointError(f"{where}: not a classification checkpoint: config.json has {found}")
    labels = _check_labels(task.get("labels") or [], str(where))
    pooling = task.get("pooling", "last")
    if pooling not in POOLINGS:
        raise CheckpointError(f"{where}: task.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return {"kind": "classification", "labels": labels, "pooling": pooling}


def save_classifier(
    model: GPTClassifier,
    labels: Sequence[str],
    output: str | Path,
    tokenizer_json: str | Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `model` as a classification checkpoint at `output` (atomically, like `save_checkpoint`)."""
    labels = _check_labels(labels, str(output))
    if len(labels) != model.n_labels:
        raise CheckpointError(f"{output}: {len(labels)} labels for a head of {model.n_labels} outputs")
    head = {f"{HEAD}{name}": t.detach() for name, t in model.head.state_dict().items()}
    task = {"kind": "classification", "labels": labels, "pooling": model.pooling}
    return save_checkpoint(model.backbone, output, tokenizer_json, extra={**(extra or {}), "task": task},
                           extra_tensors=head)


def load_classifier(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[GPTClassifier, list[str]]:
    """Load a classification checkpoint in eval mode; returns (model, labels in head order)."""
    path = Path(path)
    task = classification_task(read_checkpoint_config(path), path / CONFIG)
    backbone, _ = load_checkpoint(path, device=device, dtype=dtype)
    head = _read_head(path / WEIGHTS)
    n, d = len(task["labels"]), backbone.config.d_model
    expected = {"weight": (n, d), "bias": (n,)}
    for name, shape in expected.items():
        if name not in head:
            raise CheckpointError(f"{path / WEIGHTS}: missing tensor '{HEAD}{name}' of the classification head")
        if tuple(head[name].shape) != shape:
            raise CheckpointError(
                f"{path / WEIGHTS}: tensor '{HEAD}{name}' has shape {list(head[name].shape)}, "
                f"expected {list(shape)} for {n} labels"
            )
    model = GPTClassifier(backbone, n, task["pooling"])
    model.head.load_state_dict(head)  # copies onto the backbone's device and dtype
    return model.eval(), task["labels"]


def _read_head(weights: Path) -> dict[str, torch.Tensor]:
    # Only the head's tensors: the backbone was just read by load_checkpoint.
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k[len(HEAD) :]: f.get_tensor(k) for k in f.keys() if k.startswith(HEAD)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({exc})") from None
