"""Verification at scale (tail, pairsets, score): exact TPR@FPR without keeping every score.

The reference is the brute force: every score of a protocol, kept, and
``verification.tpr_at_fpr`` (itself checked against sklearn) and
``sklearn.metrics.roc_curve`` over all of them.  Scores are those of the
fixed tiles (a score's definition, see ``pairsets``); embeddings of +-1
entries in 16 dimensions make every score a multiple of 1/8, exact in any
summation order, so the pairs themselves are checked against explicit loops,
and give heavy ties.  Ranks are simulated in one process (each rank's tail
gathered and merged), and run as real gloo processes by
``mfrctl eval --nproc 2``.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc_curve
from typer.testing import CliRunner

from mfr.trainer import pairsets, score, tail
from mfr.trainer.verification import PROTOCOLS, roc_curve, tpr_at_fpr
from tests.support.evalsets import without_timing, write_embedded_set
from tests.support.references import all_scores

FPRS = (0.5, 0.2, 0.1, 0.05, 0.01, 3e-3, 1e-3, 1e-4, 1e-6)


@pytest.fixture
def small_tiles(monkeypatch):
    """5 x 5 tiles, so a few dozen images span many tiles, diagonal ones and identities across tile edges."""
    monkeypatch.setattr(pairsets, "TILE", 5)


def _set(seed: int, n: int, ids: int, ties: bool, dim: int = 16):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, ids, n)
    if ties:
        unmasked = rng.choice([-1.0, 1.0], (n, dim))
        masked = unmasked * rng.choice([-1.0, 1.0], (n, dim), p=[0.2, 0.8])
    else:
        centres = rng.standard_normal((ids, dim))
        unmasked = centres[labels] + rng.standard_normal((n, dim))
        masked = unmasked + 0.7 * rng.standard_normal((n, dim))
    return pairsets.unit_rows(unmasked), pairsets.unit_rows(masked), labels


def _pair_sets(unmasked, masked, labels, gallery):
    """Every protocol all-vs-all, and masked probes against an unmasked gallery."""
    sets = {
        "unmasked-unmasked": pairsets.MatrixPairs(unmasked, labels, unmasked, labels, True, True),
        "masked-unmasked": pairsets.MatrixPairs(masked, labels, unmasked, labels, True, False),
        "masked-masked": pairsets.MatrixPairs(masked, labels, masked, labels, True, True),
        "split": pairsets.MatrixPairs(
            masked[~gallery], labels[~gallery], unmasked[gallery], labels[gallery], False, False
        ),
    }
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, len(labels), (2, 300))
    sets["list"] = pairsets.ListedPairs(masked, unmasked, first, second, labels[first] == labels[second])
    return sets


def _reference(pairs, fprs=FPRS, curve=None):
    """The brute force's operating points; ``curve`` ``(fpr, tpr)`` points must all lie on its exact curve."""
    genuine, impostor = all_scores(pairs)
    scores = np.concatenate([genuine, impostor]).astype(np.float64)
    is_genuine = np.arange(scores.size) < genuine.size
    points = tpr_at_fpr(scores, is_genuine, fprs)
    fpr, tpr, _ = sk_roc_curve(is_genuine, scores, drop_intermediate=False)
    for point in points:
        if point.supported:
            assert point.tpr == tpr[fpr <= point.target_fpr].max()  # the brute force is sklearn's
    if curve is not None:
        assert set(zip(*curve)) <= set(zip(*roc_curve(scores, is_genuine)[:2]))
    return points


class _LocalRanks:
    """Rank ``rank`` of ``world`` in this process: ranks run one after the other, rank 0 last, and gather."""

    def __init__(self, rank: int, world: int, store: list):
        self.rank, self.world, self.store = rank, world, store

    def gather(self, arrays):
        self.store.insert(0, arrays)
        return list(self.store) if self.rank == 0 else None


