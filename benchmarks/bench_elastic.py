"""Elastic recovery time: from a lost node to the first resumed training step.

    python benchmarks/bench_elastic.py

An elastic 2-node job (``--elastic 1:2``, the demo model, a checkpoint every
5 steps) trains until its first checkpoint; then one whole emulated node
(its torchrun agent and workers, not the one hosting the rendezvous store)
is SIGKILLed.  Measured: seconds from the kill to the survivors' new start
(failure detected, re-rendezvoused, workers restarted) and to the first
training step after resuming from the checkpoint.  Once with the rendezvous
settings mfr uses (``mfr.ctl.launcher.RDZV_CONF``) and once with torchrun's
defaults, in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support

from mfr.ctl.launcher import RDZV_CONF, LocalJob, RunningJob, free_port
from mfr.trainer.config import load_config
from tests.support.processes import agent_of, kill_tree, store_host
from tests.support.runs import read_events


def _wait(predicate, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise TimeoutError


def measure(rdzv_conf: str, run_dir: Path) -> tuple[float, float]:
    cfg = load_config(
        None,
        [
            "run.steps=100000",
            "run.log_every=1",
            "checkpoint.every_steps=5",
            "eval.at_start=false",
            f"run.output_dir={json.dumps(str(run_dir))}",
        ],
    )
    config = run_dir / "config.yaml"
    run_dir.mkdir(parents=True)
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    job = LocalJob(
        nodes=2,
        nproc_per_node=1,
        config_path=config,
        run_dir=run_dir,
        master_port=free_port(),
        elastic=(1, 2),
        run_id=run_dir.name,
        rdzv_conf=rdzv_conf,
    )
    running = RunningJob.start(job)
    try:
        _wait(lambda: [e for e in read_events(run_dir) if e["event"] == "checkpoint"])
        host = agent_of(store_host(job.master_port), [a.pid for a in running.agents])
        lost = next(a.pid for a in running.agents if a.pid != host)
        killed = time.time()
        kill_tree(lost)
        restart = _wait(lambda: [e for e in read_events(run_dir) if e["event"] == "start" and e["time"] > killed])[0]
        events = _wait(
            lambda: (
                (ev := read_events(run_dir))
                and any(e["event"] == "step" and e["time"] > restart["time"] for e in ev)
                and ev
            )
        )
        step = next(e for e in events if e["event"] == "step" and e["time"] > restart["time"])
        return restart["time"] - killed, step["time"] - killed
    finally:
        running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"# {platform.machine()}, {os.cpu_count()} cores; elastic 1:2 job, one node SIGKILLed after a checkpoint")
    print("| rendezvous settings | kill -> workers restarted (s) | kill -> first resumed step (s) | vs default |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: measure(conf, Path(tmp) / name.split()[0])
            for name, conf in (("torchrun defaults", ""), (f"mfr: {RDZV_CONF}", RDZV_CONF))
        }
    base = results["torchrun defaults"][1]
    for name, (restarted, stepped) in results.items():
        print(f"| {name} | {restarted:.1f} | {stepped:.1f} | {stepped / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
