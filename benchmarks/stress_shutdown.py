"""A finished run exits 0, every time: exit codes of short two-rank runs under load (issue 13).

    python benchmarks/stress_shutdown.py [--jobs 12] [--lanes 2] [--burners 4] [--timing-hook]

A job is one emulated pod (the pod command ``python -m mfr.trainer.launch``
with the operator's environment, 2 training processes) run twice on one
checkpoint directory: a first run with async saves every 2 steps, then a
second run of the same job that resumes from the first's newest checkpoint
and trains on.  Every other job's first run is SIGTERMed mid-training
instead: it must checkpoint and exit 143, and the resume starts there.
While a run lasts, a scraper polls both ranks' /metrics every 20 ms, and
``--burners`` busy loops plus ``--lanes`` jobs at a time load the cores.

Reported: every run whose exit code is not the expected one (0, or 143
after SIGTERM), with the log lines that say why (e.g. "terminate called
without an active exception", SIGABRT); the script exits 1 if there is one.

The abort of issue 13 needs a gloo worker thread descheduled at the wrong
moment, which load makes likely but not certain.  ``--timing-hook`` makes it
certain: every training process runs with benchmarks/gil_delay.c preloaded
(built here with ``cc``), armed at the start of the final evaluation, so
that the worker retiring the last collective takes the GIL only after the
main thread has returned from ``train``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.*

from mfr.ctl.launcher import LocalJob, free_port
from mfr.trainer.config import load_config
from mfr.trainer.progress import EVENTS_ENV
from tests.support.configs import ASYNC_SAVES
from tests.support.processes import kill_tree
from tests.support.runs import read_events

TINY = [*ASYNC_SAVES, "run.steps=12", "metrics.address=127.0.0.1"]
RESUMED_STEPS = 20  # the second run trains on to here
WHY = re.compile(r"terminate called|SIGABRT|Signal \d+|exitcode|Error|error:|Traceback")

# Arms the timing hook at the start of the final evaluation, in training processes only.
HOOK_SITECUSTOMIZE = """
import os
if "LOCAL_RANK" in os.environ:
    import ctypes
    from mfr.trainer.loop import Trainer
    _evaluate = Trainer.evaluate
    def _evaluate_armed(self, stage):
        if stage == "trained":
            ctypes.CDLL(None).gil_delay_arm()
        return _evaluate(self, stage)
    Trainer.evaluate = _evaluate_armed
"""


@dataclass
class Run:
    job: int
    kind: str  # "first", "sigtermed" or "resumed"
    expected: int
    code: int | str
    seconds: float
    scrapes: int
    delayed: int  # GIL takes the timing hook delayed (0 without --timing-hook)
    why: list[str]

    @property
    def ok(self) -> bool:
        return self.code == self.expected


def _burn() -> None:
    while True:
        pass


def _scrape(urls: list[str], stop: threading.Event, count: Counter) -> None:
    while not stop.is_set():
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    resp.read()
                count["ok"] += 1
            except Exception:
                count["failed"] += 1
        time.sleep(0.02)


def run_pod(job: int, kind: str, run_dir: Path, extra: list[str], hook_env: dict[str, str]) -> Run:
    """One run of the job's pod; SIGTERMed once it has trained 4 steps when ``kind`` is "sigtermed"."""
    port = free_port(2)
    pod = LocalJob(
        nodes=1,
        nproc_per_node=2,
        config_path=run_dir / "config.yaml",
        run_dir=run_dir,
        master_port=free_port(),
        metrics_port=port,
    )
    env = os.environ | pod.node_env(0) | {"OMP_NUM_THREADS": "1", EVENTS_ENV: str(pod.events_path)} | hook_env
    stop, scrapes = threading.Event(), Counter()
    urls = [url for _, _, url in pod.metrics_endpoints("127.0.0.1")]
    scraper = threading.Thread(target=_scrape, args=(urls, stop, scrapes))
    log = run_dir / f"{kind}.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*pod.command(), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
    scraper.start()
    code: int | str
    try:
        if kind == "sigtermed":
            seen = len(read_events(run_dir))
            while proc.poll() is None and not any(
                e["event"] == "step" and e["step"] >= 4 for e in read_events(run_dir)[seen:]
            ):
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        code = "timeout"
    finally:
        stop.set()
        scraper.join()
    text = log.read_text(errors="replace").splitlines()
    return Run(
        job,
        kind,
        143 if kind == "sigtermed" else 0,
        code,
        time.monotonic() - started,
        scrapes["ok"],
        sum("[gil_delay]" in line for line in text),
        [line for line in text if WHY.search(line)][:12],
    )


