"""The trainer's exporter: the loop's instruments, and a busy port that must not stop training."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import torch
from prometheus_client import REGISTRY

from mfr.trainer import metrics
from mfr.trainer.config import MetricsConfig


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_train_metrics_record_a_step_and_a_nonfinite_step():
    m = metrics.TrainMetrics(rank=7, world_size=3, restart_count=2, device=torch.device("cpu"))
    assert _value("mfr_world_size", rank="7") == 3
    assert _value("mfr_elastic_restarts", rank="7") == 2
    assert _value("mfr_bad_samples_total", rank="7") == 0  # exported from the start
    assert _value("mfr_checkpoint_failures_total", rank="7") == 0
    assert _value("mfr_device_memory_bytes", rank="7", device="cpu", kind="used") > 0
    m.after_step(5, 16, 2.5, 0.1, 3.0, seconds=0.2, data_wait=0.05)
    m.after_step(6, 16, None, 0.1, float("inf"), seconds=0.3, data_wait=0.01)
    assert _value("mfr_train_step", rank="7") == 6
    assert _value("mfr_train_samples_total", rank="7") == 32
    assert math.isnan(_value("mfr_train_loss", rank="7"))
    assert _value("mfr_train_nonfinite_steps_total", rank="7") == 1
    assert _value("mfr_train_learning_rate", rank="7") == 0.1
    assert _value("mfr_train_step_seconds_count", rank="7") == 2
    assert abs(_value("mfr_train_step_seconds_sum", rank="7") - 0.5) < 1e-9
    assert abs(_value("mfr_train_data_wait_seconds_sum", rank="7") - 0.06) < 1e-9


def test_busy_port_is_one_warning_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = MetricsConfig(port=port, address="127.0.0.1")
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from mfr.trainer import metrics; from mfr.trainer.config import "
                f"MetricsConfig; print(metrics.serve(MetricsConfig.model_validate({cfg.model_dump()!r}), 0))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        f"[mfr] WARNING: metrics not served: port {port} on 127.0.0.1 is already in use; training continues "
        "(set metrics.port to a free port)",
        "None",
    ]


def test_training_goes_on_when_the_metrics_port_is_taken(tmp_path):
    """A world of one (python -m mfr.trainer) whose port is held by another socket finishes with exit 0."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sets = [
            "run.steps=2",
            "optim.warmup_steps=0",
            "eval.num_identities=4",
            "eval.images_per_identity=2",
            "eval.at_start=false",
            "data.batch_size=8",
            "checkpoint.every_steps=null",
            f"run.output_dir={tmp_path}",
            "metrics.address=127.0.0.1",
            f"metrics.port={port}",
        ]
        proc = subprocess.run(
            [sys.executable, "-m", "mfr.trainer", *[a for s in sets for a in ("--set", s)]],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if "metrics not served" in line]
    assert len(warnings) == 1 and f"port {port} on 127.0.0.1 is already in use" in warnings[0]
    assert "step 2/2" in proc.stdout
