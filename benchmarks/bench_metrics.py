"""Overhead of the Prometheus metrics on the training step: exporter on vs off, in one run.

    python benchmarks/bench_metrics.py --blocks 6 --steps 10

One process (a world of one on gloo) runs the real Trainer on the built-in
demo config and alternates blocks of steps:

* on:  the loop's instruments record every step (TrainMetrics.after_step),
  and a client in another process (as Prometheus is) scrapes the exporter
  every ``--scrape-interval`` seconds (1 s: far more often than a real
  Prometheus, 15-30 s);
* off: no instruments, no scrapes.

The step is the loop's iteration as in Trainer.fit: batch fetch, train_step,
then the instruments.  Blocks alternate (on, off, on, ...) so drift on a
shared machine hits both alike.  Because that noise is larger than the
effect, it also measures the cost itself: one after_step call (mean of
100k) and one scrape of the exporter, and derives the overhead from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


_SCRAPER = """
import os, sys, time, urllib.request
url, flag, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
while True:
    if os.path.exists(flag):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=5) as resp:
            resp.read()
        print(time.perf_counter() - t0, flush=True)
    time.sleep(interval)
"""


class _Off:
    def after_step(self, *args, **kwargs) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6, help="blocks per mode")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    args = parser.parse_args()

    from mfr.trainer.config import load_config
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.loop import Trainer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config(
        None,
        [
            f"data.batch_size={args.batch_size}",
            "run.device=cpu",
            "checkpoint.every_steps=null",
            "optim.warmup_steps=0",
            "eval.num_identities=2",
            "eval.images_per_identity=2",
            "run.output_dir=/tmp/mfr-bench-metrics",
            "metrics.address=127.0.0.1",
            f"metrics.port={port}",
        ],
    )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    trainer = Trainer(cfg, DistEnv(0, 0, 1, 1, 0, torch.device("cpu")))
    logging.getLogger("mfr").setLevel(logging.WARNING)  # no progress lines in the timings
    assert trainer.metrics_url is not None, "the exporter did not start"
    on_metrics, off_metrics = trainer.metrics, _Off()
    batches = iter(trainer.data)

    flag = Path(tempfile.mkdtemp()) / "scrape"  # the scraper process scrapes while this file exists
    scraper = subprocess.Popen(
        [sys.executable, "-c", _SCRAPER, trainer.metrics_url, str(flag), str(args.scrape_interval)],
        stdout=subprocess.PIPE,
        text=True,
    )

    class scraping:
        @staticmethod
        def set() -> None:
            flag.touch()

        @staticmethod
        def clear() -> None:
            flag.unlink(missing_ok=True)

    def step(instruments) -> float:  # Trainer.fit's loop body
        started = time.perf_counter()
        images, labels = next(batches)
        fetched = time.perf_counter()
        loss = trainer.train_step(images, labels)
        trainer.checkpointer.after_step(trainer.step)
        instruments.after_step(
            trainer.step,
            cfg.data.batch_size,
            loss,
            trainer.lr,
            trainer.last_grad_norm,
            seconds=time.perf_counter() - started,
            data_wait=fetched - started,
        )
        return time.perf_counter() - started

    for _ in range(3):  # warm-up
        step(on_metrics)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.blocks):
        for mode in ("on", "off"):
            trainer.metrics = on_metrics if mode == "on" else off_metrics
            (scraping.set if mode == "on" else scraping.clear)()
            times[mode] += [step(trainer.metrics) for _ in range(args.steps)]
    scraping.clear()
    scraper.terminate()
    scrape_times = [float(line) for line in scraper.communicate()[0].split()]

    n = 100_000
    t0 = time.perf_counter()
    for i in range(n):
        on_metrics.after_step(i, 64, 1.0, 0.1, 2.0, seconds=0.2, data_wait=0.01)
    call_us = (time.perf_counter() - t0) / n * 1e6
    scrape_ms = statistics.median(scrape_times) * 1e3

    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    result = {
        "machine": f"{_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch_size": args.batch_size,
        "steps_per_mode": len(times["on"]),
        "step_s_median_on": round(on, 4),
        "step_s_median_off": round(off, 4),
        "ab_overhead_pct": round((on - off) / off * 100, 2),
        "after_step_us": round(call_us, 2),
        "scrape_ms_median": round(scrape_ms, 2),
        "scrapes": len(scrape_times),
        "derived_overhead_pct_scrape_1s": round(
            (call_us * 1e-6 + scrape_ms * 1e-3 * off / args.scrape_interval) / off * 100, 3
        ),
        "derived_overhead_pct_scrape_30s": round((call_us * 1e-6 + scrape_ms * 1e-3 * off / 30) / off * 100, 4),
    }
    print(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