def _tail_points(pairs, keep, world, sample=4096, z=7.0):
    """Operating points from ``world`` ranks' tails merged (brackets from a sample), or None for missed targets."""
    n = pairs.n_impostor
    ks = [tail.allowed_false_accepts(f, n) for f in FPRS]
    bracketed = [i for i, f in enumerate(FPRS) if n * f >= 1 - 1e-9 and ks[i] + 1 > keep]
    brackets = (
        tail.brackets_from_sample(
            pairs.pair_scores(*pairs.sample_impostor_pairs(sample, 0)), [ks[i] for i in bracketed], n, z
        )
        if bracketed
        else []
    )
    store: list = []
    with pairsets.one_blas_thread():
        for rank in reversed(range(world)):
            merged = score._pass(pairs, keep, brackets, _LocalRanks(rank, world, store), lambda n: None)
    return tail.finish(*merged, pairs.n_genuine, n, FPRS, bracketed)


def test_pairs_are_each_protocols_pairs_once(small_tiles):
    unmasked, masked, labels = _set(0, 23, 5, ties=True)
    gallery = score.split_gallery(labels, 2)
    n = len(labels)
    loops = {
        "unmasked-unmasked": [(unmasked, a, unmasked, b) for a in range(n) for b in range(a + 1, n)],
        "masked-unmasked": [(masked, a, unmasked, b) for a in range(n) for b in range(n) if a != b],
        "masked-masked": [(masked, a, masked, b) for a in range(n) for b in range(a + 1, n)],
        "split": [(masked, a, unmasked, b) for a in range(n) for b in range(n) if not gallery[a] and gallery[b]],
    }
    for name, pairs in _pair_sets(unmasked, masked, labels, gallery).items():
        if name == "list":
            continue
        genuine, impostor = all_scores(pairs)
        expected = {True: Counter(), False: Counter()}
        for left, a, right, b in loops[name]:
            expected[bool(labels[a] == labels[b])][float(left[a] @ right[b])] += 1
        assert Counter(genuine.tolist()) == expected[True], name
        assert Counter(impostor.tolist()) == expected[False], name
        assert (pairs.n_genuine, pairs.n_impostor) == (len(genuine), len(impostor))
        assert sum(pairs.unit_pairs(u) for u in pairs.units()) == pairs.n_pairs == len(loops[name])
    # each identity's first 2 images (in row order) are its gallery
    for identity in np.unique(labels):
        rows = np.flatnonzero(labels == identity)
        assert gallery[rows].tolist() == [True] * min(2, rows.size) + [False] * (rows.size - 2)


