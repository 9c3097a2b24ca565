"""FLOP counts for one training step of the GPT, and the GPUs we plan for.

Pure arithmetic: `plan.py` turns these into per-GPU throughput and MFU, and the training
loop logs MFU with `flops_per_token`. Formulas follow Narayanan et al. 2021 (Megatron-LM,
"Efficient Large-Scale Language Model Training on GPU Clusters") and PaLM (Chowdhery et al.
2022, appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPTConfig


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops_bf16: float  # dense (no 2:4 sparsity) bf16 tensor-core peak
    memory_gb: float  # nominal capacity, in GB of 1e9 bytes
    gpus_per_node: int = 8


# Nominal capacities in decimal GB sit below what the cards really hold (an "80GB" A100 has
# 80 GiB = 85.9e9 bytes), so a plan that fits here leaves some room for the CUDA context.
GPUS: dict[str, GPUSpec] = {
    "a100-80gb": GPUSpec("a100-80gb", peak_tflops_bf16=312.0, memory_gb=80.0),
    "h100-80gb": GPUSpec("h100-80gb", peak_tflops_bf16=989.0, memory_gb=80.0),
    "h200-141gb": GPUSpec("h200-141gb", peak_tflops_bf16=989.0, memory_gb=141.0),
}


def get_gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError(f"gpu: unknown GPU '{name}' (expected one of {', '.join(GPUS)})") from None


def megatron_flops_per_iteration(
    batch: int, seq_len: int, n_layer: int, d_model: int, vocab: int, recompute: bool = True
) -> float:
    """FLOPs of one training iteration of `batch` sequences, as Megatron-LM and MT-NLG count them.

    A layer's forward pass costs 24·B·s·h² (QKV, attention output and the 4h MLP matmuls) plus
    4·B·s²·h (scores and the weighted sum); the backward pass costs twice the forward. The
    logit layer costs 2·B·s·h·V forward and is never recomputed. With full activation
    recomputation each layer runs its forward twice, four passes in all:

        96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))

    Without recomputation three passes remain. The logit term keeps its 6·B·s·h·V, so against
    the smaller 72 prefactor it becomes V/(12·l·h), not V/(16·l·h):

        72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))

    The recompute count is what the hardware executes (the paper's TFLOP/s per GPU); the
    count without it is the model's own work, the numerator of MFU.
    """
    b, s, l, h, v = float(batch), float(seq_len), float(n_layer), float(d_model), float(vocab)
    if recompute:
        return 96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
    return 72.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h))


def matmul_parameters(config: GPTConfig) -> int:
    """Parameters that take part in a matmul for every token: all but the position embedding.

    The token embedding counts: tied, it is also the output layer, a 2·h·V matmul per token.
    The position embedding is only a table lookup. Biases and LayerNorms are included; they
    are under 0.01% of any preset's count and keep the number equal to what users read as N.
    """
    l, h, v = config.n_layer, config.d_model, config.vocab_size
    per_layer = 12 * h * h + 13 * h  # qkv 3h²+3h, proj h²+h, fc1 4h²+4h, fc2 4h²+h, two LayerNorms 4h
    return l * per_layer + v * h + 2 * h  # + token embedding and the final LayerNorm


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Model FLOPs of one training token (forward and backward, no recompute), PaLM-style: 6·N + 12·l·s·h.

    N is `matmul_parameters(config)`: every parameter except the position embedding (see
    there). 12·l·s·h is the attention's QKᵀ and AV work, counted over the full s×s matrix as
    PaLM does. Multiply by tokens per second and divide by the GPUs' peak to get MFU.
    """
    s = config.seq_len if seq_len is None else seq_len
    return 6.0 * matmul_parameters(config) + 12.0 * config.n_layer * s * config.d_model


# FLOPs a parameter makes per token: forward and backward (6), forward and the activations' backward
# only (LoRA: the backbone's weights take no gradient), forward only (a frozen backbone).
PASSES = {"full": 6.0, "lora": 4.0, "frozen": 2.0}
# The attention's QKᵀ and AV have no weights: their backward is whole unless nothing runs backward.
ATTENTION_PASSES = {"full": 6.0, "lora": 6.0, "frozen": 2.0}


def sequence_flops(config: GPTConfig, lengths: np.ndarray, *, lm_head: bool = True, mode: str = "full") -> float:
    """Model FLOPs of training on sequences of these token counts, each attending over its own length.

    `flops_per_token` is this for sequences of the context's length. A fine-tuning batch holds shorter
    ones, padding aside: a sequence of L tokens costs L·(6·N + 12·l·L·h), not L·(6·N + 12·l·s·h) with s
    the context. A classifier pools hidden states, so it makes no vocabulary logits (`lm_head=False`:
    N without the tied output layer's V·h). `mode` is the fine-tuning mode (see PASSES).
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    params = matmul_parameters(config) - (0 if lm_head else config.vocab_size * config.d_model)
    attention = 2.0 * ATTENTION_PASSES[mode] * config.n_layer * config.d_model  # 12·l·h when it trains
    return float(PASSES[mode] * params * lengths.sum() + attention * (lengths**2).sum())
