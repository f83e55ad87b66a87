"""Face verification metrics: TPR at fixed FPR for masked-face protocols.

Numpy only, so the CLI can import it without torch.  A pair is *accepted*
when its score is ``>= threshold``; pairs with equal scores are therefore
always accepted or rejected together, exactly as ``sklearn.metrics.roc_curve``
treats ties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

PROTOCOLS = ("unmasked-unmasked", "masked-unmasked", "masked-masked")

# ``n_impostor * fpr`` is a float product: 1e-3 * 1000 must count as 1 even
# where the decimal target is not exactly representable.
_SUPPORT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class OperatingPoint:
    """The ROC point reported for one target FPR.

    ``tpr``, ``threshold`` and ``achieved_fpr`` are ``None`` when the target
    is not ``supported``: too few impostor pairs to measure it at all.
    """

    target_fpr: float
    tpr: float | None
    threshold: float | None
    achieved_fpr: float | None
    supported: bool


@dataclass(frozen=True)
class ProtocolResult:
    """Operating points of one protocol with the pair counts behind them."""

    protocol: str
    n_genuine: int
    n_impostor: int
    points: tuple[OperatingPoint, ...]

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form (unsupported numbers become ``null``)."""
        return {
            "protocol": self.protocol,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "points": [asdict(point) for point in self.points],
        }


