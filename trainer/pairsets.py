"""The pairs a verification protocol compares, scored block by block with matrix products.

A score is the float32 cosine of two embeddings: each row is normalised in
float64 and rounded to float32 once (``unit_rows``), and pairs are scored by
single-threaded BLAS.  A product's last bits depend on the shape of the
matrix product and on the BLAS thread count, so both are fixed: an image
set's scores are always computed in the same ``TILE`` x ``TILE`` tiles of
rows sorted by identity (a pair list's in rows of ``CHUNK`` pairs), whichever
rank computes them, and scoring holds BLAS to one thread (``score``).  That
is what makes 1 and 8 ranks give bit-identical results: scores are only
computed inside ``one_blas_thread()``.

* ``MatrixPairs``: every pair of two image sets.  All-vs-all within one set
  compares each unordered pair ``i < j`` once (same condition) or every
  ordered pair ``i != j`` (masked probe against unmasked gallery: a photo is
  never compared with its own masked copy); a gallery/probe split compares
  every probe with every gallery image.  Genuine pairs share an identity.
* ``ListedPairs``: the pairs of a list, genuine by its flags or by identity.

Rows sorted by identity put the genuine pairs in the few tiles near the
diagonal: the others are all impostor pairs, passed on without a mask.
Numpy only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

TILE = 2048  # rows and columns of a score tile
CHUNK = 16384  # pairs of a list scored together
_EMPTY = np.empty(0, np.float32)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Hold BLAS to one thread: with more, OpenBLAS splits a product differently and its last bits change."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """float32 unit rows, normalised in float64 and rounded once: a row's bits never depend on its neighbours."""
    rows = np.asarray(embeddings, dtype=np.float64)
    if not np.all(np.isfinite(rows)):
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("embeddings contain an all-zero row")
    return (rows / norms).astype(np.float32)


def _by_identity(rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by identity (stable), copied only when they are not already."""
    if np.all(labels[1:] >= labels[:-1]):
        return rows, labels
    order = np.argsort(labels, kind="stable")
    return rows[order], labels[order]


class MatrixPairs:
    """Every pair of rows of ``left`` with rows of ``right`` (unit float32), in tiles.

    ``same_images``: row ``i`` of both sides is the same photo (all-vs-all), so pair ``(i, i)`` is
    left out; ``symmetric``: both sides are the same vectors too, so only ``i < j`` is scored.
    """

    def __init__(
        self,
        left: np.ndarray,
        left_labels: np.ndarray,
        right: np.ndarray,
        right_labels: np.ndarray,
        same_images: bool,
        symmetric: bool,
    ):
        self.left, self.left_labels = _by_identity(left, np.asarray(left_labels))
        self.right, self.right_labels = (
            (self.left, self.left_labels) if symmetric else _by_identity(right, np.asarray(right_labels))
        )
        self.same_images, self.symmetric = same_images, symmetric

        ids = np.union1d(self.left_labels, self.right_labels)
        per_id_left = np.bincount(np.searchsorted(ids, self.left_labels), minlength=ids.size).astype(np.int64)
        per_id_right = np.bincount(np.searchsorted(ids, self.right_labels), minlength=ids.size).astype(np.int64)
        pairs, genuine = len(self.left) * len(self.right), int(per_id_left @ per_id_right)
        if same_images:  # (i, i) is never a pair; it would be genuine
            pairs, genuine = pairs - len(self.left), genuine - len(self.left)
        if symmetric:
            pairs, genuine = pairs // 2, genuine // 2
        self.n_pairs, self.n_genuine, self.n_impostor = pairs, genuine, pairs - genuine
        rows, cols = range(0, len(self.left), TILE), range(0, len(self.right), TILE)
        self._tiles = [(i, j) for i in rows for j in cols if not symmetric or j >= i]

    can_sample = True

    def units(self) -> list[tuple[int, int]]:
        """The tiles, by their first row and column, in a fixed order."""
        return self._tiles

    def unit_pairs(self, unit: tuple[int, int]) -> int:
        i, j = unit
        h, w = min(TILE, len(self.left) - i), min(TILE, len(self.right) - j)
        if self.same_images and i == j:
            return h * (h - 1) // 2 if self.symmetric else h * w - h
        return h * w

    def score(self, unit: tuple[int, int], buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(genuine scores, impostor scores)`` of one tile; the impostors may be a view of ``buffer``."""
        i, j = unit
        rows, cols = self.left[i : i + TILE], self.right[j : j + TILE]
        scores = buffer[: len(rows) * len(cols)].reshape(len(rows), len(cols))
        np.matmul(rows, cols.T, out=scores)
        row_labels, col_labels = self.left_labels[i : i + TILE], self.right_labels[j : j + TILE]
        diagonal = self.same_images and i == j
        if not diagonal and (row_labels[-1] < col_labels[0] or col_labels[-1] < row_labels[0]):
            return _EMPTY, scores  # labels are sorted: no identity on both sides
        same = row_labels[:, None] == col_labels[None, :]
        if diagonal:
            pair = np.triu(np.ones(scores.shape, bool), 1) if self.symmetric else ~np.eye(len(rows), dtype=bool)
            return scores[pair & same], scores[pair & ~same]
        return scores[same], scores[~same]

    def sample_impostor_pairs(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` impostor pairs ``(rows, columns)`` drawn uniformly with replacement, seeded: the same on every
        rank.  An impostor pair has two identities, so never ``(i, i)``; ordered draws are uniform over unordered
        pairs too."""
        rng = np.random.default_rng(seed)
        rows, columns, drawn = [], [], 0
        while drawn < size:
            i = rng.integers(0, len(self.left), CHUNK)
            j = rng.integers(0, len(self.right), CHUNK)
            keep = self.left_labels[i] != self.right_labels[j]
            rows.append(i[keep])
            columns.append(j[keep])
            drawn += int(keep.sum())
        return np.concatenate(rows)[:size], np.concatenate(columns)[:size]

    def pair_scores(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The scores of pairs ``(rows[k], columns[k])``, one by one (for a sample: not the tiles' bits)."""
        return np.concatenate(
            [
                np.einsum("ij,ij->i", self.left[rows[s : s + CHUNK]], self.right[columns[s : s + CHUNK]])
                for s in range(0, len(rows), CHUNK)
            ]
            or [_EMPTY]
        )


class ListedPairs:
    """The pairs ``(first[k], second[k])`` of a list: rows of ``left`` against rows of ``right``."""

    can_sample = False

    def __init__(
        self, left: np.ndarray, right: np.ndarray, first: np.ndarray, second: np.ndarray, is_genuine: np.ndarray
    ):
        self.left, self.right = left, right
        self.first, self.second, self.is_genuine = first, second, np.asarray(is_genuine, dtype=bool)
        self.n_pairs = len(first)
        self.n_genuine = int(np.count_nonzero(self.is_genuine))
        self.n_impostor = self.n_pairs - self.n_genuine

    def units(self) -> range:
        return range(0, self.n_pairs, CHUNK)

    def unit_pairs(self, unit: int) -> int:
        return min(CHUNK, self.n_pairs - unit)

    def score(self, unit: int, buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        span = slice(unit, unit + CHUNK)
        scores = np.einsum("ij,ij->i", self.left[self.first[span]], self.right[self.second[span]])
        genuine = self.is_genuine[span]
        return scores[genuine], scores[~genuine]
