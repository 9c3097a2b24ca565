"""Packed token shards for training: each data-parallel rank reads its own slice, straight from disk.

The order of sequences is a seeded permutation per epoch and the position in it is one global
cursor (sequences consumed), saved in every checkpoint: a resumed run, at any world size,
continues with the next unseen sequence.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mtnlg_ray.errors import InputError


OPEN_SHARDS = 64  # memory-mapped shards a reader keeps open at once (the least recently read is closed)


class TokenShards:
    """The `tokens/` folder of a dataset from `mtnlg-ray data prepare`, memory-mapped."""

    def __init__(self, dataset: str | Path, split: str = "train") -> None:
        self.dataset = Path(dataset)
        index_file = self.dataset / "tokens" / "index.json"
        if not index_file.is_file():
            raise InputError(f"{index_file}: missing (is {self.dataset} a dataset from `mtnlg-ray data prepare`?)")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            self.seq_len = int(index["seq_len"])
            names = list(index["shards"][split])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{index_file}: not a token index of `data prepare` ({type(exc).__name__}: {exc}); "
                             "prepare the dataset again") from None
        self.paths = [self.dataset / "tokens" / name for name in names]
        # Each shard is checked here but mapped only while in use: a memory map holds a file
        # descriptor, and a corpus of billions of tokens has more shards than a process may open.
        self.offsets = np.cumsum([0] + [len(self._shard(path)) for path in self.paths])
        self.split = split
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()

    def _mapped_shard(self, number: int) -> np.ndarray:
        shard = self._mapped.pop(number, None)
        if shard is None:
            shard = self._shard(self.paths[number])
            if len(self._mapped) >= OPEN_SHARDS:
                self._mapped.popitem(last=False)
        self._mapped[number] = shard
        return shard

    def _shard(self, path: Path) -> np.ndarray:
        """One memory-mapped shard: (sequences, seq_len + 1) token ids, or one line naming the file."""
        if not path.is_file():
            raise InputError(f"{path}: missing (tokens/index.json lists it); prepare the dataset again")
        try:
            shard = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path}: not a readable token shard ({exc}); prepare the dataset again") from None
        if shard.ndim != 2 or shard.shape[1] != self.seq_len + 1:
            raise InputError(f"{path}: shape {list(shard.shape)}, expected [sequences, {self.seq_len + 1}] "
                             f"(index.json's seq_len {self.seq_len} + 1); prepare the dataset again")
        return shard

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """Sequences at global `indices` as an int64 tensor (n, seq_len + 1)."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for i, (index, shard) in enumerate(zip(indices, shard_of)):
            out[i] = self._mapped_shard(int(shard))[index - self.offsets[shard]]
        return torch.from_numpy(out)


# Length grouping: a shuffled epoch is cut into windows of this many groups, each window sorted by
# length, cut into groups and the groups shuffled again. An epoch of fewer than two windows is not
# grouped: sorting all of a small set would leave each batch a handful of near-duplicates (a 32-pair
# SFT set learned a third less per epoch that way), and its padding costs little time anyway.
GROUPS_PER_WINDOW = 8


class GlobalOrder:
    """Which example comes at each global position: a seeded permutation per epoch.

    With `lengths` (variable-length fine-tuning examples) and a `group` size, each run of `group`
    positions holds examples of similar length, so a batch pads little. It is still a permutation
    of the epoch, drawn from the seed alone: every layout and every resume sees the same order.
    """

    def __init__(self, size: int, seed: int, lengths: np.ndarray | None = None, group: int = 1) -> None:
        if size == 0:
            raise InputError("the dataset has no training sequences; use more text or a smaller pack.seq_len")
        self.size = size
        self.seed = seed
        grouped = lengths is not None and group >= 2 and size >= 2 * group * GROUPS_PER_WINDOW
        self.lengths = np.asarray(lengths) if grouped else None
        self.group = group

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size)
        if self.lengths is None:
            return order
        # Batches start at multiples of `group` counted over the whole run, so when the epoch size is
        # not a multiple, this epoch's first `lead` positions finish the batch the last epoch began.
        lead = (-epoch * self.size) % self.group
        out = [order[:lead]]
        window = self.group * GROUPS_PER_WINDOW
        for start in range(lead, self.size, window):
            part = order[start : start + window]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            groups = [part[i : i + self.group] for i in range(0, len(part), self.group)]
            tail = [groups.pop()] if len(groups[-1]) < self.group else []  # a short last group stays last
            out.extend([*(groups[i] for i in rng.permutation(len(groups))), *tail])
        return np.concatenate(out)

    def take(self, cursor: int, count: int) -> np.ndarray:
        positions = np.arange(cursor, cursor + count)
        epochs = positions // self.size
        return np.array([self._permutation(int(e))[p % self.size] for e, p in zip(epochs, positions)])


def rank_slice(indices: np.ndarray, dp_rank: int, dp: int) -> np.ndarray:
    """This data-parallel rank's contiguous share of a global batch."""
    per_rank = len(indices) // dp
    return indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
