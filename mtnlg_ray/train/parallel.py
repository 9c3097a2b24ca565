"""Parallelism for the plain GPT, applied from outside: one ("dp", "tp") device mesh, tensor parallel
blocks, FSDP2 (or DDP) over data-parallel ranks, and the helpers a training loop needs around them
(weight-decay groups, global grad clipping, a consolidated full state dict, a global mean loss).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPT, GPTConfig, initial_value

# Megatron's split of one block. qkv is laid out head by head, so its column shards are whole heads
# and attention runs on local heads with no communication; proj and fc2 all-reduce their outputs.
# Embeddings, LayerNorms and the tied LM head stay replicated across tensor-parallel ranks.
BLOCK_TP_PLAN = {
    "attn.qkv": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(),
}


def _tp_divides(config: GPTConfig, tp: int) -> None:
    sizes = {
        "model.n_head": config.n_head,
        "model.d_model": config.d_model,
        "the MLP width 4*model.d_model": 4 * config.d_model,
    }
    for what, size in sizes.items():
        if size % tp:
            raise ConfigError(f"parallel.tp={tp} must divide {what} ({size}) to split it evenly across ranks")


def check_layout(
    model_config: GPTConfig,
    workers: int | tuple[int, int],
    tp: int,
    pp: int,
    *,
    fsdp: bool = True,
    precision: str = "fp32",
) -> None:
    """Refuse, on the driver before any worker starts, a layout `build_mesh` or `parallelize` would reject.

    Every worker count the run may get must be a multiple of tp, so dp stays whole: an elastic
    [min, max] range may start any count between its ends, which with tp > 1 allows a fixed count only.
    """
    if pp != 1:
        raise ConfigError(f"parallel.pp={pp}: pipeline parallelism is not implemented yet; set parallel.pp=1")
    if tp < 1:
        raise ConfigError(f"parallel.tp: expected a positive integer, got {tp}")
    low, high = (workers, workers) if isinstance(workers, int) else workers
    bad = [w for w in range(low, high + 1) if w % tp]
    if bad:
        shown = list(workers) if not isinstance(workers, int) else workers
        fix = "give a fixed worker count that is a multiple of tp" if low != high else "use a multiple of tp"
        raise ConfigError(
            f"parallel.workers: {shown} with parallel.tp={tp} allows {bad[0]} workers, not a multiple of tp "
            f"(dp would not be whole); {fix}"
        )
    _tp_divides(model_config, tp)
    _check_wrapping(tp, fsdp, bf16=precision == "bf16")


def _check_wrapping(tp: int, fsdp: bool, bf16: bool) -> None:
    """What DDP (`parallel.fsdp=false`) cannot do: shard across tp, or hold bf16 parameters."""
    if tp > 1 and not fsdp:
        raise ConfigError(f"parallel.fsdp=false (DDP) works only with parallel.tp=1, got parallel.tp={tp}")
    if bf16 and not fsdp:
        raise ConfigError("train.precision=bf16 needs parallel.fsdp=true (DDP keeps fp32 weights)")


def build_mesh(world_size: int, tp: int, device_type: str) -> DeviceMesh:
    """The 2D ("dp", "tp") mesh over all ranks of the default process group; tp ranks are neighbours."""
    if tp < 1 or world_size % tp:
        raise ConfigError(f"parallel.tp={tp} must divide the number of workers ({world_size})")
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ConfigError(
            f"build_mesh: world_size={world_size} but the process group has {dist.get_world_size()} ranks"
        )
    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    fsdp: bool,
    mixed_precision: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2/DDP to `model` in place (torchtitan's order).

    Every rank must hand in identical weights (same seed or the same checkpoint): FSDP keeps each
    rank's own shard of what it is given. The returned module is `model` itself under FSDP and when
    no wrapper is needed (one dp rank in fp32), a `DistributedDataParallel` around it for DDP.
    `model` is a GPT or a task model holding one as `.backbone` (a classifier): the plans apply to
    its blocks and the root FSDP unit is the whole task model.
    """
    dp, tp = mesh["dp"].size(), mesh["tp"].size()
    gpt = model if isinstance(model, GPT) else model.backbone
    _tp_divides(gpt.config, tp)
    _check_wrapping(tp, fsdp, bf16=mixed_precision is not None)

    if tp > 1:
        for block in gpt.blocks:
            parallelize_module(block, mesh["tp"], dict(BLOCK_TP_PLAN))

    # The model's own flag already recomputes every block; wrapping them again would recompute twice.
    if activation_checkpointing and not gpt.config.activation_checkpointing:
        for i, block in enumerate(gpt.blocks):
            gpt.blocks[i] = checkpoint_wrapper(block)

    if compile:
        # Per block, as torchtitan does: identical blocks reuse one graph, and FSDP's hooks stay outside it.
        for i, block in enumerate(gpt.blocks):
            gpt.blocks[i] = torch.compile(block)

    # One data-parallel rank has nothing to shard: FSDP would only add hooks and copies to every
    # step, unless it is also what casts the weights to bf16.
    if fsdp and (dp > 1 or mixed_precision is not None):
        policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        for block in gpt.blocks:
            fully_shard(block, mesh=mesh["dp"], mp_policy=policy)
        # The root unit holds tok_emb, pos_emb and ln_f. tok_emb must not get a unit of its own:
        # the tied LM head reads it again after the blocks, when a separate unit would have resharded it.
        fully_shard(model, mesh=mesh["dp"], mp_policy=policy)
        return model
    if dp > 1:
        return DistributedDataParallel(model, device_mesh=mesh["dp"])
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (Linear and Embedding weights), not biases or LayerNorm gains.

    Decided by name and the logical shape, so it reads the same on plain, DDP, FSDP and TP parameters.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip all gradients to a global L2 norm of `max_norm`; returns the norm before clipping.

    A collective: every rank calls it and gets the same float. FSDP and TP leave gradients as
    DTensors on two meshes (2D for tensor-parallel weights, the dp mesh for replicated ones), which
    `torch.nn.utils.clip_grad_norm_` cannot stack. Instead each rank sums the squares it holds,
    weighted by 1 / (ranks holding the same elements), and one all-reduce over all ranks adds them
    (every rank of the default group holds a part or a copy of the model).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    squares = []
    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        shards = 1
        if isinstance(grad, DTensor):
            if any(p.is_partial() for p in grad.placements):
                replicated = [Replicate() if p.is_partial() else p for p in grad.placements]
                grad = grad.redistribute(placements=replicated)
            # Shard and FSDP's _StridedShard (whose is_shard() is False) both split a dim.
            placements = enumerate(grad.placements)
            shards = math.prod(grad.device_mesh.size(i) for i, p in placements if not p.is_replicate())
            grad = grad.to_local()
        # float64: an fp32 norm of the embedding gradient is off by ~3e-5 relative on CPU.
        squares.append(torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2 * (shards / world))
    if not squares:
        return 0.0
    total = torch.stack(squares).sum()
    if world > 1:
        dist.all_reduce(total)
    norm = float(total.sqrt())
    # A Python float scales DTensor and plain gradients alike (a tensor coefficient would mix types).
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(coef)
    return norm


@contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter inside: for every micro-batch but the last."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def mean_over_dp(value: torch.Tensor, mesh: DeviceMesh | None) -> float:
    """The mean of a per-rank scalar (a loss) over data-parallel ranks; tp ranks already agree."""
    value = value.detach().float().clone()
    if mesh is not None and mesh["dp"].size() > 1:
        dist.all_reduce(value, group=mesh["dp"].get_group())
        value /= mesh["dp"].size()
    return float(value)


@torch.no_grad()
def initialise_shards(model: nn.Module, kinds: dict[str, tuple[str, tuple[int, ...]]], std: float, seed: int) -> None:
    """Fill a parallelized model materialised with `to_empty` with `GPT.reset_parameters(seed)`'s values.

    One parameter at a time: its full value is made from the seed and its name (the same on every
    rank) and each rank keeps only its own shard, so no rank ever holds more than one whole
    parameter besides its shards, and every layout gets the same full weights.
    """
    options = StateDictOptions(full_state_dict=True, strict=False)
    for name, (kind, shape) in kinds.items():
        set_model_state_dict(model, {name: initial_value(name, kind, shape, std, seed)}, options=options)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shards of sharded ones, whole copies of the rest."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def max_over_world(value: float, device: torch.device) -> float:
    """The largest of a per-rank number over every rank (the value itself without a process group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model as plain CPU tensors on rank 0 (empty elsewhere), as `GPT().state_dict()` names them.

    A collective under FSDP/TP: every rank must call it. Wrapper prefixes (`module.`, `_orig_mod.`,
    the checkpoint wrapper's) are dropped, so the result loads into an unwrapped `GPT`.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # DCP lists compiled blocks after the root's own tensors; restore registration order.
    order = [_unwrapped_name(model, name) for name in model.state_dict()]
    return {name: state[name] for name in order if name in state} | state


_WRAPPER_PARTS = {"_orig_mod", "_checkpoint_wrapped_module"}


def _unwrapped_name(model: nn.Module, name: str) -> str:
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    if isinstance(model, DistributedDataParallel):
        parts = parts[1:]  # "module."
    return ".".join(parts)
