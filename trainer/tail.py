"""Exact TPR@FPR over any number of pairs, from the few scores that decide it.

``verification.tpr_at_fpr`` reports, for a target FPR ``f`` over ``N``
impostor pairs, the ROC point of the lowest threshold that accepts at most
``K`` impostors, ``K`` the largest count with ``K / N <= f``.  Let ``v`` be
the (K+1)-th highest impostor score.  The threshold is then the lowest score
above ``v`` (genuine or impostor), TPR the share of genuine scores above
``v``, FPR the share of impostor scores above ``v``; when nothing scores
above ``v`` the point accepts nothing.  So the genuine scores (few) and the
``K + 1`` highest impostor scores decide every target, whatever ``N``, ties
included.

``ImpostorTail`` holds them in bounded memory while blocks of scores stream
past:

* the ``keep`` highest impostor scores, behind a running threshold that rises
  at each partial sort (``np.partition``).  Targets with ``K + 1 <= keep``
  are read off them, and so is the exact ROC curve above the lowest kept
  score; with ``keep >= N`` every impostor score is kept: the whole curve.
* for a target beyond ``keep``, a bracket ``[lo, hi)`` (Floyd and Rivest's
  selection): bounds taken from a random sample of impostor scores so that
  ``v`` lies inside with overwhelming probability (``brackets_from_sample``).
  The stream counts the scores ``>= hi`` and keeps every score inside.
  ``finish`` checks that ``v`` is inside with a kept score above it (the
  lowest score above ``v`` is the threshold); when not, the target is
  reported as missed and the caller scores again keeping its ``K + 1``
  highest scores.  A miss costs a pass, never a wrong number.

States of several ranks merge exactly (``merge``): the top ``keep`` of the
union of each rank's top ``keep`` is the global one, counts add, bracket
contents concatenate.  Scores are float32 throughout; numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .verification import ROC_POINTS, OperatingPoint, check_fprs, is_supported, unsupported

_F32 = np.float32
_INF = np.float32(np.inf)
# Below this many pending scores a partial sort is not worth its overhead.
_MIN_COMPACT = 1 << 20
# Scores are examined in pieces this long (512 KB): each piece's several passes run in the core's cache.
_PIECE = 1 << 17


def allowed_false_accepts(fpr: float, n_impostor: int) -> int:
    """``K``: the most impostors a point may accept at target ``fpr``, ``K / N <= fpr`` as the curve computes it."""
    k = math.floor(fpr * n_impostor)
    while k < n_impostor and (k + 1) / n_impostor <= fpr:
        k += 1
    while k > 0 and k / n_impostor > fpr:
        k -= 1
    return k


@dataclass
class Bracket:
    """Impostor scores around one target's ``v``: counted from ``hi`` up, kept in ``[lo, hi)``."""

    lo: np.float32
    hi: np.float32
    above: int = 0  # scores >= hi
    inside: list[np.ndarray] = field(default_factory=list)


@dataclass
class TailState:
    """What a pass leaves: the highest impostor scores and each bracket, ready to merge or finish."""

    top: np.ndarray  # float32, at most ``keep`` scores, in no order
    brackets: list[Bracket]


