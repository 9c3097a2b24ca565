"""`train_loop_per_worker`: the one training loop every Ray Train worker runs, for pretraining and fine-tuning.

Builds the (pp, dp, tp) mesh and this rank's part of the model (from the seed or `init.checkpoint`,
on the meta device first), lets the task (`train/tasks.py`) wrap it, parallelises it, resumes from the
newest checkpoint if there is one, and steps through the MT-NLG schedule: batch ramp-up with gradient
accumulation at a fixed micro-batch (the pipeline's micro-batches under pp), LR warm-up and cosine
decay by tokens, AdamW (0.9, 0.95), clipping. Rank 0 appends one JSON line per step to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mtnlg_ray.config import Config
from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPT, GPTConfig, parameter_kinds, pipeline_part
from mtnlg_ray.publish import copy_directory
from mtnlg_ray.train.checkpoint import (
    TrainerState,
    CheckpointManager,
    load_consolidated_slices,
)
from mtnlg_ray.train.data import GlobalOrder, rank_slice
from mtnlg_ray.train.parallel import (
    ParallelDims,
    clip_grad_norm,
    full_state_dict,
    full_state_dict_of_stages,
    initialise_shards,
    local_grad_bytes,
    local_optimizer_bytes,
    local_param_bytes,
    loss_parallel_context,
    max_over_world,
    mean_over_dp,
    no_grad_sync,
    param_groups,
    parallelize,
    wrap_ddp,
    plain,
)
from mtnlg_ray.train.pipeline import PipelineRunner, stage_layers, stages_of_rank
from mtnlg_ray.train.schedule import global_batch, learning_rate
from mtnlg_ray.train.tasks import make_task


# Steps into a run (or a resumed run) after which a CPU worker times its matmul peak again.
PEAK_REMEASURE_STEP = 3


def measured_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, trials: int = 5) -> float:
    """Achievable matmul TFLOP/s of this worker: the MFU denominator when no peak is configured.

    The fastest of `trials` timings. Another process can only slow a timing down, so the fastest is the
    closest to what the worker reaches. A single timing, taken at a busy moment, once measured 0.086
    TFLOP/s on a 2-core VM whose idle reading is 0.18, and that run logged MFU of 120-128 %. A burst
    longer than all the trials still reads low (0.129 at one start, MFU 106 %), so on CPU the training
    loop times it again `PEAK_REMEASURE_STEP` steps in and keeps the higher reading.
    """
    n = 1024 if device.type == "cpu" else 8192
    # Its own generator: a draw from the global one would shift the dropout masks of a run that
    # times its peak after restoring a checkpoint's generator states (resume must be exact).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        a @ b
    reps = 3 if device.type == "cpu" else 20
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e12


class MetricsLog:
    """`metrics.jsonl` in the run directory: one object per step or event, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def model_config_for(cfg: Config, tokenizer_vocab: int) -> tuple[GPTConfig, dict | None]:
    """The shape to train: the init checkpoint's, or the preset with the tokenizer's vocabulary."""
    if cfg.init.checkpoint:
        from mtnlg_ray.checkpoint import check_checkpoint
        from mtnlg_ray.errors import CheckpointError

        # The driver calls this before any worker starts: a missing or misshapen tensor is one line here,
        # naming the key (a path alone did not say which of the run's settings to fix).
        try:
            body = check_checkpoint(cfg.init.checkpoint)
        except CheckpointError as error:
            raise CheckpointError(f"init.checkpoint: {error}") from None
        shape = GPTConfig.from_dict(body["model"])
        # The checkpoint fixes the shape; how to train it (dropout, recomputation) is this run's choice.
        return GPTConfig(**{**shape.to_dict(), "dropout": cfg.model.dropout,
                            "activation_checkpointing": cfg.model.activation_checkpointing}), body
    return cfg.model.resolve(tokenizer_vocab=tokenizer_vocab), None