def run_job(job: int, root: Path, hook_env: dict[str, str]) -> list[Run]:
    run_dir = root / f"job-{job:03d}"
    run_dir.mkdir()
    cfg = load_config(None, [*TINY, f"run.output_dir={json.dumps(str(run_dir))}"])
    (run_dir / "config.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    first = run_pod(job, "sigtermed" if job % 2 else "first", run_dir, [], hook_env)
    resumed = run_pod(job, "resumed", run_dir, ["--set", f"run.steps={RESUMED_STEPS}"], hook_env)
    if not [e for e in read_events(run_dir) if e["event"] == "resume"]:
        resumed.why.insert(0, "the second run did not resume from the first's checkpoint")
        resumed.code = f"{resumed.code} (no resume)"
    for run in (first, resumed):
        print(
            f"job {job:3d} {run.kind:9s} exit {run.code} (expected {run.expected}) {run.seconds:6.1f} s "
            f"{run.scrapes} scrapes" + (f", {run.delayed} GIL takes delayed" if hook_env else ""),
            flush=True,
        )
    return [first, resumed]


def timing_hook(tmp: Path) -> dict[str, str]:
    """The environment that preloads benchmarks/gil_delay.c into every training process."""
    library = tmp / "gil_delay.so"
    source = Path(__file__).with_name("gil_delay.c")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"], check=True)
    (tmp / "sitecustomize.py").write_text(HOOK_SITECUSTOMIZE)
    return {
        "LD_PRELOAD": str(library),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")])),
        "GIL_DELAY_MS": "1000",
        "GIL_DELAY_LOCK_MS": "20",
    }


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12, help="jobs; each is 2 two-rank runs (default 12: 24 runs)")
    parser.add_argument("--lanes", type=int, default=2, help="jobs running at the same time")
    parser.add_argument("--burners", type=int, default=2 * (os.cpu_count() or 1), help="busy-loop processes")
    parser.add_argument("--timing-hook", action="store_true", help="force the race with benchmarks/gil_delay.c")
    args = parser.parse_args()

    import torch

    print(
        f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.jobs} jobs x 2 runs, "
        f"{args.lanes} at a time, {args.burners} busy loops" + (", timing hook on" if args.timing_hook else ""),
        flush=True,
    )
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mfr-stress-") as tmp:
            hook_env = timing_hook(Path(tmp)) if args.timing_hook else {}
            with ThreadPoolExecutor(args.lanes) as lanes:
                jobs = lanes.map(lambda job: run_job(job, Path(tmp), hook_env), range(args.jobs))
                runs = [run for job in jobs for run in job]
            load = os.getloadavg()
    finally:
        for b in burners:
            b.terminate()
    bad = [r for r in runs if not r.ok]
    print(
        f"\n{len(runs)} runs in {time.monotonic() - started:.0f} s (load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}); exit codes {dict(Counter(str(r.code) for r in runs))}"
    )
    print(f"unexpected exit codes: {len(bad)} of {len(runs)}")
    for r in bad:
        print(f"  job {r.job} {r.kind}: exit {r.code}, expected {r.expected}")
        for line in r.why:
            print(f"      {line[:200]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
