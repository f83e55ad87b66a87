"""What a training run reports: its event log and its ``mfrctl train -o json`` result."""

from __future__ import annotations

import json
from pathlib import Path


def read_events(run_dir: Path) -> list[dict]:
    """The run's events.jsonl so far; a line still being written is left out."""
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def tpr_at(results: list[dict], protocol: str, fpr: float) -> float:
    """One evaluation's TPR of ``protocol`` at target ``fpr``, which it must resolve."""
    (result,) = [r for r in results if r["protocol"] == protocol]
    (point,) = [p for p in result["points"] if p["target_fpr"] == fpr]
    assert point["supported"], f"{protocol} cannot resolve FPR {fpr}"
    return point["tpr"]


def assert_learned(result: dict, min_gain: float) -> None:
    """``mfrctl train -o json``'s result: the trained model beats the untrained one on held-out identities."""
    results = result["eval"]
    before = tpr_at(results["untrained"], "masked-unmasked", 1e-3)
    after = tpr_at(results["trained"], "masked-unmasked", 1e-3)
    assert after >= before + min_gain, f"masked-unmasked TPR@1e-3 {before:.3f} -> {after:.3f}"
    for protocol in ("unmasked-unmasked", "masked-masked"):
        assert tpr_at(results["trained"], protocol, 1e-3) > tpr_at(results["untrained"], protocol, 1e-3)
