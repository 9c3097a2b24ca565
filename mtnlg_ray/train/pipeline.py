"""Pipeline parallelism for the plain GPT: the model cut into stages by layer, one
`torch.distributed.pipelining` stage per part, and a schedule (GPipe, 1F1B, interleaved 1F1B or
interleaved zero-bubble) that runs the MT-NLG gradient-accumulation micro-batches through them.

Each pipeline rank holds `parallel.pp_virtual` parts (one, except for interleaved schedules): rank r
holds stages r, r + pp, r + 2·pp, ... The first stage embeds, the last one holds the final LayerNorm
and the tied LM head (with its own copy of the token embedding, kept equal to the first stage's by
summing the two copies' gradients every step, as Megatron does).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor

from mtnlg_ray.errors import ConfigError

# name → (schedule class, whether it runs several stages a rank)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, False),
    "1f1b": (Schedule1F1B, False),
    "interleaved-1f1b": (ScheduleInterleaved1F1B, True),
    "interleaved-zero-bubble": (ScheduleInterleavedZeroBubble, True),
}
# Forward-only evaluation, where 1F1B's minimum micro-batch count does not apply.
EVAL_SCHEDULES = {"gpipe": (ScheduleGPipe, False), "looped-bfs": (ScheduleLoopedBFS, True)}


def stage_layers(n_layer: int, stages: int, override: list[int] | None = None) -> list[range]:
    """Which layers each of `stages` stages runs: `override` (layers per stage, in order), or an even
    split with the first stages taking one more when `n_layer` does not divide."""
    if override is not None:
        if len(override) != stages or any(n < 1 for n in override) or sum(override) != n_layer:
            raise ConfigError(
                f"parallel.pp_layers: expected {stages} positive layer counts (one a stage) adding up to "
                f"model.n_layer={n_layer}, got {override}"
            )
        counts = list(override)
    else:
        if stages > n_layer:
            raise ConfigError(f"parallel.pp: {stages} pipeline stages for {n_layer} layers leaves stages empty")
        base, extra = divmod(n_layer, stages)
        counts = [base + (1 if i < extra else 0) for i in range(stages)]
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stages_of_rank(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds (looped: r, r + pp, ...)."""
    return [pp_rank + v * pp for v in range(virtual)]


def check_schedule(name: str, pp: int, virtual: int) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule: expected one of {', '.join(SCHEDULES)}, got {name!r}")
    multi = SCHEDULES[name][1]
    if multi and virtual < 2:
        raise ConfigError(f"parallel.pp_schedule={name} runs several stages a rank: set parallel.pp_virtual >= 2")
    if not multi and virtual != 1:
        raise ConfigError(
            f"parallel.pp_virtual={virtual} needs an interleaved schedule (interleaved-1f1b or "
            f"interleaved-zero-bubble), not {name}"
        )


def schedule_for(name: str, n_microbatches: int, pp: int) -> str:
    """The schedule a step with `n_microbatches` runs: `name`, or, while the batch ramp-up gives fewer
    micro-batches than pipeline ranks (which torch's 1F1B refuses), GPipe; with n <= pp both keep all
    n micro-batches in flight on the first stage, so the memory is the same."""
    if name != "gpipe" and n_microbatches < pp:
        return "looped-bfs" if SCHEDULES[name][1] else "gpipe"
    return name


def check_micro_batches(name: str, n_microbatches: int, pp: int) -> None:
    """Interleaved schedules run micro-batches in rounds of pp: a count past one round must fill whole rounds."""
    if not SCHEDULES[name][1] or n_microbatches < pp:
        return
    rounds = n_microbatches // pp
    if n_microbatches % rounds:
        raise ConfigError(
            f"parallel.pp_schedule={name}: {n_microbatches} micro-batches a step do not split into "
            f"{rounds} rounds of pp={pp}; use a global batch that gives a multiple of pp micro-batches"
        )


def build_schedule(
    parts: list[nn.Module],
    stage_ids: list[int],
    num_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    name: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """A pipeline schedule over this rank's parts for `n_microbatches` micro-batches a step, and its
    stages (this rank's).

    Gradients are the mean over micro-batches (the schedule scales them), as gradient accumulation
    without a pipeline gives them.
    """
    group = pp_mesh.get_group()
    stages = [PipelineStage(part, stage, num_stages, device, group=group) for part, stage in zip(parts, stage_ids)]
    schedule_class, multi = {**SCHEDULES, **EVAL_SCHEDULES}[name]
    if multi:
        return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn), stages
    return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn), stages


