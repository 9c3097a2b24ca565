"""Continuous batching over a paged KV cache: sequences join and leave a running batch between steps.

`add` admits a prompt when a batch row and enough cache blocks for its whole answer are free (a
prompt that starts with cached blocks reuses them); `decode` advances every sequence that has its
first token by one token; `prefill` computes up to `prefill_chunk` prompt tokens of the sequences
still reading their prompts, all in one batch, so a long prompt is read in chunks between decode
steps instead of stalling them. Each sequence samples from its own seed and token counter, so its
text does not depend on what else is in the batch. The Serve deployment drives this from one
thread; nothing here knows about Ray.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from mtnlg_ray.errors import InputError
from mtnlg_ray.model.generate import SamplingParams, check_prompt, random_seed, sample_next
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.paged import TRASH_BLOCK, BlockPool, PagedBatch, block_key


@dataclass
class Emitted:
    """One new token of one sequence; `finish_reason` is set on its last token."""

    seq_id: int
    token: int
    finish_reason: str | None = None  # "stop" (EOS) or "length" (max_tokens or the context is full)


@dataclass
class _Sequence:
    seq_id: int
    prompt_len: int
    params: SamplingParams
    seed: int
    tokens: list[int]  # the prompt, then each generated token: token i sits at position i
    blocks: list[int] = field(default_factory=list)  # the block table
    reserved: int = 0  # blocks promised by the pool, not yet taken
    cached: int = 0  # tokens whose keys are in the cache
    produced: int = 0
    registered: int = 0  # full blocks offered to the prefix cache
    key: bytes = b""  # the prefix-cache key of the last of those


class ContinuousDecoder:
    """Up to `max_rows` sequences over one block pool of `kv_cache_tokens` token slots."""

    def __init__(
        self,
        model: GPT,
        max_rows: int,
        eos_id: int | None = None,
        vocab_limit: int | None = None,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
        prefix_cache: bool = True,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.model = model
        self.config = model.config
        self.max_rows = max_rows
        self.eos_id = eos_id
        self.vocab_limit = min(vocab_limit or self.config.vocab_size, self.config.vocab_size)
        self.prefill_chunk = prefill_chunk
        self.device = model.tok_emb.weight.device
        # Default: room for every row to fill the whole context, what a dense cache would hold; each row
        # takes whole blocks, so a context that is no multiple of the block size rounds up a row at a time.
        per_row = -(-self.config.seq_len // block_size)
        blocks = -(-kv_cache_tokens // block_size) if kv_cache_tokens is not None else max_rows * per_row
        num_blocks = blocks + 1  # + the padding block
        self.pool = BlockPool(self.config, num_blocks, block_size, self.device, model.tok_emb.weight.dtype,
                              prefix_cache=prefix_cache)
        self.sequences: dict[int, _Sequence] = {}  # in admission order
        self._ids = itertools.count()
        self._positions = torch.arange(self.config.seq_len, device=self.device)
        self._in_block = torch.arange(block_size, device=self.device)

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.sequences

    @property
    def capacity_tokens(self) -> int:
        return self.pool.usable_blocks * self.pool.block_size

    def cache_tokens_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Slots a request takes at most: its last token is never fed back, and nothing goes past the context."""
        return min(prompt_len + max_tokens - 1, self.config.seq_len)

    def fits(self, prompt: list[int], params: SamplingParams) -> bool:
        """Whether the request could ever be admitted (with the pool empty)."""
        return self.cache_tokens_needed(len(prompt), params.max_tokens) <= self.capacity_tokens

    def add(self, prompt: list[int], params: SamplingParams) -> int | None:
        """Admit a prompt and return its sequence id, or None while no row or not enough cache is free
        (an `InputError` if the pool could never hold it). Nothing is computed here: `prefill` reads
        the prompt and makes its first token.
        """
        check_prompt(prompt, self.config.seq_len)
        needed = self.cache_tokens_needed(len(prompt), params.max_tokens)
        if needed > self.capacity_tokens:
            raise InputError(f"prompt + max_tokens: need {needed} tokens of KV cache; this decoder holds "
                             f"{self.capacity_tokens} (kv_cache_tokens)")
        if not self.free_rows:
            return None
        need = self.pool.blocks_for(needed)
        admitted = self.pool.admit(prompt, need)
        if admitted is None:
            return None
        matched, key = admitted
        seq = _Sequence(next(self._ids), len(prompt), params,
                        params.seed if params.seed is not None else random_seed(), list(prompt),
                        blocks=list(matched), reserved=need - len(matched),
                        cached=len(matched) * self.pool.block_size, registered=len(matched), key=key)
        self.sequences[seq.seq_id] = seq
        return seq.seq_id

    def remove(self, seq_id: int) -> bool:
        """Drop a sequence (finished or cancelled) and give back its blocks; False if it is not here."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return False
        self.pool.release(seq.blocks, unused=seq.reserved)
        return True

    def step(self) -> list[Emitted]:
        """A decode step for the running sequences, then a prefill chunk for the joining ones."""
        return self.decode() + self.prefill()

    @torch.inference_mode()
    def decode(self) -> list[Emitted]:
        """One token for every sequence past its prompt; finished sequences leave the batch."""
        seqs = [s for s in self.sequences.values() if s.produced]
        if not seqs:
            return []
        for s in seqs:
            self._take_blocks(s, s.cached + 1)
        cached = torch.tensor([s.cached for s in seqs], device=self.device)
        L = max(s.cached for s in seqs) + 1
        read = self._read_slots(seqs, L)
        write = read.gather(1, cached[:, None]).view(-1)
        mask = None
        if any(s.cached != L - 1 for s in seqs):  # shorter rows must not see the slots past their end
            mask = (self._positions[:L][None, :] <= cached[:, None])[:, None, None, :]
        tokens = torch.tensor([[s.tokens[s.cached]] for s in seqs], device=self.device)
        logits = self.model(tokens, positions=cached[:, None], cache=PagedBatch(self.pool, write, read),
                            attn_mask=mask)[:, -1, : self.vocab_limit]
        for s in seqs:
            s.cached += 1
            self._register_full_blocks(s)
        return self._sample(seqs, logits)

    @torch.inference_mode()
    def prefill(self) -> list[Emitted]:
        """Up to `prefill_chunk` prompt tokens of the joining sequences (oldest first), as one batch;
        a sequence whose prompt is now all read gets its first token."""
        budget, chunks = self.prefill_chunk, []
        for s in self.sequences.values():
            if s.cached >= s.prompt_len:
                continue
            n = min(s.prompt_len - s.cached, budget)
            chunks.append((s, n))
            budget -= n
            if not budget:
                break
        if not chunks:
            return []
        seqs = [s for s, _ in chunks]
        for s, n in chunks:
            self._take_blocks(s, s.cached + n)
        C, T = len(chunks), max(n for _, n in chunks)
        L = max(s.cached + n for s, n in chunks)
        read = self._read_slots(seqs, L)
        idx = torch.zeros(C, T, dtype=torch.long)
        write = torch.full((C, T), TRASH_BLOCK * self.pool.block_size, dtype=torch.long, device=self.device)
        starts = torch.tensor([s.cached for s in seqs], device=self.device)
        ends = torch.tensor([s.cached + n for s, n in chunks], device=self.device)
        for c, (s, n) in enumerate(chunks):
            idx[c, :n] = torch.tensor(s.tokens[s.cached : s.cached + n])
            write[c, :n] = read[c, s.cached : s.cached + n]
        positions = (starts[:, None] + self._positions[:T][None, :]).clamp(max=self.config.seq_len - 1)
        mask = None
        if C > 1 or chunks[0][0].cached > 0:
            # Query t of row c sees the row's keys up to its own position, and never past its chunk's
            # end (so padding queries stay finite); the cached prefix counts as the row's own keys.
            keys = self._positions[:L][None, None, :]
            mask = ((keys <= positions[:, :, None]) & (keys < ends[:, None, None]))[:, None]
        hidden = self.model.hidden_states(idx.to(self.device), positions, cache=PagedBatch(self.pool, write.view(-1),
                                                                                           read), attn_mask=mask)
        done = []
        for c, (s, n) in enumerate(chunks):
            s.cached += n
            self._register_full_blocks(s)
            if s.cached == s.prompt_len:
                done.append((c, n))
        if not done:
            return []
        last = hidden[[c for c, _ in done], [n - 1 for _, n in done]]  # each row's last prompt position
        logits = self.model.head(last, self.model.tok_emb.weight)[:, : self.vocab_limit]
        return self._sample([chunks[c][0] for c, _ in done], logits)

    def stats(self) -> dict:
        # Called from the server's event loop while the decode thread adds and removes sequences: list()
        # copies the dict's values in one step under the GIL, iterating the live view could fail.
        prefilling = sum(1 for s in list(self.sequences.values()) if not s.produced)
        return {"prefilling": prefilling, **self.pool.stats()}

    def _take_blocks(self, seq: _Sequence, tokens: int) -> None:
        """Give `seq` blocks for its first `tokens` positions, out of what it has reserved."""
        while len(seq.blocks) * self.pool.block_size < tokens:
            seq.blocks.append(self.pool.allocate())
            seq.reserved -= 1

    def _read_slots(self, seqs: list[_Sequence], length: int) -> torch.Tensor:
        """(B, length) cache slots of each sequence's positions 0..length-1 (the trash block past its blocks)."""
        width = self.pool.blocks_for(length)
        rows = [s.blocks[:width] for s in seqs]
        table = torch.tensor([row + [TRASH_BLOCK] * (width - len(row)) for row in rows], dtype=torch.long,
                             device=self.device)
        return (table[:, :, None] * self.pool.block_size + self._in_block).view(len(seqs), -1)[:, :length]

    def _register_full_blocks(self, seq: _Sequence) -> None:
        if not self.pool.prefix_cache:
            return
        bs = self.pool.block_size
        while (seq.registered + 1) * bs <= seq.cached:
            i = seq.registered
            seq.key = block_key(seq.key, seq.tokens[i * bs : (i + 1) * bs])
            self.pool.register(seq.blocks[i], seq.key)
            seq.registered += 1

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[Emitted]:
        tokens = sample_next(logits, [s.params for s in seqs], [s.seed for s in seqs], [s.produced for s in seqs])
        return [self._emit(s, token) for s, token in zip(seqs, tokens.tolist())]

    def _emit(self, seq: _Sequence, token: int) -> Emitted:
        seq.tokens.append(token)
        seq.produced += 1
        finish = None
        if seq.params.stop_at_eos and token == self.eos_id:
            finish = "stop"
        elif seq.produced >= seq.params.max_tokens or len(seq.tokens) > self.config.seq_len:
            # The same limits as `decode`: a token at position seq_len would have no position embedding.
            finish = "length"
        if finish:
            self.remove(seq.seq_id)
        return Emitted(seq.seq_id, token, finish)
