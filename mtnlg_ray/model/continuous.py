"""Continuous batching: sequences join and leave a running batch between decode steps.

The batch shares one KV cache whose rows all write their next key at the same column, as in
`decode`; a joining sequence is prefilled on its own and its keys are copied into a free row so
that they end at that column. Each row keeps its own positions, its own key range (a mask hides
everything else) and its own seeded sampler, so its text does not depend on what else is in the
batch. The Serve deployment drives this from one thread; nothing here knows about Ray.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from mtnlg_ray.model.generate import SamplingParams, check_prompt, sample_next
from mtnlg_ray.model.gpt import GPT, KVCache


@dataclass
class Emitted:
    """One new token of one sequence; `finish_reason` is set on its last token."""

    seq_id: int
    token: int
    finish_reason: str | None = None  # "stop" (EOS) or "length" (max_tokens or the context is full)


@dataclass
class _Row:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator
    start: int  # first cache column holding one of this row's keys
    position: int  # position of `token`, the next input (of the last prompt token before the first)
    token: int = 0
    produced: int = 0


@dataclass
class _RowsView:
    """The first rows of the shared cache, seen from `start`: what `GPT.forward` reads and writes."""

    k: torch.Tensor
    v: torch.Tensor
    length: int
    key_valid: torch.Tensor = field(repr=False)


class ContinuousDecoder:
    """A batch of up to `max_rows` sequences that `add` joins, `step` advances and `remove` drops."""

    def __init__(self, model: GPT, max_rows: int, eos_id: int | None = None, vocab_limit: int | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.model = model
        self.config = model.config
        self.max_rows = max_rows
        self.eos_id = eos_id
        self.vocab_limit = min(vocab_limit or self.config.vocab_size, self.config.vocab_size)
        self.device = model.tok_emb.weight.device
        self.dtype = model.tok_emb.weight.dtype
        # Twice the context: every row's keys fit in one context, so after re-aligning the rows at
        # least a context's worth of steps pass before the next re-alignment.
        self.window = 2 * self.config.seq_len
        self.cache = KVCache(self.config, max_rows, self.window, self.device, self.dtype)
        self.length = 0  # the column the next decode step writes
        self.rows: list[_Row] = []  # row i of the batch lives in cache row i
        self._ids = itertools.count()

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, prompt: list[int], params: SamplingParams) -> tuple[int, Emitted]:
        """Prefill a prompt into a free row; returns its sequence id and its first token."""
        if not self.free_rows:
            raise RuntimeError("no free row: check free_rows before add")
        check_prompt(prompt, self.config.seq_len)
        n = len(prompt)
        # Prefilling alone keeps the prompt's attention exactly what a batch of one computes.
        own = KVCache(self.config, 1, n, self.device, self.dtype)
        idx = torch.as_tensor(prompt, dtype=torch.long, device=self.device)[None]
        logits = self.model(idx, cache=own, last_only=True)[:, -1, : self.vocab_limit]

        if not self.rows:
            self.length = 0
        if n > self.length:
            self._realign(n)
        r = len(self.rows)
        start = self.length - n
        self.cache.k[:, r, :, start : self.length] = own.k[:, 0]
        self.cache.v[:, r, :, start : self.length] = own.v[:, 0]
        self.cache.key_valid[r] = False
        self.cache.key_valid[r, start : self.length] = True

        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        row = _Row(next(self._ids), params, generator, start=start, position=n - 1)
        self.rows.append(row)
        token = int(sample_next(logits, [params], [generator])[0])
        return row.seq_id, self._emit(row, token)

    @torch.inference_mode()
    def step(self) -> list[Emitted]:
        """One decode step for every row: each row's next token; finished rows leave the batch."""
        if not self.rows:
            return []
        if self.length >= self.window:
            self._realign(0)
        n = len(self.rows)
        first = min(row.start for row in self.rows)
        self.cache.key_valid[:n, self.length] = True
        view = _RowsView(
            k=self.cache.k[:, :n, :, first:],
            v=self.cache.v[:, :n, :, first:],
            length=self.length - first,
            key_valid=self.cache.key_valid[:n, first:],
        )
        mask = None
        if any(row.start != first for row in self.rows):
            # Rows that joined later own fewer columns; hide the older ones from them.
            mask = view.key_valid[:, None, None, : view.length + 1]
        tokens = torch.tensor([[row.token] for row in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        logits = self.model(tokens, positions=positions, cache=view, attn_mask=mask)[:, -1, : self.vocab_limit]
        self.length += 1
        sampled = sample_next(logits, [row.params for row in self.rows], [row.generator for row in self.rows])
        emitted = [self._emit(row, token) for row, token in zip(list(self.rows), sampled.tolist())]
        return emitted

    def remove(self, seq_id: int) -> bool:
        """Drop a sequence (finished or cancelled); False if it is not in the batch."""
        for r, row in enumerate(self.rows):
            if row.seq_id == seq_id:
                break
        else:
            return False
        last = len(self.rows) - 1
        if r != last:
            # Move the last row into the hole, so the live rows stay the first rows of the cache.
            moved = self.rows[last]
            cols = slice(moved.start, self.length)
            self.cache.k[:, r, :, cols] = self.cache.k[:, last, :, cols]
            self.cache.v[:, r, :, cols] = self.cache.v[:, last, :, cols]
            self.cache.key_valid[r] = self.cache.key_valid[last]
            self.rows[r] = moved
        self.rows.pop()
        return True

    def _emit(self, row: _Row, token: int) -> Emitted:
        row.token = token
        row.produced += 1
        row.position += 1
        finish = None
        if row.params.stop_at_eos and token == self.eos_id:
            finish = "stop"
        elif row.produced >= row.params.max_tokens or row.position >= self.config.seq_len:
            # The same limits as `decode`: a token at position seq_len would have no position embedding.
            finish = "length"
        if finish:
            self.remove(row.seq_id)
        return Emitted(row.seq_id, token, finish)

    def _realign(self, length: int) -> None:
        """Move every row's keys so they end at column max(length, longest row): frees the columns after it."""
        target = max([length] + [self.length - row.start for row in self.rows])
        for r, row in enumerate(self.rows):
            span = self.length - row.start
            new_start = target - span
            if new_start != row.start:
                src = slice(row.start, self.length)
                dst = slice(new_start, target)
                self.cache.k[:, r, :, dst] = self.cache.k[:, r, :, src].clone()
                self.cache.v[:, r, :, dst] = self.cache.v[:, r, :, src].clone()
            self.cache.key_valid[r] = False
            self.cache.key_valid[r, new_start:target] = True
            row.start = new_start
        self.length = target
