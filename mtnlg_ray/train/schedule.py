"""The MT-NLG schedule, driven by tokens consumed: LR warm-up then cosine decay, and batch ramp-up.

Both are pure functions of the token count, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math

from mtnlg_ray.config import TrainSection


def learning_rate(tokens: int, cfg: TrainSection) -> float:
    """Linear warm-up to `lr` over `warmup_tokens`, cosine decay to `lr * min_lr_ratio` by `decay_tokens`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
        return peak * tokens / cfg.warmup_tokens
    span = max(1, cfg.decay_tokens - cfg.warmup_tokens)
    progress = min(1.0, max(0.0, (tokens - cfg.warmup_tokens) / span))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch(tokens: int, cfg: TrainSection, dp: int) -> int:
    """Sequences in the next step: ramped from `start` by `increment` (MT-NLG: 32 → 1920 over 12B tokens).

    Always a multiple of micro_batch_size × dp, so every rank runs whole micro-batches.
    """
    unit = cfg.micro_batch_size * dp
    target = cfg.global_batch_size
    ramp = cfg.batch_rampup
    if ramp is not None and target > ramp.start and ramp.tokens > 0:
        steps = math.ceil((target - ramp.start) / ramp.increment)
        stage = min(steps, int(tokens / (ramp.tokens / steps)))
        target = min(target, ramp.start + stage * ramp.increment)
    return max(unit, (target // unit) * unit)


def run_tokens(cfg: TrainSection, seq_len: int, dp: int = 1, examples: int | None = None) -> int | None:
    """Tokens a run of `seq_len`-token sequences consumes before `max_steps`, `max_tokens` or its
    epochs over `examples` sequences end it, whichever comes first.

    Follows the batch ramp-up step by step, each batch whole micro-batches at `dp` data-parallel
    ranks, as the workers take it. None when nothing bounds the run (or only epochs, with
    `examples` unknown).
    """
    epochs = cfg.epoch_limit()
    by_epochs = epochs * examples if epochs is not None and examples else None
    if cfg.max_steps is None and by_epochs is None:
        return cfg.max_tokens
    tokens = cursor = step = 0
    while not ((cfg.max_steps is not None and step >= cfg.max_steps)
               or (cfg.max_tokens is not None and tokens >= cfg.max_tokens)
               or (by_epochs is not None and cursor >= by_epochs)):
        batch = global_batch(tokens, cfg, dp)
        tokens += batch * seq_len
        cursor += batch
        step += 1
    return tokens