def _select(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``scores[mask]`` for a sparse mask (boolean indexing is several times slower there)."""
    return scores.take(np.flatnonzero(mask))


class ImpostorTail:
    """The ``keep`` highest impostor scores and the brackets of the targets beyond them, fed block by block."""

    def __init__(self, keep: int, brackets: list[tuple[float, float]] = ()):
        self.keep = keep
        self.brackets = [Bracket(_F32(lo), _F32(hi)) for lo, hi in brackets]
        self._top = np.empty(0, _F32)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        # Scores below _top_floor cannot be among the top ``keep``; none at all when nothing is kept.
        self._top_floor = _F32(-np.inf) if keep else _INF
        self._high, self._low = np.empty(_PIECE, bool), np.empty(_PIECE, bool)

    def add(self, scores: np.ndarray) -> None:
        """Impostor scores (float32, any shape, contiguous); only those that can still matter are copied."""
        flat = scores.reshape(-1)
        if not flat.size:
            return
        top: list[np.ndarray] = []
        inside: list[list[np.ndarray]] = [[] for _ in self.brackets]
        for start in range(0, flat.size, _PIECE):
            piece = flat[start : start + _PIECE]
            high, low = self._high[: piece.size], self._low[: piece.size]
            for bracket, kept in zip(self.brackets, inside):
                np.greater_equal(piece, bracket.hi, out=high)
                bracket.above += int(np.count_nonzero(high))
                np.greater_equal(piece, bracket.lo, out=low)
                np.not_equal(low, high, out=low)  # lo <= score < hi
                kept.append(_select(piece, low))
            if self.keep:
                np.greater_equal(piece, self._top_floor, out=high)
                top.append(_select(piece, high))
        for bracket, kept in zip(self.brackets, inside):
            bracket.inside.append(np.concatenate(kept))
        if top:
            self._pending.append(np.concatenate(top))
            self._pending_size += self._pending[-1].size
            if self._pending_size >= max(self.keep, _MIN_COMPACT):
                self._compact()

    def _compact(self) -> None:
        """Keep the ``keep`` highest; from now on only scores above the lowest of them can enter.

        Strictly above: a later score equal to it cannot change the (K+1)-th highest value of any
        target, the count above it or the lowest score above it.
        """
        scores = np.concatenate([self._top, *self._pending])
        self._pending, self._pending_size = [], 0
        if scores.size > self.keep:
            cut = scores.size - self.keep
            scores.partition(cut)
            scores = scores[cut:].copy()
            self._top_floor = np.nextafter(scores.min(), _INF)
        self._top = scores

    def state(self) -> TailState:
        if self._pending:
            self._compact()
        return TailState(self._top, self.brackets)


def merge(states: list[TailState], keep: int) -> TailState:
    """The state one process would have reached over every rank's pairs: exact, ties included."""
    top = np.concatenate([s.top for s in states])
    if top.size > keep:
        top = np.partition(top, top.size - keep)[top.size - keep :]
    brackets = []
    for parts in zip(*(s.brackets for s in states)):
        brackets.append(
            Bracket(parts[0].lo, parts[0].hi, sum(b.above for b in parts), [a for b in parts for a in b.inside])
        )
    return TailState(top, brackets)


def brackets_from_sample(sample: np.ndarray, ks: list[int], n_impostor: int, z: float) -> list[tuple[float, float]]:
    """``[lo, hi)`` for each ``K`` such that the (K+1)-th highest of ``n_impostor`` scores is inside.

    ``sample``: impostor scores of pairs drawn uniformly with replacement.  The number of sample
    scores at or above the population's (K+1)-th highest is binomial with mean ``m (K+1) / N``; the
    bounds sit ``z`` standard deviations (plus one) either side, so each misses with probability
    about ``Phi(-z)``.  Each bound then moves out to the next distinct sample score, so that ties
    (and a sampled score that is ``v`` itself, rounded differently) stay inside, and ``hi`` one more,
    so that the window holds the lowest score above ``v`` too.
    """
    ascending = np.sort(np.asarray(sample, dtype=_F32))
    m = ascending.size
    bounds = []
    for k in ks:
        p = (k + 1) / n_impostor
        mean, spread = m * p, z * math.sqrt(m * p * (1 - p)) + 1
        upper, lower = math.floor(mean - spread), math.ceil(mean + spread)  # ranks from the top, 0-based
        above = np.searchsorted(ascending, ascending[m - 1 - upper], side="right") if upper >= 0 else m
        if above < m:  # one distinct score further: the window then holds a score above v, the threshold
            above = np.searchsorted(ascending, ascending[above], side="right")
        below = np.searchsorted(ascending, ascending[m - 1 - lower], side="left") - 1 if lower < m else -1
        hi = ascending[above] if above < m else _INF
        lo = ascending[below] if below >= 0 else _F32(-np.inf)
        bounds.append((lo, hi))
    return bounds


@dataclass
class Finished:
    """Operating points of the targets a pass could answer, exact ROC points, and the targets it missed."""

    points: dict[int, OperatingPoint]  # target index -> point
    curve: tuple[np.ndarray, np.ndarray]  # (fpr, tpr) of exact curve points, fpr increasing
    missed: list[int]


def finish(
    genuine: np.ndarray,
    state: TailState,
    n_genuine: int,
    n_impostor: int,
    fprs: tuple[float, ...],
    bracketed: list[int],
) -> Finished:
    """Operating points from every genuine score and a merged tail; ``bracketed[j]`` is the target of bracket j.

    Targets not bracketed must have ``K + 1 <= keep`` (or the tail holds every impostor score).  The curve
    is the operating point of ``ROC_POINTS`` FPRs log-spaced from ``1 / N`` to the largest FPR the kept
    scores answer (the last curve point at or below each: what ``verification.thin_curve`` keeps of a
    whole curve), plus the points of the targets.
    """
    check_fprs(fprs)
    if any(fpr >= 1 for fpr in fprs):
        raise ValueError("a target FPR of 1 accepts every pair: give targets below 1")
    genuine = np.sort(np.asarray(genuine, dtype=_F32))
    top = np.sort(state.top)
    points: dict[int, OperatingPoint] = {}
    for i, fpr in enumerate(fprs):
        if not is_supported(fpr, n_impostor):
            points[i] = unsupported(fpr)
        elif i not in bracketed:
            points[i] = _point(fpr, top, 0, genuine, n_genuine, n_impostor)
    missed = []
    for bracket, i in zip(state.brackets, bracketed):
        inside = np.sort(np.concatenate(bracket.inside)) if bracket.inside else np.empty(0, _F32)
        point = _point(fprs[i], inside, bracket.above, genuine, n_genuine, n_impostor)
        if point is None:
            missed.append(i)
        else:
            points[i] = point
    curve = [points[i] for i in points if points[i].supported]
    if top.size > 1:  # the kept scores answer every FPR up to (kept - 1) / N
        grid = np.geomspace(1 / n_impostor, (top.size - 1) / n_impostor, ROC_POINTS)
        curve += [_point(float(f), top, 0, genuine, n_genuine, n_impostor) for f in grid]
    exact = sorted({(p.achieved_fpr, p.tpr) for p in curve if p is not None})
    return Finished(points, (np.array([f for f, _ in exact]), np.array([t for _, t in exact])), missed)


def _point(
    fpr: float, scores: np.ndarray, above: int, genuine: np.ndarray, n_genuine: int, n_impostor: int
) -> OperatingPoint | None:
    """The point of target ``fpr`` from impostor scores ``scores`` (sorted, ascending), of which ``above`` more
    (counted, not kept) lie above them all; None when these cannot tell: ``v`` is not among ``scores``, or
    nothing among them is above ``v`` while uncounted scores are (the lowest of those is not known).

    ``v`` is the (K+1)-th highest impostor score: the point accepts every score above it (see the module).
    """
    k = allowed_false_accepts(fpr, n_impostor)
    if not above <= k < above + scores.size:
        return None
    v = scores[scores.size - 1 - (k - above)]
    higher = int(np.searchsorted(scores, v, side="right"))  # scores[higher:] > v
    if higher == scores.size and above:
        return None
    first_genuine = int(np.searchsorted(genuine, v, side="right"))
    lowest = min(
        scores[higher] if higher < scores.size else _INF,
        genuine[first_genuine] if first_genuine < genuine.size else _INF,
    )
    return OperatingPoint(
        target_fpr=fpr,
        tpr=(genuine.size - first_genuine) / n_genuine,
        # the lowest score above v; accepting nothing, the next float above the highest score (v itself)
        threshold=float(lowest) if lowest < _INF else float(np.nextafter(np.float64(v), np.inf)),
        achieved_fpr=(above + scores.size - higher) / n_impostor,
        supported=True,
    )
