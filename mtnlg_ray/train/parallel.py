"""Parallelism for the plain GPT, applied from outside: one ("dp", "tp") device mesh owned by
`ParallelDims`, Megatron's tensor-parallel split (blocks, vocabulary, sequence) and FSDP2 (or DDP)
over data-parallel ranks as separate `apply_*` steps, and the helpers a training loop needs around
them (weight-decay groups, global grad clipping, loss parallelism, a consolidated full state dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPT, GPTConfig, initial_value
from mtnlg_ray.train.pipeline import check_schedule, stage_layers

# Megatron's split of one block. qkv is laid out head by head, so its column shards are whole heads
# and attention runs on local heads with no communication; proj and fc2 all-reduce their outputs.
BLOCK_TP_PLAN = {
    "attn.qkv": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(),
}

# With sequence parallelism the residual stream between the tensor-parallel regions is split along
# the sequence (Shard(1)): LayerNorms and dropout run on each rank's T/tp positions, each region
# starts with an all-gather of the sequence and proj / fc2 end it with a reduce-scatter instead of
# an all-reduce (the same bytes moved, a tp-th of the activations kept).
SEQUENCE_PARALLEL_BLOCK_PLAN = {
    "ln1": SequenceParallel(),
    "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                               desired_input_layouts=(Replicate(), None, None, None)),
    "attn.qkv": ColwiseParallel(),
    "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
    "ln2": SequenceParallel(),
    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
}


@dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of one run: its dimensions, their checks and the device mesh they make.

    The driver checks every worker count a run may get with it before any worker starts; each
    worker checks its own and builds the mesh from it, so both refuse the same layouts alike.
    """

    world: int
    tp: int = 1
    pp: int = 1
    fsdp: bool = True
    bf16: bool = False
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    pp_layers: tuple[int, ...] | None = None

    @classmethod
    def of_slice(cls, mesh: DeviceMesh, fsdp: bool, bf16: bool, sequence_parallel: bool = True) -> "ParallelDims":
        """One pipeline stage's (dp, tp) slice of `mesh`: the ranks that hold the same part."""
        return cls(world=mesh["dp"].size() * mesh["tp"].size(), tp=mesh["tp"].size(), fsdp=fsdp, bf16=bf16,
                   sequence_parallel=sequence_parallel)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def fsdp_active(self) -> bool:
        # One data-parallel rank has nothing to shard: FSDP would only add hooks and copies to every
        # step, unless it is also what casts the weights to bf16.
        return self.fsdp and (self.dp > 1 or self.bf16)

    def validate(self, model_config: GPTConfig) -> None:
        if self.tp < 1:
            raise ConfigError(f"parallel.tp: expected a positive integer, got {self.tp}")
        if self.pp < 1:
            raise ConfigError(f"parallel.pp: expected a positive integer, got {self.pp}")
        if self.world % (self.tp * self.pp):
            what = f"parallel.tp x parallel.pp = {self.tp * self.pp}" if self.pp > 1 else f"parallel.tp={self.tp}"
            raise ConfigError(f"{what} must divide the number of workers ({self.world})")
        _tp_divides(model_config, self.tp)
        if self.tp > 1 and self.sequence_parallel and model_config.seq_len % self.tp:
            raise ConfigError(
                f"parallel.sequence_parallel: parallel.tp={self.tp} must divide model.seq_len ({model_config.seq_len}) "
                "to split sequences evenly; or set parallel.sequence_parallel=false"
            )
        if self.tp > 1 and not self.fsdp:
            raise ConfigError(f"parallel.fsdp=false (DDP) works only with parallel.tp=1, got parallel.tp={self.tp}")
        if self.pp > 1 and not self.fsdp:
            raise ConfigError(f"parallel.fsdp=false (DDP) works only with parallel.pp=1, got parallel.pp={self.pp}")
        if self.bf16 and not self.fsdp:
            raise ConfigError("train.precision=bf16 needs parallel.fsdp=true (DDP keeps fp32 weights)")
        if self.pp > 1:
            check_schedule(self.pp_schedule, self.pp, self.pp_virtual)
            if self.pp_schedule == "interleaved-zero-bubble" and self.fsdp_active:
                # Measured: at pp2 x dp2 the stages between the first and the last ended each step with
                # 70-83 % wrong gradients (FSDP reduces them before the split weight-gradient pass).
                raise ConfigError(
                    "parallel.pp_schedule=interleaved-zero-bubble runs only without FSDP (one data-parallel "
                    f"rank in fp32); here dp={self.dp}{' in bf16' if self.bf16 else ''}: use interleaved-1f1b"
                )
            layers = list(self.pp_layers) if self.pp_layers is not None else None
            stages = self.pp * self.pp_virtual
            if layers is None and self.pp_virtual > 1 and stages > model_config.n_layer:  # not pp alone's fault
                raise ConfigError(f"parallel.pp x parallel.pp_virtual = {self.pp} x {self.pp_virtual} = {stages} "
                                  f"pipeline stages for {model_config.n_layer} layers leaves stages empty")
            stage_layers(model_config.n_layer, stages, layers)
        elif self.pp_layers is not None or self.pp_virtual > 1:
            # A forgotten parallel.pp=2 ran one stage without a word; at pp 2 the same setting is checked.
            key = "parallel.pp_layers" if self.pp_layers is not None else f"parallel.pp_virtual={self.pp_virtual}"
            raise ConfigError(f"{key} splits the model into pipeline stages, but parallel.pp=1 (no pipeline): "
                              "set parallel.pp, or leave it out")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The device mesh over all ranks of the default process group: ("dp", "tp"), or with
        pipeline parallelism ("pp", "dp", "tp"); tp ranks are neighbours, pipeline stages farthest apart."""
        if self.tp < 1 or self.pp < 1 or self.world % (self.tp * self.pp):
            raise ConfigError(f"parallel.tp={self.tp} must divide the number of workers ({self.world})")
        if dist.is_initialized() and dist.get_world_size() != self.world:
            raise ConfigError(
                f"build_mesh: world_size={self.world} but the process group has {dist.get_world_size()} ranks"
            )
        if self.pp > 1:
            return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        return init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))


def _tp_divides(config: GPTConfig, tp: int) -> None:
    sizes = {
        "model.n_head": config.n_head,
        "model.d_model": config.d_model,
        "the MLP width 4*model.d_model": 4 * config.d_model,
        "model.vocab_size": config.vocab_size,
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
    sequence_parallel: bool = True,
    pp_schedule: str = "1f1b",
    pp_virtual: int = 1,
    pp_layers: list[int] | None = None,
) -> None:
    """Refuse, on the driver before any worker starts, a layout a worker's `ParallelDims` would reject.

    Every worker count the run may get must be a multiple of tp x pp, so dp stays whole: an elastic
    [min, max] range may start any count between its ends, which with tp x pp > 1 allows a fixed count only.
    """
    low, high = (workers, workers) if isinstance(workers, int) else workers
    group = tp * pp
    bad = [w for w in range(low, high + 1) if group >= 1 and w % group]
    if bad:
        shown = list(workers) if not isinstance(workers, int) else workers
        what = f"parallel.tp={tp}" if pp == 1 else f"parallel.tp={tp} x parallel.pp={pp}"
        unit = "tp" if pp == 1 else "tp x pp"
        fix = f"give a fixed worker count that is a multiple of {unit}" if low != high else f"use a multiple of {unit}"
        raise ConfigError(
            f"parallel.workers: {shown} with {what} lets a run start {bad[0]} worker{'s' if bad[0] != 1 else ''}, "
            f"not a multiple of {unit} (dp would not be whole); {fix}"
        )
    ParallelDims(world=high, tp=tp, pp=pp, fsdp=fsdp, bf16=precision == "bf16", sequence_parallel=sequence_parallel,
                 pp_schedule=pp_schedule, pp_virtual=pp_virtual,
                 pp_layers=tuple(pp_layers) if pp_layers is not None else None).validate(model_config)


def build_mesh(world_size: int, tp: int, device_type: str) -> DeviceMesh:
    """`ParallelDims(world_size, tp).build_mesh(device_type)`."""
    return ParallelDims(world=world_size, tp=tp).build_mesh(device_type)


# Set while `loss_parallel_context` is open: the vocabulary-parallel LM head then hands out its
# logits sharded on the vocabulary, for the loss-parallel cross-entropy; elsewhere (generation,
# exact-match scoring) it gathers them, so callers always see whole logits.
_SHARDED_LOGITS = False


@contextmanager
def loss_parallel_context(mesh: DeviceMesh | None) -> Iterator[None]:
    """Where the training loss and its backward run: with tp > 1, cross-entropy straight from each
    rank's vocabulary shard of the logits (no rank ever holds logits over the whole vocabulary)."""
    global _SHARDED_LOGITS
    if mesh is None or mesh["tp"].size() == 1:
        yield
        return
    _SHARDED_LOGITS = True
    try:
        with loss_parallel():
            yield
    finally:
        _SHARDED_LOGITS = False


