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


def run_tokens(cfg: TrainSection, seq_len: int) -> int | None:
    """Tokens a run of `seq_len`-token sequences consumes before `max_steps` / `max_tokens` end it.

    Follows the batch ramp-up step by step (at one data-parallel rank; more ranks round each batch
    down to whole micro-batches, so they take at most this many). None when neither bound is set.
    """
    if cfg.max_steps is None:
        return cfg.max_tokens
    tokens = 0
    for _ in range(cfg.max_steps):
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            break
        tokens += global_batch(tokens, cfg, 1) * seq_len
    return tokens
