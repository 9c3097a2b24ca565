"""MinHash and LSH for the dedup stage, in plain numpy: normalized text, exact digests, character n-gram
signatures, band bucket keys, candidate pairs (MT-NLG / NeMo Curator: 5-grams, 20 bands x 13 rows, J >= 0.8).
No Ray here: `data/dedup.py` runs these inside Ray Data tasks, bench/dedup.py in one process.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

import numpy as np

# Permutations and band hashes come from this seed, so every task (and every run) agrees on them.
MINHASH_SEED = 0x6D746E6C67
# Buckets up to this size are checked pair by pair; a bigger one (boilerplate shared by thousands of
# pages) only against its smallest id, which bounds the work at O(size) instead of O(size^2).
ALL_PAIRS_MAX_BUCKET = 64

_MERSENNE_61 = np.uint64((1 << 61) - 1)
_LOW_32 = np.uint64(0xFFFFFFFF)
_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd, so the rolling polynomial uses all 64 bits
_SHORT_SALT = 0xD6E8FEB86659FD93
# Shingles per MinHash block: two (block x permutations) uint64 arrays stay within L2/L3.
_SHINGLE_BLOCK = 256


def normalize_text(text: str) -> str:
    """Casefolded, NFC, whitespace runs collapsed to one space, stripped: what "the same text" means.

    Casefolding is applied between NFD and NFC (Unicode's canonical caseless match), so
    precomposed and decomposed accents compare equal before and after folding.
    """
    folded = unicodedata.normalize("NFD", text).casefold()
    return " ".join(unicodedata.normalize("NFC", folded).split())


def exact_digest(normalized: str) -> bytes:
    """128-bit hash of normalized text; collisions are negligible far past a billion documents."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def _fmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every character n-gram of every text, and how many belong to each text.

    All texts are hashed together: one UTF-32 encode, then a rolling polynomial over the
    concatenated code points, keeping only windows that lie inside one text. A text shorter
    than `ngram` is one shingle: its whole self.
    """
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    counts = np.maximum(lengths - ngram + 1, 1)
    hashes = np.empty(int(counts.sum()), dtype=np.uint64)
    if len(texts) == 0:
        return hashes, counts
    points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    out_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    long = lengths >= ngram
    if points.size >= ngram and long.any():
        windows = points.size - ngram + 1
        rolled = points[:windows].copy()
        for k in range(1, ngram):
            rolled *= _ROLL
            rolled += points[k : k + windows]
        # Output slot of each kept window -> its start position in the concatenation.
        long_counts = counts[long]
        shift = np.repeat(starts[long] - out_starts[long], long_counts)
        slots = np.repeat(out_starts[long], long_counts) + _ranges(long_counts)
        hashes[slots] = rolled[slots + shift]
    for d in np.flatnonzero(~long):  # rare: texts shorter than one n-gram
        value = _SHORT_SALT ^ int(lengths[d])
        for p in points[starts[d] : starts[d] + lengths[d]]:
            value = (value * int(_ROLL) + int(p)) & 0xFFFFFFFFFFFFFFFF
        hashes[out_starts[d]] = value
    return _fmix64(hashes), counts


def _ranges(counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(c) for c in counts), vectorized."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


class MinHashBands:
    """MinHash signatures (bands * rows permutations) of character n-grams, and their LSH bucket keys.

    Permutation i hashes a 64-bit shingle x = (hi, lo) as (a1_i * lo + a2_i * hi + b_i) mod (2^61 - 1),
    a multilinear universal hash over the Mersenne prime. With a1, a2 < 2^31 and b < 2^32 the sum
    fits in uint64, so numpy needs no 128-bit product and no division: one fold reduces mod p.
    """

    def __init__(self, bands: int, rows: int, ngram: int, seed: int = MINHASH_SEED):
        self.bands, self.rows, self.ngram = bands, rows, ngram
        self.num_perm = bands * rows
        rng = np.random.default_rng(seed)
        self._a1 = rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64)
        self._a2 = rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64)
        self._band_seeds = _fmix64(np.arange(bands, dtype=np.uint64) + np.uint64(seed))

    def signatures(self, normalized_texts: Sequence[str]) -> np.ndarray:
        """(n, bands * rows) uint32: the low 32 bits of each permutation's minimum."""
        hashes, counts = shingle_hashes(normalized_texts, self.ngram)
        n = len(normalized_texts)
        mins = np.full((n, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        lo, hi = hashes & _LOW_32, hashes >> np.uint64(32)
        doc_starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if n else counts
        block = min(_SHINGLE_BLOCK, hashes.size)
        values_buf = np.empty((block, self.num_perm), dtype=np.uint64)
        scratch_buf = np.empty_like(values_buf)
        for c0 in range(0, hashes.size, block):
            c1 = min(c0 + block, hashes.size)
            first = int(np.searchsorted(doc_starts, c0, side="right")) - 1
            last = int(np.searchsorted(doc_starts, c1, side="left"))
            values, scratch = values_buf[: c1 - c0], scratch_buf[: c1 - c0]
            np.multiply(lo[c0:c1, None], self._a1, out=values)
            np.multiply(hi[c0:c1, None], self._a2, out=scratch)
            values += scratch
            values += self._b
            np.right_shift(values, np.uint64(61), out=scratch)
            values &= _MERSENNE_61
            values += scratch
            segments = np.maximum(doc_starts[first:last], c0) - c0
            block_mins = np.minimum.reduceat(values, segments, axis=0)
            np.minimum(mins[first:last], block_mins, out=mins[first:last])
        return (mins & _LOW_32).astype(np.uint32)

    def bucket_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) int64: one hash per band of `rows` signature values, salted by the band index."""
        n = signatures.shape[0]
        values = signatures.reshape(n, self.bands, self.rows).astype(np.uint64)
        keys = np.repeat(self._band_seeds[None, :], n, axis=0)
        for r in range(self.rows):
            keys = _fmix64(keys ^ values[:, :, r])
        return keys.view(np.int64)


def bucket_pairs(sorted_keys: np.ndarray, max_all_pairs: int = ALL_PAIRS_MAX_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j), i < j, of rows that share a bucket key, given keys sorted (ties by id).

    A bucket of up to `max_all_pairs` rows yields all its pairs; a bigger one pairs each row
    with the bucket's first (smallest id) row only.
    """
    n = sorted_keys.size
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    starts_run = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    run = np.cumsum(starts_run) - 1
    heads = np.flatnonzero(starts_run)
    sizes = np.diff(np.append(heads, n))
    big = sizes[run] > max_all_pairs
    left, right = [], []
    members = np.flatnonzero(big & ~starts_run)
    left.append(heads[run[members]])
    right.append(members)
    small_sizes = sizes[sizes <= max_all_pairs]
    widest = int(small_sizes.max()) if small_sizes.size else 0
    for d in range(1, widest):
        same = (run[:-d] == run[d:]) & ~big[:-d]
        i = np.flatnonzero(same)
        left.append(i)
        right.append(i + d)
    return np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)


def estimated_jaccard(signatures: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Fraction of equal MinHash values for each pair of rows: an unbiased estimate of Jaccard."""
    out = np.empty(left.size, dtype=np.float64)
    step = max(1, (1 << 22) // max(signatures.shape[1], 1))  # bound the (pairs x perms) temporary
    for s in range(0, left.size, step):
        equal = signatures[left[s : s + step]] == signatures[right[s : s + step]]
        out[s : s + step] = equal.mean(axis=1)
    return out


def fingerprint_jaccard(agreement: np.ndarray, bits: int = 8) -> np.ndarray:
    """Jaccard from the agreement of `bits`-bit fingerprints of MinHash values: unequal values still
    agree with probability 2**-bits, so agreement = J + (1 - J) / 2**bits; solved for J."""
    chance = 1.0 / (1 << bits)
    return (agreement - chance) / (1.0 - chance)


def candidate_pairs(bucket_keys: np.ndarray) -> np.ndarray:
    """In-process LSH: unique (i, j), i < j, of documents sharing a bucket in at least one band.

    `bucket_keys` is (n, bands) from `MinHashBands.bucket_keys`. The Ray stage does the same per
    shuffle shard; this whole-corpus form is for the benchmark and for small inputs.
    """
    n, bands = bucket_keys.shape
    keys = bucket_keys.reshape(-1)
    docs = np.repeat(np.arange(n, dtype=np.int64)[:, None], bands, axis=1).reshape(-1)
    order = np.lexsort((docs, keys))
    left, right = bucket_pairs(keys[order])
    i, j = docs[order][left], docs[order][right]
    codes = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    return np.stack((codes // n, codes % n), axis=1) if n else np.empty((0, 2), dtype=np.int64)
