"""Plan a 3D-parallel training layout before renting the GPUs: `mtnlg-ray plan`.

From a preset and a tensor × pipeline × data parallel layout, work out the exact parameter
count, parameters and memory per GPU, FLOPs per iteration and, given a measured iteration
time, TFLOP/s per GPU and MFU. Builds the model on the meta device, so 530B plans on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.flops import flops_per_token, get_gpu, megatron_flops_per_iteration
from mtnlg_ray.model.gpt import GPTConfig
from mtnlg_ray.model.presets import build_on_meta, get_preset

# Mixed-precision Adam (ZeRO paper accounting): bf16 weights and bf16 gradients on every
# rank, plus an fp32 master copy and fp32 Adam m and v, 4 + 4 + 4 bytes per parameter.
WEIGHT_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12
GB = 1e9

# Megatron's tensor-parallel plan for a block: QKV and fc1 split by output columns (weights
# and biases), proj and fc2 split by input rows (weights only; their biases are added after
# the all-reduce, so every rank holds them whole). LayerNorms are replicated.
_TP_SHARDED_IN_BLOCK = (
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
)


@dataclass(frozen=True)
class _ParameterCounts:
    total: int  # the tied embedding once
    layer_sharded: int  # per block, split across tp ranks
    layer_replicated: int  # per block, whole on every tp rank
    token_embedding: int  # split along the vocabulary across tp ranks
    first_stage_extra: int  # position embedding, whole on every tp rank
    last_stage_extra: int  # final LayerNorm, whole on every tp rank


@lru_cache(maxsize=32)
def _count_parameters(config: GPTConfig) -> _ParameterCounts:
    model = build_on_meta(config)
    sharded = replicated = 0
    for name, p in model.blocks[0].named_parameters():
        if name in _TP_SHARDED_IN_BLOCK:
            sharded += p.numel()
        else:
            replicated += p.numel()
    first = sum(p.numel() for p in model.pos_emb.parameters())
    token = model.tok_emb.weight.numel()
    total = model.num_parameters()
    last = total - config.n_layer * (sharded + replicated) - token - first
    return _ParameterCounts(total, sharded, replicated, token, first, last)


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


def _layers_per_stage(n_layer: int, pp: int) -> list[int]:
    # Megatron needs n_layer % pp == 0 (warned about); otherwise the first stages take one more.
    base, extra = divmod(n_layer, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def _activation_bytes_per_layer(
    config: GPTConfig, seq_len: int, micro_batch: int, tp: int, sequence_parallel: bool
) -> tuple[float, float]:
    """Bytes one layer keeps for the backward pass of one micro-batch: (stored in full, with full recompute).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
    bf16 activations, 1-byte dropout masks: s·b·h·(34 + 5·a·s/h) without parallelism; tensor
    parallel splits all but 10·s·b·h of it (LayerNorm and dropout inputs); sequence parallel
    splits that too. With full recompute only the layer's input (2·s·b·h) is kept, itself split
    along the sequence under sequence parallel. The 5·a·s/h term is the s×s attention scores and
    softmax; fused flash kernels never store them, so on such kernels the full figure is an upper bound.
    """
    s, b, h, a = seq_len, micro_batch, config.d_model, config.n_head
    sbh = float(s) * b * h
    attention = 5.0 * a * s / h
    if tp == 1 or sequence_parallel:
        full = sbh * (34.0 + attention) / tp
        recomputed = 2.0 * sbh / tp
    else:
        full = sbh * (10.0 + 24.0 / tp + attention / tp)
        recomputed = 2.0 * sbh
    return full, recomputed


def plan_layout(
    preset: str,
    tp: int,
    pp: int,
    dp: int,
    global_batch: int | None = None,
    micro_batch: int = 1,
    seq_len: int | None = None,
    iter_time: float | None = None,
    gpu: str = "a100-80gb",
    vocab_size: int | None = None,
    recompute: bool = True,
    distributed_optimizer: bool = False,
    sequence_parallel: bool = True,
    schedule: str = "1f1b",
    virtual: int = 1,
) -> dict:
    """Parameters, FLOPs, throughput and memory per GPU of `preset` on a tp × pp × dp layout.

    `global_batch` defaults to pp micro-batches per replica (micro_batch·dp·pp), the fewest
    that fill a 1F1B pipeline; `seq_len` and `vocab_size` default to the preset's.

    `params_per_gpu` is the most any stage holds; `memory_gb_per_gpu` is the stage with the
    largest total (`busiest_stage`). Every stage holds its layers, split across tp
    (see `_TP_SHARDED_IN_BLOCK`); the first stage also holds the position embedding and the
    token embedding (split along the vocabulary), and the last stage the final LayerNorm and,
    when pp > 1, its own copy of the tied token embedding for the output layer (as Megatron
    does; the two copies' gradients are all-reduced). `params` counts the tied embedding once.

    Memory: bf16 weights and gradients, fp32 master weights and Adam moments (12 bytes per
    parameter), the latter split over dp with `distributed_optimizer` (ZeRO-1). Activations
    follow `_activation_bytes_per_layer`; under 1F1B, stage i holds min(pp - i, micro-batches)
    micro-batches in flight, and with `recompute` one layer's full activations are live again
    while it is recomputed. The logits and the embedding's output are left out
    (fp32 logits split over tp are ~50 MB per GPU for 530B at tp 8).
    The total counts the variants selected by `recompute` and `distributed_optimizer`.
    """
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batch", micro_batch)):
        _positive_int(name, value)
    if global_batch is not None:
        _positive_int("global_batch", global_batch)
    if iter_time is not None and not 0 < iter_time < math.inf:  # also NaN; inf was 0 TFLOP/s
        raise ConfigError(f"iter_time: expected seconds greater than 0, got {iter_time!r}")
    spec = get_gpu(gpu)
    base = get_preset(preset)
    config = dataclasses.replace(
        base,
        seq_len=base.seq_len if seq_len is None else seq_len,
        vocab_size=base.vocab_size if vocab_size is None else vocab_size,
    )
    if pp > config.n_layer:
        raise ConfigError(f"pp: {pp} pipeline stages for {config.n_layer} layers leaves stages empty")
    if global_batch is None:
        global_batch = micro_batch * dp * pp
    if global_batch < micro_batch * dp:
        raise ConfigError(
            f"global_batch: {global_batch} is smaller than micro_batch × dp = {micro_batch * dp}"
        )
    micro_batches = global_batch // (micro_batch * dp)
    s = config.seq_len
    gpus = tp * pp * dp

    warnings: list[str] = []
    if config.n_head % tp:
        warnings.append(f"n_head {config.n_head} is not divisible by tp {tp}: heads cannot be split evenly")
    if config.d_model % tp:
        warnings.append(f"d_model {config.d_model} is not divisible by tp {tp}")
    if config.vocab_size % tp:
        warnings.append(f"vocab_size {config.vocab_size} is not divisible by tp {tp}: pad the vocabulary")
    if config.n_layer % pp:
        warnings.append(f"n_layer {config.n_layer} is not divisible by pp {pp}: stages get unequal layers")
    if global_batch % (micro_batch * dp):
        warnings.append(
            f"global batch {global_batch} is not divisible by micro_batch × dp = {micro_batch * dp}: "
            f"{micro_batches * micro_batch * dp} sequences per iteration are counted"
        )
        global_batch = micro_batches * micro_batch * dp
    if pp > 1 and micro_batches < pp:
        warnings.append(
            f"{micro_batches} micro-batches per replica cannot fill {pp} pipeline stages: "
            f"bubble is {(pp - 1) / (virtual * micro_batches + pp - 1):.0%} of the iteration"
        )
    if tp > spec.gpus_per_node:
        warnings.append(f"tp {tp} spans more than one {spec.gpus_per_node}-GPU node: its all-reduces leave NVLink")

    counts = _count_parameters(config)
    layers = _layers_per_stage(config.n_layer, pp)
    layer_params = math.ceil(counts.layer_sharded / tp) + counts.layer_replicated
    token_shard = math.ceil(counts.token_embedding / tp)
    full_act, recomputed_act = _activation_bytes_per_layer(config, s, micro_batch, tp, sequence_parallel)

    stages = []
    for i, n in enumerate(layers):
        params_i = n * layer_params
        if i == 0:
            params_i += token_shard + counts.first_stage_extra
        if i == pp - 1:
            params_i += counts.last_stage_extra + (token_shard if pp > 1 else 0)
        # Layer-micro-batches whose activations a stage holds at once: 1F1B's warm-up depth, but all
        # of them under GPipe, which runs every forward before any backward. An interleaved schedule
        # warms up (v - 1) p + 2 (p - 1 - i) + 1 chunks of n / v layers on rank i (torch's schedule;
        # Korthikanti et al.: 1 + (p - 1) / (p v) times 1F1B's on the first rank).
        if pp > 1 and schedule == "gpipe":
            in_flight = n * micro_batches
        elif pp > 1 and schedule.startswith("interleaved"):
            chunks = min((virtual - 1) * pp + 2 * (pp - 1 - i) + 1, micro_batches * virtual)
            in_flight = chunks * n / virtual
        else:
            in_flight = n * min(pp - i, micro_batches)
        act_full = in_flight * full_act
        act_recompute = in_flight * recomputed_act + full_act
        optimizer = OPTIMIZER_BYTES * params_i
        optimizer_dist = optimizer / dp
        memory = {
            "weights": WEIGHT_BYTES * params_i / GB,
            "grads": GRAD_BYTES * params_i / GB,
            "optimizer": optimizer / GB,
            "optimizer_distributed": optimizer_dist / GB,
            "activations": act_full / GB,
            "activations_recompute": act_recompute / GB,
            # What mtnlg-ray's own trainer holds: fp32 weights, gradients and Adam moments (16 bytes
            # a parameter), every one sharded over dp by FSDP2 (bf16 runs keep the same fp32 shards).
            "fsdp_fp32_state": 16 * params_i / dp / GB,
        }
        memory["total"] = (
            memory["weights"]
            + memory["grads"]
            + memory["optimizer_distributed" if distributed_optimizer else "optimizer"]
            + memory["activations_recompute" if recompute else "activations"]
        )
        stages.append((params_i, memory))

    busiest = max(range(pp), key=lambda i: stages[i][1]["total"])
    memory = dict(stages[busiest][1])
    memory["capacity"] = spec.memory_gb
    fits = memory["total"] <= spec.memory_gb
    memory["fits"] = fits
    if not fits:
        warnings.append(
            f"does not fit: stage {busiest} needs {memory['total']:.1f} GB per GPU, "
            f"{spec.name} has {spec.memory_gb:.0f} GB"
        )

    flops = megatron_flops_per_iteration(global_batch, s, config.n_layer, config.d_model, config.vocab_size)
    model_flops = flops_per_token(config) * global_batch * s
    result = {
        "preset": preset,
        "gpu": spec.name,
        "tp": tp,
        "pp": pp,
        "dp": dp,
        "gpus": gpus,
        "seq_len": s,
        "vocab_size": config.vocab_size,
        "global_batch": global_batch,
        "micro_batch": micro_batch,
        "micro_batches": micro_batches,
        "layers_per_stage": max(layers),
        # The share of an iteration a stage idles: (p - 1) / (m + p - 1) for GPipe and 1F1B. Interleaving
        # divides the bubble's time by v (Narayanan et al. 2021), so (p - 1) / (v m + p - 1).
        "pipeline_bubble": (pp - 1) / (virtual * micro_batches + pp - 1),
        "pipeline_schedule": schedule if pp > 1 else None,
        "pipeline_virtual": virtual,
        "params": counts.total,
        "params_per_gpu": max(p for p, _ in stages),
        "flops_per_iteration": flops,
        "model_flops_per_iteration": model_flops,
        "iter_time": iter_time,
        "tflops_per_gpu": None,
        "hfu": None,
        "mfu": None,
        "tokens_per_second": None,
        "recompute": recompute,
        "distributed_optimizer": distributed_optimizer,
        "sequence_parallel": sequence_parallel,
        "busiest_stage": busiest,
        "memory_gb_per_gpu": memory,
        "fits": fits,
        "warnings": warnings,
    }
    if iter_time is not None:
        peak = spec.peak_tflops_bf16 * 1e12
        result["tflops_per_gpu"] = flops / (iter_time * gpus) / 1e12
        result["hfu"] = flops / (iter_time * gpus) / peak
        result["mfu"] = model_flops / (iter_time * gpus) / peak
        result["tokens_per_second"] = global_batch * s / iter_time
    return result


__all__ = ["plan_layout"]