def _build_model(cfg: Config, model_config: GPTConfig, task, dims: ParallelDims, mesh, device,
                 stage: tuple[range, bool, bool] | None = None) -> nn.Module:
    """The task's model on `device`, parallelized over `mesh`, with its starting weights; with `stage`
    (its layers, whether it is the first, whether the last), one pipeline stage of it.

    Built on the meta device, the parallel plan applied, then only each rank's shards are
    materialised and filled: no rank ever holds the whole model. Weights come from `init.checkpoint`
    (each rank reading only its slices of model.safetensors) or, for whatever that does not hold
    (everything when pretraining from scratch, a new task head, LoRA adapters), from the seed and
    the parameter's name (`initial_value`): the same full weights whatever the layout.
    """
    mixed = torch.bfloat16 if cfg.train.precision == "bf16" else None
    with torch.device("meta"):
        model = task.build(GPT(model_config))
    if stage is not None:
        pipeline_part(model, *stage)
    kinds = parameter_kinds(model)
    model = parallelize(model, mesh, fsdp=dims.fsdp, mixed_precision=mixed, sequence_parallel=dims.sequence_parallel,
                        activation_checkpointing=model_config.activation_checkpointing, compile=cfg.train.compile,
                        ddp=False)
    model.to_empty(device=device)
    loaded: set[str] = set()
    if cfg.init.checkpoint:
        from mtnlg_ray.checkpoint import read_checkpoint_config

        previous = read_checkpoint_config(cfg.init.checkpoint).get("task") or {}
        # Continuing from a classifier with the same labels keeps its head; other labels get a new one.
        keep_head = getattr(task, "kind", None) == "classification" and previous.get("labels") == task.labels
        wanted = {name for name in kinds if keep_head or not name.startswith("head.")}
        loaded = load_consolidated_slices(model, Path(cfg.init.checkpoint), wanted)
    fresh = {name: kind for name, kind in kinds.items() if name not in loaded}
    initialise_shards(model, fresh, model_config.init_std, cfg.train.seed)
    # DDP (parallel.fsdp=false) hooks the real parameters
    return wrap_ddp(model, mesh, ParallelDims.of_slice(mesh, dims.fsdp, mixed is not None))


def _build_parts(cfg: Config, model_config: GPTConfig, task, dims: ParallelDims, mesh, device):
    """This rank's model parts and their stage indices: the whole model ([model], [0]), or with
    pipeline parallelism the stages this pipeline rank runs."""
    if dims.pp == 1:
        parts, stage_ids = [_build_model(cfg, model_config, task, dims, mesh, device)], [0]
    else:
        num_stages = dims.pp * dims.pp_virtual
        layers = stage_layers(model_config.n_layer, num_stages, list(dims.pp_layers) if dims.pp_layers else None)
        stage_ids = stages_of_rank(mesh["pp"].get_local_rank(), dims.pp, dims.pp_virtual)
        parts = [_build_model(cfg, model_config, task, dims, mesh, device,
                              (layers[i], i == 0, i == num_stages - 1)) for i in stage_ids]
    # Dropout starts from the seed, however the model was built; each pipeline rank from its own, or
    # later stages would apply the very masks earlier layers drew (one stream on every rank).
    torch.manual_seed(dropout_seed(cfg.train.seed, mesh["pp"].get_local_rank() if dims.pp > 1 else 0))
    return parts, stage_ids


PIPELINE_SEED_STRIDE = 100  # as Megatron offsets each pipeline rank's seed


def dropout_seed(seed: int, pp_rank: int) -> int:
    """The seed of a pipeline rank's dropout stream (pp rank 0, and no pipeline, use `seed` itself)."""
    return seed + PIPELINE_SEED_STRIDE * pp_rank


