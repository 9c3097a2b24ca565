"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Several prompts of different lengths decode together: rows are left-padded, a key mask hides the
padding, and each row draws from its own seed and token counter, so a row's text does not depend
on what else is in the batch. `decode` yields one token per row per step (for streaming);
`generate` collects the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mtnlg_ray.errors import InputError
from mtnlg_ray.model.gpt import GPT, KVCache

MIN_TEMPERATURE = 1e-6  # smaller positive temperatures sample as this one (see sample_next)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens: expected a positive integer, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature: expected a finite value >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k: expected a value >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise InputError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # signed or unsigned: 64 bits
            raise InputError(f"seed: expected a 64-bit integer, -2**63 to 2**64 - 1, got {self.seed}")


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens or the context is full)


def check_prompt(prompt: Sequence[int], context: int) -> None:
    if len(prompt) == 0:
        raise InputError("prompt: expected at least one token, got an empty prompt")
    if len(prompt) >= context:
        raise InputError(
            f"prompt: {len(prompt)} tokens leave no room to generate in the model's context of {context} tokens"
        )


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding 32-bit values, with no product past 2**48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's finaliser: every input bit flips about half of the output bits.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_draws(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1] per row, a function of (seed, counter) alone (float64).

    A counter-based generator: row i's draw for its n-th token depends on nothing else in the batch
    and needs no generator object per row, so a whole batch draws in a few tensor ops.
    """
    lo, hi = seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF
    h = _mix32(lo ^ _mix32(hi ^ _mix32((counters + 0x9E3779B9) & 0xFFFFFFFF)))
    return (h.double() + 1.0) / 2.0**32


def random_seed() -> int:
    """A seed for a request that gave none, from torch's global generator (so `torch.manual_seed` fixes it)."""
    return int(torch.randint(0, 2**62, ()).item())


def sample_next(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int]
) -> torch.Tensor:
    """One token per row from last-position logits (B, V), each row under its own settings.

    Temperature, top-k and top-p apply to the whole batch at once; the draw is inverse-CDF sampling
    with `uniform_draws(seed, counter)`, where the counter is the index of the token being made. So a
    seeded row gets the same text whatever else is in the batch, in `decode` and in the server alike.
    """
    greedy = logits.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    device = logits.device
    V = logits.shape[1]
    # Far below MIN_TEMPERATURE the scaled logits overflow float32 to inf and softmax gives NaN. At it, a
    # token 1e-4 under the best logit already has e^-100 of its mass: sampling is greedy in all but ties.
    temperature = torch.tensor([max(p.temperature, MIN_TEMPERATURE) if p.temperature else 1.0 for p in params],
                               device=device)
    scores = logits.float() / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(top_k):
        k = torch.tensor(top_k, device=device)
        kth = torch.topk(scores, max(top_k), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = kth.masked_fill(k[:, None] == 0, float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=device)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
        drop[:, 0] = False  # a top_p under float32's least (1e-50, say) is 0 here and would drop every token
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    cdf = probs.double().cumsum(dim=-1)
    # A seed's 64 bits, signed or not, are its draws: 2**64 - 1 draws as -1 (they were taken mod 2**63).
    u = uniform_draws(torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64, device=device),
                      torch.tensor(list(counters), dtype=torch.int64, device=device))
    # The first token whose cumulative mass reaches u * total: u > 0, so never a token of zero mass.
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=V - 1)
    is_greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
    return torch.where(is_greedy, greedy, sampled)


@torch.inference_mode()
def decode(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    eos_id: int | None = None,
    vocab_limit: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token, or None for rows that have finished.

    `vocab_limit` is the tokenizer's real vocabulary: ids past it (the padding of the embedding)
    are never sampled.
    """
    if not prompts:
        return
    config = model.config
    per_row = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} sampling settings for {len(prompts)} prompts")
    for prompt in prompts:
        check_prompt(prompt, config.seq_len)
    device = model.tok_emb.weight.device
    dtype = model.tok_emb.weight.dtype
    vocab_limit = min(vocab_limit or config.vocab_size, config.vocab_size)

    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    max_new = max(p.max_tokens for p in per_row)
    # Left padding puts a short row's tokens in later slots than its positions: its context ends
    # `width - len` slots after the longest row's, so the cache holds that many more.
    room = [config.seq_len - len(p) + 1 for p in prompts]  # tokens a row can make before its context is full
    cache = KVCache(config, batch, min(config.seq_len + width - int(lengths.min()), width + max_new), device, dtype)

    idx = torch.zeros(batch, width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
    slots = torch.arange(width, device=device)
    real = slots[None, :] >= (width - lengths)[:, None]  # (B, width): True where a prompt token sits
    cache.key_valid[:, :width] = real
    padded = bool((lengths != width).any())

    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0) if padded else None
    mask = None
    if padded:
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # Pad queries attend to themselves so their rows stay finite; no real query ever sees them.
        mask = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]  # (B, 1, width, width)
    logits = model(idx, positions=positions, cache=cache, attn_mask=mask, last_only=True)[:, -1, :vocab_limit]

    seeds = [p.seed if p.seed is not None else random_seed() for p in per_row]
    next_pos = lengths.clone()
    done = [False] * batch
    produced = [0] * batch
    while True:
        tokens = sample_next(logits, per_row, seeds, produced)
        step: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                step.append(None)
                continue
            step.append(token)
            produced[row] += 1
            if ((per_row[row].stop_at_eos and token == eos_id) or produced[row] >= per_row[row].max_tokens
                    or produced[row] >= room[row]):
                done[row] = True
        yield step
        if all(done) or cache.length >= cache.max_len:
            return
        mask = None
        if padded:  # without padding every cached key is valid and no mask is needed
            cache.key_valid[:, cache.length] = True
            mask = cache.key_valid[:, None, None, : cache.length + 1]
        # A finished row still rides along (its tokens are dropped); keep its position inside the context.
        positions = next_pos.clamp(max=config.seq_len - 1)[:, None] if padded else None
        logits = model(tokens[:, None], positions=positions, cache=cache, attn_mask=mask)[:, -1, :vocab_limit]
        if padded:
            next_pos += 1


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    eos_id: int | None = None,
    vocab_limit: int | None = None,
) -> list[Completion]:
    """Generate for a batch of prompts; each completion ends at EOS ("stop") or its limit ("length")."""
    per_row = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    results = [Completion([], "length") for _ in prompts]
    for step in decode(model, prompts, per_row, eos_id, vocab_limit):
        for row, token in enumerate(step):
            if token is not None:
                results[row].tokens.append(token)
    for completion, p in zip(results, per_row):
        if p.stop_at_eos and completion.tokens and completion.tokens[-1] == eos_id:
            completion.finish_reason = "stop"
    return results
