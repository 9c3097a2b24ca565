"""Packed token shards for training: each data-parallel rank reads its own slice, straight from disk.

The order of sequences is a seeded permutation per epoch and the position in it is one global
cursor (sequences consumed), saved in every checkpoint: a resumed run, at any world size,
continues with the next unseen sequence.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mtnlg_ray.errors import InputError


class TokenShards:
    """The `tokens/` folder of a dataset from `mtnlg-ray data prepare`, memory-mapped."""

    def __init__(self, dataset: str | Path, split: str = "train") -> None:
        self.dataset = Path(dataset)
        index_file = self.dataset / "tokens" / "index.json"
        if not index_file.is_file():
            raise InputError(f"{index_file}: missing (is {self.dataset} a dataset from `mtnlg-ray data prepare`?)")
        index = json.loads(index_file.read_text(encoding="utf-8"))
        self.seq_len = int(index["seq_len"])
        self.shards = [np.load(self.dataset / "tokens" / name, mmap_mode="r", allow_pickle=False)
                       for name in index["shards"][split]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.split = split

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """Sequences at global `indices` as an int64 tensor (n, seq_len + 1)."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for i, (index, shard) in enumerate(zip(indices, shard_of)):
            out[i] = self.shards[shard][index - self.offsets[shard]]
        return torch.from_numpy(out)


class GlobalOrder:
    """Which sequence comes at each global position: a seeded permutation per epoch."""

    def __init__(self, size: int, seed: int) -> None:
        if size == 0:
            raise InputError("the dataset has no training sequences; use more text or a smaller pack.seq_len")
        self.size = size
        self.seed = seed

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def take(self, cursor: int, count: int) -> np.ndarray:
        positions = np.arange(cursor, cursor + count)
        epochs = positions // self.size
        return np.array([self._permutation(int(e))[p % self.size] for e, p in zip(epochs, positions)])


def rank_slice(indices: np.ndarray, dp_rank: int, dp: int) -> np.ndarray:
    """This data-parallel rank's contiguous share of a global batch."""
    per_rank = len(indices) // dp
    return indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
