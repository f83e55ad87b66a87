"""Prometheus metrics of a training process (contract: ../shared/design.md).

Names carry the ``mfr_`` prefix and base units; the ``rank`` label tells the
processes apart (never ``job``, which Prometheus renames).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CHECKPOINT_SAVE_SECONDS = Histogram(
    "mfr_checkpoint_save_seconds",
    "Wall time of a checkpoint save, from its start to its commit",
    ["rank"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
CHECKPOINT_STALL_SECONDS = Histogram(
    "mfr_checkpoint_stall_seconds",
    "Time the training loop was blocked by a checkpoint save (staging to host memory)",
    ["rank"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHECKPOINT_BYTES = Gauge("mfr_checkpoint_bytes", "Size of the last committed checkpoint", ["rank"])
CHECKPOINT_LAST_SUCCESS = Gauge(
    "mfr_checkpoint_last_success_timestamp_seconds", "Unix time of the last committed checkpoint", ["rank"]
)
CHECKPOINT_FAILURES = Counter("mfr_checkpoint_failures_total", "Checkpoint saves that failed", ["rank"])
BAD_SAMPLES = Counter("mfr_bad_samples_total", "Training samples skipped as unreadable or mislabelled", ["rank"])