def test_scores_are_float32_cosines():
    unmasked, masked, labels = _set(1, 40, 6, ties=False, dim=64)
    genuine, impostor = all_scores(pairsets.MatrixPairs(masked, labels, unmasked, labels, True, False))
    cosines = (masked @ unmasked.T).astype(np.float64)  # float64 products of the same unit rows
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    same = labels[:, None] == labels[None, :]
    np.testing.assert_allclose(np.sort(genuine), np.sort(cosines[off_diagonal & same]), atol=1e-6)
    np.testing.assert_allclose(np.sort(impostor), np.sort(cosines[off_diagonal & ~same]), atol=1e-6)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_tail_equals_the_brute_force_for_any_keep_and_rank_count(small_tiles, ties):
    unmasked, masked, labels = _set(2, 37, 4, ties)
    gallery = score.split_gallery(labels, 3)
    for name, pairs in _pair_sets(unmasked, masked, labels, gallery).items():
        reference = _reference(pairs)
        keeps = (1, 7, pairs.n_impostor // 3, pairs.n_impostor)
        if not pairs.can_sample:  # a list cannot bracket: it keeps every target's K+1 highest scores
            keeps = (1 + max(tail.allowed_false_accepts(f, pairs.n_impostor) for f in FPRS), pairs.n_impostor)
        for keep in keeps:
            for world in (1, 2, 3):
                done = _tail_points(pairs, keep, world)
                assert not done.missed, (name, keep, world)  # z = 7: a bracket never misses here
                assert [done.points[i] for i in range(len(FPRS))] == reference, (name, keep, world)
                _reference(pairs, curve=done.curve)  # every point reported for the curve is on it
                assert {(p.achieved_fpr, p.tpr) for p in reference if p.supported} <= set(zip(*done.curve))


def test_tiny_impostor_counts_and_targets_they_cannot_resolve(small_tiles):
    labels = np.array([0, 0, 0, 1, 1, 2])  # 11 impostor pairs unmasked-unmasked
    unmasked, _, _ = _set(3, 6, 3, ties=True)
    pairs = pairsets.MatrixPairs(unmasked, labels, unmasked, labels, True, True)
    assert (pairs.n_genuine, pairs.n_impostor) == (4, 11)
    reference = _reference(pairs)
    assert [p.supported for p in reference] == [True] * 3 + [False] * 6  # 11 x 0.05 < 1
    for keep in (1, 2, 11):
        done = _tail_points(pairs, keep, 2)
        assert [done.points[i] for i in range(len(FPRS))] == reference


def test_a_missed_bracket_is_scored_again_not_reported_wrong(small_tiles, monkeypatch):
    unmasked, masked, labels = _set(4, 60, 6, ties=False)
    pairs = pairsets.MatrixPairs(masked, labels, unmasked, labels, True, False)
    reference = _reference(pairs)
    # An unlucky sample: only the 5 highest impostor scores, so every bracket sits far above its target.
    highest = np.sort(all_scores(pairs)[1])[-5:]
    monkeypatch.setattr(pairs, "pair_scores", lambda rows, columns: np.resize(highest, rows.size))
    assert _tail_points(pairs, keep=3, world=1).missed
    entry = score.score_protocol(pairs, "masked-unmasked", FPRS, score.Ranks(join=False), max_kept=3)
    assert entry["passes"] == 2
    assert [tuple(p.values()) for p in entry["points"]] == [tuple(vars(p).values()) for p in reference]
    assert (entry["n_genuine"], entry["n_impostor"]) == (pairs.n_genuine, pairs.n_impostor)


def test_a_pair_list_beyond_max_kept_is_refused():
    unmasked, masked, labels = _set(5, 50, 5, ties=False)
    pairs = _pair_sets(unmasked, masked, labels, score.split_gallery(labels, 1))["list"]
    with pytest.raises(score.ConfigError, match="--max-kept 10"):
        score.score_protocol(pairs, "masked-unmasked", (0.1,), score.Ranks(join=False), max_kept=10)


# -- embedded sets, the scorer's processes and mfrctl eval -------------------------------------------------------------


def test_mfrctl_eval_on_two_ranks_gives_one_ranks_report(tmp_path):
    """2100 images: two tiles a side, so both ranks score; --max-kept 1000 brackets FPR 1e-1 .. 1e-3."""
    from mfr.ctl.main import app

    url = write_embedded_set(tmp_path / "set", 2100, 300)

    def cli(*args):
        result = CliRunner().invoke(
            app, ["eval", "--embedded", url, "-o", "json", "--max-kept", "1000", *args], catch_exceptions=False
        )
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["sets"][0]

    two, one = cli("--nproc", "2"), cli("--nproc", "1")
    assert (two["scoring"]["world_size"], one["scoring"]["world_size"]) == (2, 1)
    assert without_timing(two) == without_timing(one)
    assert [p["protocol"] for p in one["protocols"]] == list(PROTOCOLS)
    assert [p["passes"] for p in one["protocols"]] == [1, 1, 1]
    embedded = score.load_embedded(url)
    entry = one["protocols"][0]  # the brute force's (the tests above check the rest of the maths)
    assert [tuple(p.values()) for p in entry["points"]] == [
        tuple(vars(p).values())
        for p in _reference(score.protocol_pairs(embedded, entry["protocol"], 0, None), score.DEFAULT_FPRS)
    ]
    split = cli("--split", "2", "--nproc", "1")
    assert split["kind"] == "split" and split["scoring"]["split"] == 2
    expected = score.score_set(embedded, score.Ranks(join=False), split=2, max_kept=1000)
    for protocol in expected["protocols"]:
        protocol.pop("roc")  # -o json prints the report without its curves
    assert without_timing(split) == without_timing(expected)


def test_unreadable_embeddings_are_one_line_and_exit_2(tmp_path):
    from mfr.ctl.main import app

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["eval", "--embedded", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "has no index.json" in result.stderr, result.stderr
