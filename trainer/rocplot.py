"""The ROC figure of an evaluation report: one log-FPR panel per set, a curve per protocol (matplotlib, Agg)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any


def plot_roc(sets: list[dict[str, Any]], write: Callable[[bytes], None]) -> None:
    """Draw the ``roc`` points of each set's protocols (report entries) and hand the PNG bytes to ``write``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.2), squeeze=False)
    for ax, entry in zip(axes[0], sets):
        for protocol in entry["protocols"]:
            fpr, tpr = protocol["roc"]["fpr"], protocol["roc"]["tpr"]
            shown = [(f, t) for f, t in zip(fpr, tpr) if f > 0]
            ax.step([f for f, _ in shown], [t for _, t in shown], where="post", label=protocol["protocol"])
        ax.set_xscale("log")
        ax.set_xlim(min(1 / p["n_impostor"] for p in entry["protocols"]), 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{entry['name']} ({entry['kind']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write(buffer.getvalue())