def _better(value: float, best: float | None, metric: str) -> bool:
    from mtnlg_ray.finetune.tasks import HIGHER_IS_BETTER

    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    stage = loop_config.get("stage", "pretrain")
    run_dir = Path(loop_config["run_dir"])
    tokenizer_file = Path(loop_config["tokenizer"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    par = cfg.parallel
    dims = ParallelDims(world=world, tp=par.tp, pp=par.pp, fsdp=par.fsdp, bf16=cfg.train.precision == "bf16",
                        sequence_parallel=par.sequence_parallel, pp_schedule=par.pp_schedule,
                        pp_virtual=par.pp_virtual, pp_layers=tuple(par.pp_layers) if par.pp_layers else None)
    mesh = dims.build_mesh(device.type)
    tp, pp, dp, dp_rank = dims.tp, dims.pp, dims.dp, mesh["dp"].get_local_rank()
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)

    model_config, _ = model_config_for(cfg, loop_config["vocab_size"])
    task = make_task(loop_config["task"], cfg, model_config, tokenizer_file)
    seq_len = task.seq_len
    if model_config.seq_len < seq_len:
        raise ValueError(f"model context {model_config.seq_len} < packed sequence length {seq_len}")

    dims.validate(model_config)
    if pp > 1 and not hasattr(task, "pipeline_loss"):
        raise ConfigError(f"parallel.pp={pp}: task.kind={task.kind} does not run under pipeline parallelism; "
                          "set parallel.pp=1")
    parts, stage_ids = _build_parts(cfg, model_config, task, dims, mesh, device)
    model = parts[0]
    optimizers = [torch.optim.AdamW(param_groups(part, cfg.train.weight_decay), lr=cfg.train.lr,
                                    betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps) for part in parts]
    pipeline = None
    if pp > 1:
        pipeline = PipelineRunner(parts, stage_ids, pp * dims.pp_virtual, mesh, device, dims.pp_schedule,
                                  task.pipeline_loss, loss_context=lambda: loss_parallel_context(mesh))

    state = TrainerState(world_size=world, dp=dp, tp=tp, pp=pp)
    checkpoints = CheckpointManager(run_dir, parts, optimizers, model_config, rank, layout=(world, dp, tp, pp))
    resumed_from = None
    replayed_best_step = None  # best/'s step when a resumed run will pass it again
    previous = checkpoints.resume()
    if previous is not None:
        state.step, state.tokens, state.cursor = previous.step, previous.tokens, previous.cursor
        state.best_metric, state.stale_evals = previous.best_metric, previous.stale_evals
        resumed_from = {"step": previous.step, "world_size": previous.world_size}
        # best/ is written at every better dev score, checkpoints only every checkpoint.every_steps:
        # best/ may be newer than the checkpoint. Only a model better than it may replace it, and its
        # evaluation, replayed from the checkpoint, starts patience again as it did the first time.
        recorded = _recorded_best(run_dir / "best", cfg.task.dev_metric) if task.keeps_best else None
        if recorded is not None and _better(recorded[0], state.best_metric, cfg.task.dev_metric):
            state.best_metric = recorded[0]
        if recorded is not None and recorded[1] is not None and recorded[1] > state.step:
            replayed_best_step = recorded[1]

    state.warmup_tokens, state.decay_tokens = cfg.train.warmup_tokens, cfg.train.decay_tokens
    state.train_data = loop_config.get("train_data")
    state.task_setup = loop_config.get("task_setup")

    # Measured once setup is done (model built, sharded, loaded; optimizer made), before any step.
    param_bytes = max_over_world(local_param_bytes(parts), device)
    peak_rss = max_over_world(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, device)  # Linux: KiB

    examples = len(task)
    lengths = getattr(task, "lengths", None) if cfg.train.group_by_length else None
    order = GlobalOrder(examples, cfg.train.seed, lengths, cfg.train.global_batch_size)
    epoch_limit = cfg.train.epoch_limit()  # None: max_steps or max_tokens ends the run
    # The peak of the precision the matmuls run in (FSDP casts the compute copies to bf16).
    matmul_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    peak = cfg.train.peak_tflops or measured_peak_tflops(device, matmul_dtype)
    # Model FLOPs per token over the whole training set (pretraining: `flops_per_token` at the
    # context's length); each step's MFU counts the FLOPs of its own examples (`task.flops`).
    mean_flops = task.mean_flops_per_token()
    metric = cfg.task.dev_metric
    trainable = model_trainable_parameters(parts, pipeline)
    schedule = {"pp_schedule": cfg.parallel.pp_schedule, "pp_virtual": cfg.parallel.pp_virtual} if pp > 1 else {}
    log.write(event="start", stage=stage, world_size=world, dp=dp, tp=tp, pp=pp, **schedule, step=state.step,
              resumed_from=resumed_from,
              peak_tflops_per_worker=round(peak, 6), flops_per_token=mean_flops, pid=os.getpid(),
              threads=torch.get_num_threads(),
              examples=examples, trainable_parameters=trainable, local_param_bytes=int(param_bytes),
              peak_rss_bytes=int(peak_rss), time=time.time())
    print(f"[rank {rank}] world size {world} (pp {pp} x dp {dp} x tp {tp}), starting at step {state.step}"
          + (f", resumed from a checkpoint written at world size {resumed_from['world_size']}" if resumed_from else ""),
          flush=True)

    def finished() -> bool:  # whichever bound comes first
        if cfg.train.max_steps is not None and state.step >= cfg.train.max_steps:
            return True
        if cfg.train.max_tokens is not None and state.tokens >= cfg.train.max_tokens:
            return True
        return epoch_limit is not None and state.cursor >= epoch_limit * examples

    micro = cfg.train.micro_batch_size
    # A run that stopped on patience and is started again (the same run.name) stays stopped.
    stopped_early = cfg.train.patience is not None and state.stale_evals >= cfg.train.patience
    first_step = True
    remeasure_at = state.step + PEAK_REMEASURE_STEP
    while not finished() and not stopped_early:
        if state.step == remeasure_at and not cfg.train.peak_tflops and device.type == "cpu":
            # Start-up (Ray, data readers, other workers building) competes for the CPU cores and
            # can slow the first reading; a few steps in, the worker runs as it will for the rest of
            # the run. (A GPU's reading does not share cores, and its 8192² matrices would need
            # memory the optimizer's moments now hold.)
            peak = max(peak, measured_peak_tflops(device, matmul_dtype))
            log.write(event="peak", step=state.step, peak_tflops_per_worker=round(peak, 6))
        started = time.perf_counter()
        batch = global_batch(state.tokens, cfg.train, dp)
        everyone = order.take(state.cursor, batch)
        indices = rank_slice(everyone, dp_rank, dp)
        accum = len(indices) // micro
        lr = learning_rate(state.tokens, cfg.train)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if hasattr(task, "begin_step"):
            task.begin_step(state.step)
        if pipeline is not None:
            # The micro-batches of gradient accumulation are the pipeline's micro-batches.
            local_loss = pipeline.train_step(*task.inputs_targets(task.train, indices, device), accum)
        else:
            model.train()
            local_loss = torch.zeros((), device=device)
            # Each micro-batch's weight in the step: an equal one, or the task's (SFT: its share of the
            # completion tokens that every rank's whole micro-batches hold).
            parts_of_step = [indices[i * micro : (i + 1) * micro] for i in range(accum)]
            scales = [1 / accum] * accum
            if hasattr(task, "loss_scales"):
                trained = np.concatenate([rank_slice(everyone, r, dp)[: accum * micro] for r in range(dp)])
                scales = task.loss_scales(parts_of_step, trained, dp)
            for i in range(accum):
                sync = i == accum - 1
                context = no_grad_sync(model) if not sync else nullcontext()
                with context, loss_parallel_context(mesh):
                    loss = plain(task.loss(model, parts_of_step[i], device)) * scales[i]
                    loss.backward()
                local_loss += loss.detach()
        duplicates = pipeline.duplicates if pipeline is not None else ()
        grad_norm = (clip_grad_norm(parts, cfg.train.grad_clip, pp=pp, exclude=duplicates)
                     if cfg.train.grad_clip > 0 else float("nan"))
        for optimizer in optimizers:
            optimizer.step()
        if first_step:
            # What training holds once everything exists: gradients and the optimizer's moments.
            first_step = False
            held = {"local_grad_bytes": local_grad_bytes(parts),
                    "local_optimizer_bytes": sum(local_optimizer_bytes(o) for o in optimizers),
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            log.write(event="memory", step=state.step + 1, local_param_bytes=int(param_bytes),
                      **{key: int(max_over_world(value, device)) for key, value in held.items()})
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        epoch_before = state.cursor // examples
        step_tokens = task.tokens(everyone)
        step_flops = task.flops(everyone)
        state.step += 1
        state.cursor += batch
        state.tokens += step_tokens
        loss_value = mean_over_dp(local_loss, mesh)
        seconds = time.perf_counter() - started
        tokens_per_s = step_tokens / seconds
        metrics = {
            "step": state.step, "loss": loss_value, "lr": lr, "global_batch": batch, "tokens": state.tokens,
            "tokens_per_s": tokens_per_s, "mfu": step_flops / seconds / (peak * 1e12 * world),
            "grad_norm": grad_norm, "step_time": seconds, "world_size": world, "time": time.time(),
        }
        if pipeline is not None:  # what ran, not what was asked: a ramp-up's short steps run GPipe
            metrics["pp_schedule_ran"] = pipeline.last_schedule
        epoch_ended = state.cursor // examples > epoch_before
        due = epoch_ended if task.eval_every_steps is None else state.step % task.eval_every_steps == 0
        if due or finished():
            dev = (task.evaluate(model, device, micro, mesh) if pipeline is None
                   else _evaluate_pipeline(pipeline, task, micro, mesh, device))
            if epoch_ended or task.eval_every_steps is None:
                metrics["epoch"] = state.cursor / examples
            if dev is not None:
                metrics["val_loss"] = dev.get("loss")
                if set(dev) != {"loss"}:
                    metrics["dev"] = dev
            if dev is not None and task.keeps_best:
                # The first evaluation at or past best/'s step after a resume replays the one best/ was
                # saved from (at another dp the steps may not fall alike): patience starts again there,
                # whatever it scores this time, and best/ is replaced only by a better score.
                replaying = replayed_best_step is not None and state.step >= replayed_best_step
                if replaying:
                    replayed_best_step, state.stale_evals = None, 0
                if _better(dev[metric], state.best_metric, metric):
                    state.best_metric, state.stale_evals = dev[metric], 0
                    _save_consolidated(parts, task, model_config, run_dir / "best", tokenizer_file, rank,
                                       {"trained": {"step": state.step, "dev": {metric: dev[metric]}}})
                    metrics["best"] = True
                elif not replaying:
                    state.stale_evals += 1
                    stopped_early = cfg.train.patience is not None and state.stale_evals >= cfg.train.patience
        log.write(**metrics)
        if state.step % cfg.checkpoint.every_steps == 0 or finished() or stopped_early:
            state.world_size, state.dp, state.tp, state.pp = world, dp, tp, pp
            checkpoints.save(state, metrics, lambda values, directory: ray.train.report(
                values, checkpoint=ray.train.Checkpoint.from_directory(str(directory))))
            log.write(event="checkpoint", step=state.step, world_size=world)
        # No report without a checkpoint: the driver follows metrics.jsonl, and every `ray.train.report`
        # is a barrier through Ray Train's controller that cost 1.4 s a step with 2 workers on 2 cores
        # (40 steps of tiny: 79 s of wall time for 24 s of steps).

    final = run_dir / "final"
    trained = {"trained": {"step": state.step, "tokens": state.tokens}}
    if task.keeps_best and (run_dir / "best").is_dir():
        # The final checkpoint of a fine-tuning run is its best on the dev set.
        if rank == 0:
            copy_directory(run_dir / "best", final)
    else:
        _save_consolidated(parts, task, model_config, final, tokenizer_file, rank, trained, pipeline)
    if rank == 0:
        log.write(event="done", step=state.step, tokens=state.tokens, final=str(final), stopped_early=stopped_early,
                  best_metric=state.best_metric)


def _save_consolidated(parts: list, task, model_config: GPTConfig, output: Path, tokenizer_file: Path, rank: int,
                       extra: dict, pipeline=None) -> None:
    """Gather the full weights (a collective) and let rank 0 write them as a consolidated checkpoint."""
    if pipeline is None:
        full = full_state_dict(parts[0])
    else:
        full = full_state_dict_of_stages(parts, pipeline.mesh)
        with torch.device("meta"):
            order = list(GPT(model_config).state_dict())
        full = {name: full[name] for name in order if name in full}
    if rank == 0:
        task.save(full, model_config, output, tokenizer_file, extra)


def _recorded_best(best_dir: Path, metric: str | None) -> tuple[float, int | None] | None:
    """The dev score `best_dir` was saved with and the step it was saved at (its config.json's
    "trained"), or None."""
    if metric is None:
        return None
    try:
        trained = json.loads((best_dir / "config.json").read_text()).get("trained", {})
    except (OSError, ValueError):
        return None
    score = trained.get("dev", {}).get(metric)
    return None if score is None else (score, trained.get("step"))


def _evaluate_pipeline(pipeline, task, micro: int, mesh, device) -> dict | None:
    """The held-out loss through the pipeline: this rank's share of the eval micro-batches, whole ones only."""
    if len(task.val) == 0:
        return None
    mine = task.eval_indices(micro, mesh)
    batches = max(1, len(mine) // micro)
    mine = mine[: batches * micro] if len(mine) >= micro else mine
    loss = pipeline.evaluate(*task.inputs_targets(task.val, mine, device), batches)
    return {"loss": mean_over_dp(loss, mesh)}


def model_trainable_parameters(parts: list, pipeline) -> int:
    """Trainable parameters of the whole model, counted once (a collective under pipeline parallelism)."""
    duplicates = pipeline.duplicates if pipeline is not None else ()
    count = sum(p.numel() for part in parts for p in part.parameters()
                if p.requires_grad and not any(p is d for d in duplicates))
    if pipeline is None:
        return count
    # Stages hold distinct parameters; DTensor shapes are global, so one (dp, tp) rank's count is its stage's.
    total = torch.tensor([count], dtype=torch.float64, device=pipeline.device)
    dist.all_reduce(total, group=pipeline.mesh["pp"].get_group())
    return int(total.item())

