"""Embedded evaluation sets (the features ``mfrctl eval`` writes) with a known structure, and reports compared
without their timings."""

from __future__ import annotations

import numpy as np

from mfr.trainer.features import FeatureWriter


def write_embedded_set(root, n: int, ids: int, dim: int = 24, seed: int = 6) -> str:
    """A set folder as mfrctl eval writes it (rows in no identity order, shards of 700 rows)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, ids, n)
    centres = rng.standard_normal((ids, dim))
    unmasked = centres[labels] + 1.2 * rng.standard_normal((n, dim))
    masked = unmasked + 0.8 * rng.standard_normal((n, dim))
    for condition, rows in (("unmasked", unmasked), ("masked", masked)):
        writer = FeatureWriter(f"{root}/{condition}", None, dim, 700)
        writer.add(rows, labels)
        writer.close({"eval": {"data": "synthetic"}})
    return str(root)


def without_timing(entry: dict) -> dict:
    """A set's report less its ``scoring`` section (world size, seconds), which differs between equal runs."""
    return {k: v for k, v in entry.items() if k != "scoring"}
