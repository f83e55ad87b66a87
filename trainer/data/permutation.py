"""A seeded permutation of [0, n) evaluated pointwise, without materialising it.

``torch.randperm`` of a WebFace260M epoch is 2 GB of int64 per rank; this costs a few
words.  It is a balanced Feistel network on the smallest even number of bits that
covers ``n`` (a bijection of [0, 2^bits)) with cycle walking: a value that lands
outside [0, n) is encrypted again until it falls inside, which restricts the
bijection to [0, n).  Since 2^bits < 4n, a value walks fewer than 4 times on
average.  Everything is vectorised over numpy uint64 arrays.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2, _TWEAK = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """Permutation of ``[0, size)`` keyed by ``seed`` words (e.g. ``(data.seed, epoch)``).

    ``tweak`` (an array broadcast with the values) selects one of many independent
    permutations per element: one call can permute the insides of many spans, each
    with its own order.
    """

    def __init__(self, size: int, *seed: int):
        if size < 1:
            raise ValueError(f"a permutation needs at least one element, got {size}")
        self.size = size
        bits = max(2, int(size - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([int(s) for s in seed]).generate_state(ROUNDS, np.uint64)

    def _round_key(self, i: int, tweak: np.ndarray | None) -> np.ndarray | np.uint64:
        key = self.keys[i]
        return key if tweak is None else _mix(key ^ (tweak.astype(np.uint64) * _TWEAK))

    def _encrypt(self, x: np.ndarray, tweak: np.ndarray | None) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for i in range(ROUNDS):
            left, right = right, left ^ (_mix(right ^ self._round_key(i, tweak)) & self.mask)
        return (left << self.half) | right

    def _decrypt(self, y: np.ndarray, tweak: np.ndarray | None) -> np.ndarray:
        left, right = y >> self.half, y & self.mask
        for i in reversed(range(ROUNDS)):
            left, right = right ^ (_mix(left ^ self._round_key(i, tweak)) & self.mask), left
        return (left << self.half) | right

    def _walk(self, step, values, tweak: np.ndarray | None) -> np.ndarray:
        x = np.asarray(values, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.size):
            raise IndexError(f"values outside [0, {self.size})")
        t = None if tweak is None else np.broadcast_to(np.asarray(tweak, dtype=np.int64), x.shape)
        y = step(x.astype(np.uint64), t)
        out = y >= np.uint64(self.size)
        while out.any():  # cycle walking: stays a bijection of [0, size)
            y[out] = step(y[out], None if t is None else t[out])
            out[out] = y[out] >= np.uint64(self.size)
        return y.astype(np.int64)

    def __call__(self, values, tweak=None) -> np.ndarray:
        """The images of ``values`` (ints in [0, size))."""
        return self._walk(self._encrypt, values, tweak)

    def inverse(self, values, tweak=None) -> np.ndarray:
        """The ``x`` with ``self(x) == values``."""
        return self._walk(self._decrypt, values, tweak)