class TiedEmbeddingSync:
    """Sum the token embedding's gradient between its two copies (first stage, last stage) every step.

    One process group per (dp, tp) coordinate, holding the pipeline rank of the first stage and the
    one of the last; every rank creates them all (a collective), and joins its own when it holds a copy.
    """

    def __init__(self, mesh: DeviceMesh, parts: list[nn.Module], first_rank: int, last_rank: int) -> None:
        self.weights = [part.tok_emb.weight for part in parts if getattr(part, "tok_emb", None) is not None]
        self.group = None
        if first_rank == last_rank:
            return  # both copies on one rank are one parameter already
        ranks = mesh.mesh  # (pp, dp, tp) global ranks
        me = dist.get_rank()
        for d in range(ranks.shape[1]):
            for t in range(ranks.shape[2]):
                pair = [int(ranks[first_rank, d, t]), int(ranks[last_rank, d, t])]
                group = dist.new_group(pair)
                if me in pair:
                    self.group = group

    @torch.no_grad()
    def __call__(self) -> None:
        if self.group is None:
            return
        for weight in self.weights:
            grad = weight.grad
            if isinstance(grad, DTensor) and grad.placements != weight.placements:
                # A vocabulary-parallel lookup leaves its gradient replicated; the head's is sharded.
                grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.group)


class PipelineRunner:
    """Runs a step (forward and backward of every micro-batch) or an evaluation through this rank's
    pipeline stages, and keeps the tied embedding's two copies equal."""

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], num_stages: int, mesh: DeviceMesh,
                 device: torch.device, schedule: str, loss_fn: Callable,
                 loss_context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        """`loss_context()` is entered around every schedule run (the loss-parallel context under tp)."""
        self.parts, self.stage_ids, self.num_stages = parts, stage_ids, num_stages
        self.mesh, self.device, self.schedule, self.loss_fn = mesh, device, schedule, loss_fn
        self.loss_context = loss_context
        self.holds_first, self.holds_last = 0 in stage_ids, num_stages - 1 in stage_ids
        pp = mesh["pp"].size()
        self.tied = TiedEmbeddingSync(mesh, parts, first_rank=0, last_rank=pp - 1)
        # The last stage's copy of the embedding is the first stage's again: counted once in the norm.
        self.duplicates = tuple(part.tok_emb.weight for part, stage in zip(parts, stage_ids)
                                if stage == num_stages - 1 and stage != 0 and part.tok_emb is not None)
        self._schedules: dict[tuple[str, int], tuple[object, list[PipelineStage]]] = {}
        self.last_schedule = ""  # the class of torch's schedule the last training step ran (its metrics say)

    def _schedule(self, name: str, n_microbatches: int):
        key = (name, n_microbatches)
        if key not in self._schedules:
            # One schedule at a time: each one's stages hold a receive buffer a micro-batch, and keeping
            # one for every micro-batch count a batch ramp-up passes through adds up to tens of GiB of
            # buffers at GPT-3 sizes.
            self._schedules.clear()
            self._schedules[key] = build_schedule(self.parts, self.stage_ids, self.num_stages, self.mesh["pp"],
                                                  self.device, name, n_microbatches, self.loss_fn)
        return self._schedules[key][0]

    def _run(self, schedule, inputs: torch.Tensor, targets: torch.Tensor, train: bool) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.holds_first else ()
        kwargs = {"target": targets, "losses": losses} if self.holds_last else {}
        kwargs["return_outputs"] = False  # the losses are all the loop needs
        with self.loss_context():
            (schedule.step if train else schedule.eval)(*args, **kwargs)
        mean = torch.stack([loss.detach() for loss in losses]).mean() if losses else torch.zeros((), device=self.device)
        # Only the last stage computed a loss: the pipeline's other ranks learn it by a sum.
        dist.all_reduce(mean, group=self.mesh["pp"].get_group())
        return mean

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, n_microbatches: int) -> torch.Tensor:
        """Forward and backward of `n_microbatches` micro-batches; returns their mean loss (every rank)."""
        for part in self.parts:
            part.train()
        name = schedule_for(self.schedule, n_microbatches, self.mesh["pp"].size())
        schedule = self._schedule(name, n_microbatches)
        self.last_schedule = type(schedule).__name__
        loss = self._run(schedule, inputs, targets, train=True)
        self.tied()
        return loss

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor, n_microbatches: int) -> torch.Tensor:
        """The mean loss of forward passes only (a schedule with no minimum micro-batch count)."""
        for part in self.parts:
            part.eval()
        name = "gpipe" if not SCHEDULES[self.schedule][1] else "looped-bfs"
        loss = self._run(self._schedule(name, n_microbatches), inputs, targets, train=False)
        # Forward-only, a stage keeps every micro-batch's outputs (the last stage's logits) until its
        # schedule runs again: dropped now rather than held through the training steps that follow.
        for stage in self._schedules[(name, n_microbatches)][1]:
            stage.clear_runtime_states()
        return loss
