"""`train_loop_per_worker`: the one training loop every Ray Train worker runs.

Builds the (dp, tp) mesh, the model (from the preset or `init.checkpoint`), parallelises it,
resumes from the latest checkpoint if there is one, and steps through the MT-NLG schedule:
batch ramp-up with gradient accumulation at a fixed micro-batch, LR warm-up and cosine decay by
tokens, AdamW (0.9, 0.95), clipping. Rank 0 appends one JSON line per step to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from mtnlg_ray.config import Config
from mtnlg_ray.model.flops import flops_per_token
from mtnlg_ray.model.gpt import GPT, GPTConfig, lm_loss
from mtnlg_ray.train.checkpoint import TrainerState, load_sharded, save_sharded
from mtnlg_ray.train.data import GlobalOrder, TokenShards, rank_slice
from mtnlg_ray.train.parallel import (
    build_mesh,
    clip_grad_norm,
    full_state_dict,
    mean_over_dp,
    no_grad_sync,
    param_groups,
    parallelize,
)
from mtnlg_ray.train.schedule import global_batch, learning_rate


def measured_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Achievable matmul TFLOP/s of this worker: the MFU denominator when no peak is configured."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 5 if device.type == "cpu" else 20
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class MetricsLog:
    """`metrics.jsonl` in the run directory: one object per step or event, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def model_config_for(cfg: Config, dataset_vocab: int) -> tuple[GPTConfig, dict | None]:
    """The shape to train: the init checkpoint's, or the preset with the dataset tokenizer's vocabulary."""
    if cfg.init.checkpoint:
        from mtnlg_ray.checkpoint import read_checkpoint_config

        body = read_checkpoint_config(cfg.init.checkpoint)
        shape = GPTConfig.from_dict(body["model"])
        return GPTConfig(**{**shape.to_dict(), "dropout": cfg.model.dropout}), body
    return cfg.model.resolve(tokenizer_vocab=dataset_vocab), None


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tp = cfg.parallel.tp
    mesh = build_mesh(world, tp, device.type)
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)

    train_data = TokenShards(cfg.data.path, "train")
    val_data = TokenShards(cfg.data.path, "val")
    model_config, _ = model_config_for(cfg, loop_config["vocab_size"])
    if model_config.seq_len < train_data.seq_len:
        raise ValueError(f"model context {model_config.seq_len} < packed sequence length {train_data.seq_len}")
    seq_len = train_data.seq_len

    torch.manual_seed(cfg.train.seed)
    model = GPT(model_config)
    if cfg.init.checkpoint:
        from mtnlg_ray.checkpoint import load_checkpoint

        start_model, _ = load_checkpoint(cfg.init.checkpoint)
        model.load_state_dict(start_model.state_dict())
    model.to(device)
    mixed = torch.bfloat16 if cfg.train.precision == "bf16" else None
    model = parallelize(model, mesh, fsdp=cfg.parallel.fsdp, mixed_precision=mixed,
                        activation_checkpointing=model_config.activation_checkpointing, compile=cfg.train.compile)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps,
    )

    state = TrainerState(world_size=world, dp=dp, tp=tp)
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()  # this run's newest, after a worker failure
    if checkpoint is None and loop_config.get("resume"):
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["resume"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            previous = load_sharded(Path(directory), model, optimizer, rank)
        state.step, state.tokens, state.cursor = previous.step, previous.tokens, previous.cursor
        resumed_from = {"step": previous.step, "world_size": previous.world_size}

    order = GlobalOrder(len(train_data), cfg.train.seed)
    max_tokens = cfg.train.max_tokens or cfg.train.epochs * len(train_data) * seq_len
    max_steps = cfg.train.max_steps
    peak = cfg.train.peak_tflops or measured_peak_tflops(device)
    step_flops = flops_per_token(model_config, seq_len)
    log.write(event="start", world_size=world, dp=dp, tp=tp, step=state.step, resumed_from=resumed_from,
              peak_tflops_per_worker=round(peak, 3), pid=os.getpid(), threads=torch.get_num_threads(),
              time=time.time())
    print(f"[rank {rank}] world size {world} (dp {dp} x tp {tp}), starting at step {state.step}"
          + (f", resumed from a checkpoint written at world size {resumed_from['world_size']}" if resumed_from else ""),
          flush=True)

    micro = cfg.train.micro_batch_size
    while (max_steps is None or state.step < max_steps) and state.tokens < max_tokens:
        started = time.perf_counter()
        batch = global_batch(state.tokens, cfg.train, dp)
        indices = rank_slice(order.take(state.cursor, batch), dp_rank, dp)
        rows = train_data.rows(indices).to(device)
        accum = len(indices) // micro
        lr = learning_rate(state.tokens, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        local_loss = torch.zeros((), device=device)
        for i in range(accum):
            chunk = rows[i * micro : (i + 1) * micro]
            sync = i == accum - 1
            context = no_grad_sync(model) if not sync else nullcontext()
            with context:
                loss = lm_loss(model(chunk[:, :-1]), chunk[:, 1:]) / accum
                loss.backward()
            local_loss += loss.detach()
        grad_norm = clip_grad_norm(model, cfg.train.grad_clip) if cfg.train.grad_clip > 0 else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.cursor += batch
        state.tokens += batch * seq_len
        loss_value = mean_over_dp(local_loss, mesh)
        seconds = time.perf_counter() - started
        tokens_per_s = batch * seq_len / seconds
        metrics = {
            "step": state.step, "loss": loss_value, "lr": lr, "global_batch": batch, "tokens": state.tokens,
            "tokens_per_s": tokens_per_s, "mfu": step_flops * tokens_per_s / (peak * 1e12 * world),
            "grad_norm": grad_norm, "step_time": seconds, "world_size": world,
        }
        if state.step % cfg.train.eval_every == 0 or _finished(state, max_steps, max_tokens):
            metrics["val_loss"] = evaluate(model, val_data, cfg, dp_rank, dp, mesh, device)
        log.write(**metrics)
        if state.step % cfg.checkpoint.every_steps == 0 or _finished(state, max_steps, max_tokens):
            state.world_size, state.dp, state.tp = world, dp, tp
            with tempfile.TemporaryDirectory(prefix="mtnlg-ckpt-") as tmp:
                save_sharded(Path(tmp), model, optimizer, state, model_config, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            log.write(event="checkpoint", step=state.step, world_size=world)
        else:
            ray.train.report(metrics)

    full = full_state_dict(model)
    if rank == 0:
        from mtnlg_ray.checkpoint import save_state_dict

        tokenizer = Path(cfg.data.path) / "tokenizer" / "tokenizer.json"
        save_state_dict(full, model_config, run_dir / "final", tokenizer_json=tokenizer,
                        extra={"trained": {"step": state.step, "tokens": state.tokens}})
        log.write(event="done", step=state.step, tokens=state.tokens, final=str(run_dir / "final"))


def _finished(state: TrainerState, max_steps: int | None, max_tokens: int) -> bool:
    return (max_steps is not None and state.step >= max_steps) or state.tokens >= max_tokens


@torch.no_grad()
def evaluate(model, data: TokenShards, cfg: Config, dp_rank: int, dp: int, mesh, device) -> float | None:
    """Mean loss over the first `eval_batches` micro-batches of the held-out split, across dp ranks."""
    if len(data) == 0:
        return None
    model.eval()
    micro = cfg.train.micro_batch_size
    # Every rank must run the same number of forwards (FSDP gathers weights in each one): an equal
    # share each, or, when there are fewer held-out sequences than ranks, all of them everywhere.
    count = min(len(data), micro * cfg.train.eval_batches * dp) // dp * dp
    everything = np.arange(len(data))[: micro * cfg.train.eval_batches]
    mine = rank_slice(np.arange(count), dp_rank, dp) if count else everything
    total = torch.zeros((), device=device)
    batches = 0
    for start in range(0, len(mine), micro):
        rows = data.rows(mine[start : start + micro]).to(device)
        total += lm_loss(model(rows[:, :-1]), rows[:, 1:])
        batches += 1
    return mean_over_dp(total / batches, mesh)
