"""LoRA (Hu et al. 2021): low-rank adapters beside frozen Linear weights, and merging them back in.

`apply_lora` swaps each targeted `nn.Linear` of the GPT blocks for a `LoRALinear` that keeps the
original weight frozen and learns W + (alpha / r) * B @ A with A (r x in) and B (out x r), B starting
at zero so training starts from the base model exactly. `merge_lora` folds the adapters into plain
Linear layers again, so exports, serving and the classifier labeller see an ordinary GPT.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mtnlg_ray.errors import ConfigError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (without dropout)."""
        weight = self.base.weight
        out = nn.Linear(self.base.in_features, self.base.out_features, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            out.weight.copy_(weight + (self.lora_b @ self.lora_a) * self.scaling)
            out.bias.copy_(self.base.bias)
        return out


def _targets(targets: Sequence[str]) -> set[str]:
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ConfigError(
            f"task.lora.targets: expected a non-empty list of {', '.join(LORA_TARGETS)}, got {list(targets)!r}"
        )
    return set(targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> nn.Module:
    """Freeze every parameter of `model`, then add trainable adapters to the targeted Linear layers."""
    if rank < 1:
        raise ConfigError(f"task.lora.rank: expected a positive rank for LoRA, got {rank}")
    wanted = _targets(targets)
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in wanted and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` in `model` with the equivalent plain Linear, in place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model


def lora_parameter_count(n_layer: int, d_model: int, rank: int, targets: Sequence[str]) -> int:
    """Adapter parameters LoRA adds to a GPT: r * (in + out) for each targeted Linear of each block."""
    shapes = {"qkv": (d_model, 3 * d_model), "proj": (d_model, d_model),
              "fc1": (d_model, 4 * d_model), "fc2": (4 * d_model, d_model)}
    return n_layer * sum(rank * (shapes[t][0] + shapes[t][1]) for t in _targets(targets))
