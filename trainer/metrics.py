"""Prometheus metrics of a training process (contract: ../shared/design.md).

Names carry the ``mfr_`` prefix and base units; the ``rank`` label tells the
processes apart (never ``job``, which Prometheus renames).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .config import METRICS_PORT_ENV
from .progress import log

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

# The training loop's own metrics (trainer/loop.py).
TRAIN_STEP = Gauge("mfr_train_step", "Optimizer steps done (the step the run has reached)", ["rank"])
TRAIN_SAMPLES = Counter("mfr_train_samples_total", "Training samples this rank has processed", ["rank"])
TRAIN_LOSS = Gauge("mfr_train_loss", "Training loss of the last step; NaN when it was non-finite", ["rank"])
TRAIN_LR = Gauge("mfr_train_learning_rate", "Learning rate of the last step", ["rank"])
TRAIN_GRAD_NORM = Gauge("mfr_train_grad_norm", "Global gradient norm of the last step, before clipping", ["rank"])
TRAIN_NONFINITE = Counter(
    "mfr_train_nonfinite_steps_total", "Steps skipped because the loss or the gradients were non-finite", ["rank"]
)
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TRAIN_STEP_SECONDS = Histogram(
    "mfr_train_step_seconds",
    "Wall time of one training step, data wait and checkpoint stall included",
    ["rank"],
    buckets=_STEP_BUCKETS,
)
TRAIN_DATA_WAIT_SECONDS = Histogram(
    "mfr_train_data_wait_seconds",
    "Time a training step waited for its batch",
    ["rank"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, *_STEP_BUCKETS),
)
WORLD_SIZE = Gauge("mfr_world_size", "Training processes in the job", ["rank"])
ELASTIC_RESTARTS = Gauge(
    "mfr_elastic_restarts",
    "Worker-group restarts of this process's torchrun agent (TORCHELASTIC_RESTART_COUNT)",
    ["rank"],
)
DEVICE_MEMORY = Gauge(
    "mfr_device_memory_bytes",
    "Memory of the training device: CUDA allocated (used) and its peak, or on CPU the process's resident set",
    ["rank", "device", "kind"],
)
EVAL_TPR = Gauge(
    "mfr_eval_tpr", "Verification TPR at a target FPR on held-out identities, by protocol", ["rank", "protocol", "fpr"]
)


def serve(cfg, local_rank: int) -> str | None:
    """Start this process's exporter on ``port + local_rank``; returns its URL.

    A metrics problem never stops training: a port in use (or any other
    socket error) prints one warning line and returns None.
    """
    import os

    from prometheus_client import start_http_server

    port = int(os.environ.get(METRICS_PORT_ENV) or cfg.port) + local_rank
    if not 0 < port < 65536:
        log.warning(f"metrics not served: port {port} is outside 1..65535; training continues")
        return None
    try:
        start_http_server(port, addr=cfg.address)
    except OSError as err:
        reason = "is already in use" if err.errno == 98 else f"cannot be opened ({err.strerror or err})"
        log.warning(
            f"metrics not served: port {port} on {cfg.address} {reason}; training continues "
            "(set metrics.port to a free port)"
        )
        return None
    return f"http://{cfg.address}:{port}/metrics"


class TrainMetrics:
    """The loop's instruments, bound to this rank once (a few microseconds a step, no device sync)."""

    def __init__(self, rank: int, world_size: int, restart_count: int, device) -> None:
        label = {"rank": str(rank)}
        self.rank = str(rank)
        self.step = TRAIN_STEP.labels(**label)
        self.samples = TRAIN_SAMPLES.labels(**label)
        self.loss = TRAIN_LOSS.labels(**label)
        self.lr = TRAIN_LR.labels(**label)
        self.grad_norm = TRAIN_GRAD_NORM.labels(**label)
        self.nonfinite = TRAIN_NONFINITE.labels(**label)
        self.step_seconds = TRAIN_STEP_SECONDS.labels(**label)
        self.data_wait = TRAIN_DATA_WAIT_SECONDS.labels(**label)
        WORLD_SIZE.labels(**label).set(world_size)
        ELASTIC_RESTARTS.labels(**label).set(restart_count)
        # Series that exist from the start at 0, so rates and alerts see them before the first event.
        BAD_SAMPLES.labels(**label)
        CHECKPOINT_FAILURES.labels(**label)
        CHECKPOINT_SAVE_SECONDS.labels(**label)
        self.device = device
        self.memory_used = DEVICE_MEMORY.labels(rank=self.rank, device=str(device), kind="used")
        self.memory_peak = DEVICE_MEMORY.labels(rank=self.rank, device=str(device), kind="peak")
        self.update_memory()

    def after_step(
        self, step: int, samples: int, loss: float | None, lr: float, grad_norm: float, seconds: float, data_wait: float
    ) -> None:
        self.step.set(step)
        self.samples.inc(samples)
        self.lr.set(lr)
        self.grad_norm.set(grad_norm)
        self.step_seconds.observe(seconds)
        self.data_wait.observe(data_wait)
        if loss is None:
            self.loss.set(float("nan"))
            self.nonfinite.inc()
        else:
            self.loss.set(loss)

    def update_memory(self) -> None:
        import resource

        import torch

        if self.device.type == "cuda":
            self.memory_used.set(torch.cuda.memory_allocated(self.device))
            self.memory_peak.set(torch.cuda.max_memory_allocated(self.device))
            return
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            self.memory_used.set(pages * resource.getpagesize())
        except (OSError, ValueError, IndexError):
            pass
        self.memory_peak.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux

    def eval_results(self, report) -> None:
        for protocol, result in report.items():
            for point in result.points:
                if point.tpr is not None:
                    EVAL_TPR.labels(rank=self.rank, protocol=protocol, fpr=f"{point.target_fpr:.0e}").set(point.tpr)
