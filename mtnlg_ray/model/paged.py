"""Paged KV cache: one pool of fixed-size blocks per serving replica, and prefix caching over it.

A sequence owns a list of blocks (its block table); attention gathers its keys through that table,
so nothing is copied when other sequences join or leave. A full block is keyed by a hash of every
token up to its end: a later prompt that starts with the same tokens reuses it instead of computing
it again. Blocks nobody references stay cached until the pool needs them (least recently used first).
The continuous decoder (`model/continuous.py`) decides who gets blocks; nothing here knows about Ray.
"""

from __future__ import annotations

import collections
import hashlib
from array import array

import torch

from mtnlg_ray.model.gpt import GPTConfig

TRASH_BLOCK = 0  # never handed out: the padding positions of a batch write their keys here


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: a hash of the previous block's key and this block's tokens."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Every layer's keys and values in `num_blocks` blocks of `block_size` token slots, with block
    reference counts, `reserved` (blocks promised to admitted sequences but not yet taken) and the
    prefix cache (key → block, and the unreferenced cached blocks in LRU order)."""

    def __init__(self, config: GPTConfig, num_blocks: int, block_size: int, device, dtype,
                 prefix_cache: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_blocks < 2:
            raise ValueError(f"the pool needs at least 2 blocks (one is the padding block), got {num_blocks}")
        shape = (config.n_layer, num_blocks * block_size, config.n_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self.free = collections.deque(b for b in range(num_blocks) if b != TRASH_BLOCK)
        self.refs = [0] * num_blocks
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.reserved = 0
        self.counts = {"prompt_tokens": 0, "prefix_hit_tokens": 0, "evicted_blocks": 0}

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks a newly admitted sequence may still be promised."""
        return len(self.free) + len(self.evictable) - self.reserved

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def match(self, prompt: list[int]) -> tuple[list[int], bytes]:
        """The cached blocks the prompt starts with, and the last one's key. The prompt's last token
        is always left to compute: its logits give the first generated token."""
        blocks, key = [], b""
        if not self.prefix_cache:
            return blocks, key
        bs = self.block_size
        for i in range((len(prompt) - 1) // bs):
            next_key = block_key(key, prompt[i * bs : (i + 1) * bs])
            block = self.by_key.get(next_key)
            if block is None:
                break
            blocks.append(block)
            key = next_key
        return blocks, key

    def admit(self, prompt: list[int], need: int) -> tuple[list[int], bytes] | None:
        """Promise a new sequence `need` blocks in all: the cached blocks its prompt starts with (now
        referenced) and the last one's key, the rest to `allocate` later. None, and nothing changed,
        while the pool cannot promise them."""
        matched, key = self.match(prompt)
        unreferenced = sum(1 for b in matched if self.refs[b] == 0)  # counted in `available` until taken
        if need - len(matched) > self.available - unreferenced:
            return None
        for block in matched:
            self.refs[block] += 1
            self.evictable.pop(block, None)
        self.reserved += need - len(matched)
        self.counts["prompt_tokens"] += len(prompt)
        self.counts["prefix_hit_tokens"] += len(matched) * self.block_size
        return matched, key

    def allocate(self) -> int:
        """One of the blocks `admit` promised: a free one, else the least recently used cached one."""
        self.reserved -= 1
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
            self.counts["evicted_blocks"] += 1
        else:  # the decoder reserves before it allocates, so this is a bug
            raise RuntimeError("KV cache pool exhausted")
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int], unused: int = 0) -> None:
        """Drop a sequence's references to `blocks`, and the `unused` blocks it was promised but never took."""
        self.reserved -= unused
        # Last block first: eviction takes the oldest, and a prefix is only found from its first block
        # on, so a chain must lose its end before its beginning (else one eviction strands the rest).
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None  # most recently used at the end
                else:
                    self.free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Offer a full block to the prefix cache (a block with the same key already there wins)."""
        if self.prefix_cache and key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key

    def stats(self) -> dict:
        prompt, hits = self.counts["prompt_tokens"], self.counts["prefix_hit_tokens"]
        return {
            "kv_blocks": self.usable_blocks,
            "kv_blocks_used": self.usable_blocks - len(self.free) - len(self.evictable),
            "kv_blocks_cached": len(self.by_key),
            "block_size": self.block_size,
            "prefix_cache": self.prefix_cache,
            "prefix_cache_hit_rate": hits / prompt if prompt else 0.0,
            **self.counts,
        }


class PagedBatch:
    """What one forward pass of a batch reads and writes through the pool: the `cache` argument of
    `GPT.forward`. `write_slots` (B*T) are where the new tokens' keys go (padding → the trash block);
    `read_slots` (B, L) list each row's key slots in position order (a mask hides what is not its)."""

    length = 0  # positions are always given explicitly; GPT.hidden_states adds to this and ignores it

    def __init__(self, pool: BlockPool, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        self.pool = pool
        self.write_slots = write_slots
        self.read_slots = read_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, D = k.shape
        L = self.read_slots.shape[1]
        keys, values = self.pool.k[layer], self.pool.v[layer]
        keys.index_copy_(0, self.write_slots, k.reshape(B * T, H, D))
        values.index_copy_(0, self.write_slots, v.reshape(B * T, H, D))
        flat = self.read_slots.reshape(-1)
        return (keys.index_select(0, flat).view(B, L, H, D).transpose(1, 2),
                values.index_select(0, flat).view(B, L, H, D).transpose(1, 2))