def plain(value: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor: the replicated DTensor the loss-parallel cross-entropy returns (no
    communication, and gradients still flow), any other tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _gather_logits(module: nn.Module, inputs, logits: DTensor) -> torch.Tensor | DTensor:
    return logits if _SHARDED_LOGITS else logits.full_tensor()


def _scatter_sequence(module: nn.Module, args: tuple) -> tuple:
    """Before the first block: each rank keeps its slice of the sequence (a local chunk, no communication)."""
    x, *rest = args
    tp_mesh = module._sequence_mesh
    if x.shape[1] % tp_mesh.size():
        raise ValueError(
            f"sequence parallel: a sequence of {x.shape[1]} tokens does not split evenly across "
            f"parallel.tp={tp_mesh.size()} ranks (pad inputs to a multiple of tp, or set parallel.sequence_parallel=false)"
        )
    local = DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
    return (local.redistribute(placements=[Shard(1)]).to_local(), *rest)


def apply_tp(gpt: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron's whole split over the "tp" mesh.

    Blocks: column-parallel qkv / fc1, row-parallel proj / fc2. Vocabulary: the token embedding
    keeps V/tp rows a rank (a lookup outside them gives zeros, summed across ranks), and the tied
    LM head reads the same shard, so each rank computes its slice of the logits. Sequence parallel
    (optional): LayerNorms and dropout inside the blocks run on T/tp positions.
    """
    if gpt.tok_emb is not None:
        parallelize_module(gpt.tok_emb, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    parallelize_module(gpt.head, tp_mesh, PrepareModuleInput(input_layouts=(Replicate(), None),
                                                             desired_input_layouts=(Replicate(), None)))
    gpt.head.register_forward_hook(_gather_logits)
    plan = SEQUENCE_PARALLEL_BLOCK_PLAN if sequence_parallel else BLOCK_TP_PLAN
    rank = tp_mesh.get_local_rank()
    for block in _blocks(gpt):
        parallelize_module(block, tp_mesh, dict(plan))
        # Dropout masks of this rank's own: its heads, and under sequence parallelism its positions
        # (without it the residual stream is whole on every rank and its masks must agree).
        block.attn.tp_rank = rank
        block.sequence_rank = rank if sequence_parallel else None
    if sequence_parallel and gpt.pos_emb is not None:  # the embedding's stage: split the sequence there
        first = gpt.blocks[0]
        first._sequence_mesh = tp_mesh
        first.register_forward_pre_hook(_scatter_sequence)
    if sequence_parallel and gpt.ln_f is not None:
        # The final LayerNorm reads the whole sequence again (as do task heads on hidden states).
        parallelize_module(gpt.ln_f, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))


def _blocks(gpt: GPT) -> list[nn.Module]:
    """The blocks this model (or pipeline stage) holds."""
    return [block for block in gpt.blocks if block is not None]


def apply_ac(gpt: GPT) -> None:
    """Recompute every block's activations in backward (the checkpoint wrapper around each block)."""
    # The model's own flag already recomputes every block; wrapping them again would recompute twice.
    if gpt.config.activation_checkpointing:
        return
    for i, block in enumerate(gpt.blocks):
        if block is not None:
            gpt.blocks[i] = checkpoint_wrapper(block)


def apply_compile(gpt: GPT) -> None:
    # Per block, as torchtitan does: identical blocks reuse one graph, and FSDP's hooks stay outside it.
    for i, block in enumerate(gpt.blocks):
        if block is not None:
            gpt.blocks[i] = torch.compile(block)


def apply_fsdp(model: nn.Module, gpt: GPT, dp_mesh: DeviceMesh, mixed_precision: torch.dtype | None) -> None:
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in _blocks(gpt):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    # The root unit holds tok_emb, pos_emb and ln_f. tok_emb must not get a unit of its own:
    # the tied LM head reads it again after the blocks, when a separate unit would have resharded it.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    fsdp: bool,
    mixed_precision: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    sequence_parallel: bool = True,
    ddp: bool = True,
) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2/DDP to `model` in place (torchtitan's order).

    Every rank must hand in identical weights (same seed or the same checkpoint), or a model on the
    meta device to materialise and initialise afterwards (`initialise_shards`): FSDP keeps each
    rank's own shard of what it is given. The returned module is `model` itself under FSDP and when
    no wrapper is needed (one dp rank in fp32), a `DistributedDataParallel` around it for DDP.
    `model` is a GPT or a task model holding one as `.backbone` (a classifier): the plans apply to
    its GPT and the root FSDP unit is the whole task model. The training loss must run inside
    `loss_parallel_context(mesh)`. `ddp=False` leaves the DDP wrapper to the caller (`wrap_ddp`), for a
    model on the meta device: DDP checks and hooks the parameters it is given, which materialising replaces.
    """
    # One pipeline stage's (dp, tp) slice of the mesh: the ranks that hold this part.
    dims = ParallelDims.of_slice(mesh, fsdp, mixed_precision is not None, sequence_parallel)
    gpt = model if isinstance(model, GPT) else model.backbone
    dims.validate(gpt.config)
    if dims.tp > 1:
        apply_tp(gpt, mesh["tp"], dims.sequence_parallel)
    if activation_checkpointing:
        apply_ac(gpt)
    if compile:
        apply_compile(gpt)
    if dims.fsdp_active:
        apply_fsdp(model, gpt, mesh["dp"], mixed_precision)
        return model
    return wrap_ddp(model, mesh, dims) if ddp else model


def wrap_ddp(model: nn.Module, mesh: DeviceMesh, dims: "ParallelDims") -> nn.Module:
    """`model` in a `DistributedDataParallel` over dp where the layout replicates it on several ranks
    without FSDP; else `model`. Its weights must be real and alike on every dp rank."""
    if dims.fsdp_active or dims.dp == 1:
        return model
    return DistributedDataParallel(model, device_mesh=mesh["dp"])


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
def clip_grad_norm(model: nn.Module | list[nn.Module], max_norm: float, pp: int = 1,
                   exclude: tuple[nn.Parameter, ...] = ()) -> float:
    """Clip all gradients to a global L2 norm of `max_norm`; returns the norm before clipping.

    A collective: every rank calls it and gets the same float. FSDP and TP leave gradients as
    DTensors on two meshes (2D for tensor-parallel weights, the dp mesh for replicated ones), which
    `torch.nn.utils.clip_grad_norm_` cannot stack. Instead each rank sums the squares it holds,
    weighted by 1 / (ranks holding the same elements), and one all-reduce over all ranks adds them.
    `model` is the model, or a pipeline rank's parts (then the world / pp ranks of a stage hold each
    of its parameters, as shards or copies); `exclude` are parameters counted elsewhere (the last
    stage's copy of the tied embedding).
    """
    parts = model if isinstance(model, list) else [model]
    params = [p for part in parts for p in part.parameters() if not any(p is e for e in exclude)]
    world = dist.get_world_size() if dist.is_initialized() else 1
    holders = world // pp
    squares = []
    for param in params:
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
        squares.append(torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2 * (shards / holders))
    device = params[0].device if params else torch.device("cpu")
    # A rank with nothing to add still joins the all-reduce.
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    norm = float(total.sqrt())
    # A Python float scales DTensor and plain gradients alike (a tensor coefficient would mix types).
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for part in parts:
            for param in part.parameters():
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


def local_param_bytes(model: nn.Module | list[nn.Module]) -> int:
    """Bytes of parameters this rank holds: its shards of sharded ones, whole copies of the rest."""
    return sum(_local_bytes(param) for part in _parts(model) for param in part.parameters())


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def local_grad_bytes(model: nn.Module | list[nn.Module]) -> int:
    """Bytes of gradients this rank holds (its shards of sharded parameters' gradients)."""
    return sum(_local_bytes(p.grad) for part in _parts(model) for p in part.parameters() if p.grad is not None)


def _parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return model if isinstance(model, list) else [model]


def local_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (Adam's two moments of its shards, and step counters)."""
    return sum(_local_bytes(value) for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


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


def full_state_dict_of_stages(parts: list[nn.Module], mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """The whole model on rank 0 (empty elsewhere) from every pipeline stage's parts, as
    `GPT().state_dict()` names them. A collective: each stage's ranks gather its weights one tensor at a
    time, the first (dp, tp) rank of the stage keeps them on the CPU and sends them to rank 0 one by one.

    Gathering a stage whole on every rank's device (`get_model_state_dict`), then pickling it to rank 0
    (`gather_object`, which stages the bytes on the device under NCCL), needed a stage on every GPU and
    the whole model on rank 0's at the end of a pp run: more than a GPU holds for the models pp is for.
    """
    leader = mesh["dp"].get_local_rank() == 0 and mesh["tp"].get_local_rank() == 0
    mine: dict[str, torch.Tensor] = {}
    device = torch.device("cpu")
    for part in parts:
        for name, value in part.state_dict().items():
            device = value.device
            full = value.full_tensor() if isinstance(value, DTensor) else value  # a collective in the stage
            if leader:
                mine[_unwrapped_name(part, name)] = full.detach().cpu()
            del full
    if not leader:
        return {}
    pp_group, pp_rank = mesh["pp"].get_group(), mesh["pp"].get_local_rank()
    if pp_rank != 0:
        dist.send_object_list([[(name, tuple(t.shape), t.dtype) for name, t in mine.items()]], group=pp_group,
                              group_dst=0, device=device)
        for tensor in mine.values():
            dist.send(tensor.to(device), group=pp_group, group_dst=0)
        return {}
    merged = dict(mine)
    for source in range(1, mesh["pp"].size()):
        listing: list = [None]
        dist.recv_object_list(listing, group=pp_group, group_src=source, device=device)
        for name, shape, dtype in listing[0]:
            received = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(received, group=pp_group, group_src=source)
            merged[name] = received.cpu()
    return merged


_WRAPPER_PARTS = {"_orig_mod", "_checkpoint_wrapped_module"}


def _unwrapped_name(model: nn.Module, name: str) -> str:
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    if isinstance(model, DistributedDataParallel):
        parts = parts[1:]  # "module."
    return ".".join(parts)
