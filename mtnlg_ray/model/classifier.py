"""A GPT backbone with a linear classification head: what fine-tuning trains and the classifier labeller runs.

Its checkpoint (`save_classifier` / `load_classifier` in `mtnlg_ray/checkpoint.py`) is a consolidated
checkpoint whose config.json has a classification `task` and whose weights add `head.weight` and `head.bias`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPT

POOLINGS = ("last", "mean")


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


def drop_tokens(row: Sequence[int], rate: float, rng: np.random.Generator) -> list[int]:
    """`row` with each token before its closing EOS dropped with probability `rate` (input noise).

    At least one text token stays when the row has any, so a short text never becomes empty.
    """
    text, eos = list(row[:-1]), row[-1]
    if rate <= 0 or not text:
        return list(row)
    kept = [t for t, drop in zip(text, rng.random(len(text)) < rate) if not drop]
    return [*(kept or [text[int(rng.integers(len(text)))]]), eos]


def pad_right(rows: Sequence[Sequence[int]], fill: int, multiple: int = 1) -> torch.Tensor:
    """Rows padded on the right to one width, a multiple of `multiple` (sequence parallel splits the
    positions evenly across tensor-parallel ranks; attention is causal, so the padding changes nothing)."""
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