def format_fpr(fpr: float) -> str:
    """Compact label for an FPR column, e.g. ``1e-3`` or ``2.5e-4``."""
    mantissa, exponent = f"{fpr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def roc_curve(scores: np.ndarray, is_genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve ``(fpr, tpr, thresholds)``, one point per distinct score.

    The first point accepts nothing (threshold: the next float above the
    highest score), each later one accepts every pair scoring at least its
    threshold; ``fpr`` and ``tpr`` never decrease.  Sorting once makes it
    O(n log n), fit for millions of pairs.

    Raises ``ValueError`` if the arrays are not 1-D of equal shape, scores are
    not finite, labels are not boolean/0-1, or there are no genuine or no
    impostor pairs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_genuine = _as_bool_labels(is_genuine)
    if scores.ndim != 1 or scores.shape != is_genuine.shape:
        raise ValueError(
            f"scores and is_genuine must be 1-D with equal shapes, got {scores.shape} and {is_genuine.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    n_genuine = int(np.count_nonzero(is_genuine))
    n_impostor = is_genuine.size - n_genuine
    if n_genuine == 0:
        raise ValueError("no genuine pairs: TPR is undefined")
    if n_impostor == 0:
        raise ValueError("no impostor pairs: FPR is undefined")

    descending = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[descending]
    true_accepts = np.cumsum(is_genuine[descending])
    false_accepts = np.arange(1, scores.size + 1) - true_accepts
    # The last pair of each run of equal scores: accepting it accepts the run.
    run_ends = np.append(np.flatnonzero(np.diff(sorted_scores)), scores.size - 1)

    accept_nothing = np.nextafter(sorted_scores[0], np.inf)
    thresholds = np.concatenate(([accept_nothing], sorted_scores[run_ends]))
    curve_tpr = np.concatenate(([0], true_accepts[run_ends])) / n_genuine
    curve_fpr = np.concatenate(([0], false_accepts[run_ends])) / n_impostor
    return curve_fpr, curve_tpr, thresholds


def is_supported(fpr: float, n_impostor: int) -> bool:
    """Can ``n_impostor`` pairs measure ``fpr`` at all?  Only if ``n_impostor * fpr >= 1`` (up to float rounding)."""
    return n_impostor * fpr >= 1 - _SUPPORT_TOLERANCE


def check_fprs(fprs: tuple[float, ...]) -> None:
    """Raise ``ValueError`` if a target is outside ``(0, 1]``."""
    for fpr in fprs:
        if not 0 < fpr <= 1:
            raise ValueError(f"target FPR must be in (0, 1], got {fpr}")


def tpr_at_fpr(
    scores: np.ndarray,
    is_genuine: np.ndarray,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
) -> list[OperatingPoint]:
    """TPR at each target FPR, from the exact (uninterpolated) ``roc_curve``.

    For a target FPR the reported point is the one with the largest achieved
    FPR that is still ``<= target``; TPR never decreases along the curve, so
    this is also the best TPR the target allows.

    Support rule (``is_supported``): a target is ``supported`` only when
    ``n_impostor * fpr >= 1`` (up to float rounding).  Below that, even a
    single false accept overshoots the target, so the "TPR" would be the
    zero-false-accept TPR whatever the target and says nothing about it; such
    targets get ``tpr = threshold = achieved_fpr = None``.

    ``threshold`` is the lowest accepted score; when the point accepts
    nothing it is the next float above the highest score.

    Raises ``ValueError`` as ``roc_curve`` does, or if a target is outside
    ``(0, 1]``.
    """
    curve_fpr, curve_tpr, thresholds = roc_curve(scores, is_genuine)
    n_impostor = int(np.count_nonzero(~_as_bool_labels(is_genuine)))
    check_fprs(fprs)

    points = []
    for fpr in fprs:
        if not is_supported(fpr, n_impostor):
            points.append(unsupported(fpr))
            continue
        # curve_fpr is non-decreasing and starts at 0 <= fpr, so k >= 0.
        k = int(np.searchsorted(curve_fpr, fpr, side="right")) - 1
        points.append(
            OperatingPoint(
                target_fpr=fpr,
                tpr=float(curve_tpr[k]),
                threshold=float(thresholds[k]),
                achieved_fpr=float(curve_fpr[k]),
                supported=True,
            )
        )
    return points


def unsupported(fpr: float) -> OperatingPoint:
    """The point of a target too small for the impostor count: no numbers."""
    return OperatingPoint(fpr, None, None, None, supported=False)


def protocol_scores(
    unmasked: np.ndarray,
    masked: np.ndarray,
    labels: np.ndarray,
    protocol: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and genuine flags of every pair a protocol compares.

    ``unmasked`` and ``masked`` are ``(n, d)`` embeddings of the same ``n``
    photos without and with a mask; ``labels`` are their identities.

    - ``unmasked-unmasked`` / ``masked-masked``: each unordered pair
      ``i < j`` once.
    - ``masked-unmasked``: every ordered pair (masked ``i``, unmasked ``j``)
      with ``i != j``; a photo is never compared with its own masked copy,
      which would be an easy, uninformative genuine pair.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    unmasked = np.asarray(unmasked)
    masked = np.asarray(masked)
    labels = np.asarray(labels)
    if unmasked.ndim != 2 or unmasked.shape != masked.shape:
        raise ValueError(
            f"unmasked and masked must be (n, d) with equal shapes, got {unmasked.shape} and {masked.shape}"
        )
    n = unmasked.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")

    same_identity = labels[:, None] == labels[None, :]
    if protocol == "masked-unmasked":
        similarity = _unit_rows(masked, "masked") @ _unit_rows(unmasked, "unmasked").T
        compared = ~np.eye(n, dtype=bool)
    else:
        name = protocol.split("-")[0]
        rows = _unit_rows(masked if name == "masked" else unmasked, name)
        similarity = rows @ rows.T
        compared = np.triu(np.ones((n, n), dtype=bool), k=1)
    return similarity[compared], same_identity[compared]


def pair_scores(
    unmasked: np.ndarray,
    masked: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    protocol: str,
) -> np.ndarray:
    """Cosine score of each listed pair ``(first[k], second[k])`` under a protocol.

    ``masked-unmasked`` compares the masked ``first`` photo with the
    unmasked ``second`` one; the other protocols compare like with like.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    unmasked, masked = np.asarray(unmasked), np.asarray(masked)
    if unmasked.ndim != 2 or unmasked.shape != masked.shape:
        raise ValueError(
            f"unmasked and masked must be (n, d) with equal shapes, got {unmasked.shape} and {masked.shape}"
        )
    first, second = np.asarray(first), np.asarray(second)
    if first.ndim != 1 or first.shape != second.shape:
        raise ValueError(f"pair index arrays must be 1-D with equal shapes, got {first.shape} and {second.shape}")
    n = unmasked.shape[0]
    if first.size and (min(first.min(), second.min()) < 0 or max(first.max(), second.max()) >= n):
        raise ValueError(f"pair indices must be in [0, {n})")
    left_name, right_name = protocol.split("-")
    left = _unit_rows(masked if left_name == "masked" else unmasked, left_name)
    right = left if left_name == right_name else _unit_rows(unmasked, right_name)
    return np.einsum("ij,ij->i", left[first], right[second])


def protocol_result(protocol: str, scores: np.ndarray, is_genuine: np.ndarray, fprs=DEFAULT_FPRS) -> ProtocolResult:
    """Operating points of one protocol's pairs, with the pair counts behind them."""
    is_genuine = _as_bool_labels(is_genuine)
    n_genuine = int(np.count_nonzero(is_genuine))
    return ProtocolResult(
        protocol=protocol,
        n_genuine=n_genuine,
        n_impostor=is_genuine.size - n_genuine,
        points=tuple(tpr_at_fpr(scores, is_genuine, fprs)),
    )


ROC_POINTS = 200  # points of each curve kept in a report


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, keep: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """About ``ROC_POINTS`` points of an exact curve, log-spaced in FPR, plus the points at FPRs ``keep``.

    Every point returned is a point of the curve: the last one at or below each grid FPR.
    """
    positive = np.flatnonzero(fpr > 0)
    grid = np.geomspace(fpr[positive[0]], 1.0, ROC_POINTS) if positive.size else np.array([])
    wanted = np.concatenate([grid, np.asarray(keep, dtype=np.float64)])
    rows = np.unique(np.clip(np.searchsorted(fpr, wanted, side="right") - 1, 0, fpr.size - 1))
    return fpr[rows], tpr[rows]


# insightface's threshold grid: squared L2 distances between unit embeddings span [0, 4].
KFOLD_THRESHOLDS = np.arange(0, 4, 0.01)


@dataclass(frozen=True)
class FoldAccuracy:
    """k-fold verification accuracy: ``mean`` ± ``std`` (population) over ``folds``."""

    mean: float
    std: float
    folds: tuple[float, ...]
    thresholds: tuple[float, ...]  # the squared-distance threshold chosen for each test fold

    def to_dict(self) -> dict:
        return asdict(self)


def kfold_accuracy(
    distances: np.ndarray, is_genuine: np.ndarray, n_folds: int = 10, thresholds: np.ndarray = KFOLD_THRESHOLDS
) -> FoldAccuracy:
    """Verification accuracy as insightface reports it for lfw, cfp_fp, agedb_30.

    The pairs are split in order into ``n_folds`` contiguous folds (the first
    ``n % n_folds`` one pair longer, as ``sklearn.model_selection.KFold``
    without shuffling).  For each fold the threshold with the best accuracy on
    the other folds (the first one on ties) predicts "same" for pairs with
    ``distance < threshold``, and its accuracy on the fold is recorded.
    ``distances`` are squared L2 distances between unit embeddings.
    """
    distances = np.asarray(distances, dtype=np.float64)
    is_genuine = _as_bool_labels(is_genuine)
    if distances.ndim != 1 or distances.shape != is_genuine.shape:
        raise ValueError(
            f"distances and is_genuine must be 1-D with equal shapes, got {distances.shape} and {is_genuine.shape}"
        )
    if not 2 <= n_folds <= distances.size:
        raise ValueError(f"need 2 <= n_folds <= pairs, got {n_folds} folds for {distances.size} pairs")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = np.array_split(np.arange(distances.size), n_folds)
    # correct[f, t]: pairs of fold f that threshold t classifies right.
    correct = np.stack([((distances[f, None] < thresholds[None, :]) == is_genuine[f, None]).sum(axis=0) for f in folds])
    accuracies, chosen = [], []
    for f, test in enumerate(folds):
        train_correct = correct.sum(axis=0) - correct[f]  # same argmax as the train accuracy
        best = int(np.argmax(train_correct))
        accuracies.append(float(correct[f, best]) / test.size)
        chosen.append(float(thresholds[best]))
    return FoldAccuracy(float(np.mean(accuracies)), float(np.std(accuracies)), tuple(accuracies), tuple(chosen))


def squared_distances(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise squared L2 distance between the unit-normalised rows of two ``(n, d)`` arrays."""
    a, b = _unit_rows(left, "left"), _unit_rows(right, "right")
    return np.sum(np.square(a - b), axis=1)


def verification_report(
    unmasked: np.ndarray,
    masked: np.ndarray,
    labels: np.ndarray,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
) -> dict[str, ProtocolResult]:
    """Operating points and pair counts for every protocol, in ``PROTOCOLS`` order."""
    return {
        protocol: protocol_result(protocol, *protocol_scores(unmasked, masked, labels, protocol), fprs)
        for protocol in PROTOCOLS
    }


def _as_bool_labels(is_genuine: np.ndarray) -> np.ndarray:
    """Accept bool or 0/1 labels; anything else is almost surely a mix-up."""
    is_genuine = np.asarray(is_genuine)
    if is_genuine.dtype != bool:
        if not np.all(np.isin(is_genuine, (0, 1))):
            raise ValueError("is_genuine must be boolean or 0/1")
        is_genuine = is_genuine.astype(bool)
    return is_genuine


def _unit_rows(embeddings: np.ndarray, name: str) -> np.ndarray:
    """L2-normalised float64 rows; a zero or non-finite row has no direction."""
    rows = np.asarray(embeddings, dtype=np.float64)
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name} embeddings contain NaN or infinite values")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} embeddings contain an all-zero row")
    return rows / norms
