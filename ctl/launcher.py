"""Emulate a multi-node PyTorchJob on one machine.

Every emulated pod is one ``torchrun`` agent started with exactly the
environment the Kubeflow training operator (v1.9) injects into a pod, so the
trainer runs the real multi-node code path: static Master + Workers
(MASTER_ADDR/PORT, WORLD_SIZE, RANK, PET_*) or an elastic job
(PET_RDZV_ENDPOINT, PET_NNODES=min:max, ...).  See ../shared/design.md.
No process outlives the launcher: every agent and its workers are stopped
when it exits, whatever the reason.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mfr.trainer.progress import EVENTS_ENV

# torchrun with retryable exit codes on SIGTERM (see mfr.trainer.launch); the pod command too.
LAUNCH = [sys.executable, "-m", "mfr.trainer.launch"]
# Fast failure detection, so a lost node is noticed in seconds, not ~45 s.
METRICS_PORT_ENV = "MFR_METRICS_PORT"  # = mfr.trainer.metrics.PORT_ENV (this module stays torch-free)
RDZV_CONF = "join_timeout=120,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3,close_timeout=10"
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A usage problem found before anything started (exit code 2)."""


@dataclass(frozen=True)
class LocalJob:
    nodes: int
    nproc_per_node: int
    config_path: Path
    run_dir: Path
    master_port: int
    elastic: tuple[int, int] | None = None
    max_restarts: int = 3
    run_id: str = "mfr-local"
    rdzv_conf: str = RDZV_CONF  # "" = torchrun's defaults
    # metrics.port of the run, or None when it serves no metrics.  Pods have their
    # own IPs; emulated nodes share one, so node i gets the ports after node i-1's.
    metrics_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def events_path(self) -> Path:
        """Where rank 0 appends its JSON progress events."""
        return self.run_dir / "events.jsonl"

    def node_env(self, node_rank: int) -> dict[str, str]:
        """What the operator puts in pod ``node_rank``'s environment."""
        env = {"PYTHONUNBUFFERED": "1", "PET_NPROC_PER_NODE": str(self.nproc_per_node)}
        if self.metrics_port is not None:
            env[METRICS_PORT_ENV] = str(self.node_metrics_port(node_rank))
        if self.elastic is None:
            env |= {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(self.master_port),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(self.master_port),
                "WORLD_SIZE": str(self.world_size),
                "RANK": str(node_rank),
                "PET_NODE_RANK": str(node_rank),
                "PET_NNODES": str(self.nodes),
            }
        else:
            low, high = self.elastic
            env |= {
                "PET_RDZV_ENDPOINT": f"127.0.0.1:{self.master_port}",
                "PET_RDZV_BACKEND": "c10d",
                "PET_NNODES": f"{low}:{high}",
                "PET_MAX_RESTARTS": str(self.max_restarts),
                "PET_RDZV_ID": self.run_id,
            }
            if self.rdzv_conf:
                env["PET_RDZV_CONF"] = self.rdzv_conf
        return env

    def node_metrics_port(self, node_rank: int) -> int:
        """The metrics port of local rank 0 on emulated node ``node_rank``."""
        assert self.metrics_port is not None
        return self.metrics_port + node_rank * self.nproc_per_node

    def metrics_endpoints(self, address: str) -> list[tuple[int, int, str]]:
        """(node, local rank, URL) of every training process's /metrics."""
        if self.metrics_port is None:
            return []
        host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
        host = f"[{host}]" if ":" in host else host
        return [
            (node, local, f"http://{host}:{self.node_metrics_port(node) + local}/metrics")
            for node in range(self.nodes)
            for local in range(self.nproc_per_node)
        ]

    def command(self) -> list[str]:
        """The pod command: torchrun of the trainer module, via mfr.trainer.launch."""
        return [*LAUNCH, "--config", str(self.config_path)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise LaunchError(
                f"rendezvous port {port} on 127.0.0.1 is already in use; "
                "pass --master-port with a free port (0 picks one)"
            ) from None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (workers of a torchrun agent, their loaders)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class RunningJob:
    """The agents of a started LocalJob, one per emulated node."""

    job: LocalJob
    agents: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def start(cls, job: LocalJob) -> RunningJob:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        job.events_path.unlink(missing_ok=True)
        threads = max(1, (os.cpu_count() or 1) // job.world_size)
        running = cls(job)
        for node in range(job.nodes):
            log = job.run_dir / f"node-{node}.log"
            env = os.environ | job.node_env(node) | {"OMP_NUM_THREADS": str(threads), EVENTS_ENV: str(job.events_path)}
            with open(log, "wb") as out:
                agent = subprocess.Popen(
                    job.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                )
            running.agents.append(agent)
            running.logs.append(log)
        return running

    def poll(self) -> list[int | None]:
        return [agent.poll() for agent in self.agents]

    def finished(self) -> int | None:
        """The job's exit code once it is over, else None.

        Static: the first failing node fails the job (its peers would only
        hang in collectives).  Elastic: like the operator, the job is over when
        every agent is, and has succeeded if any agent succeeded.
        """
        codes = self.poll()
        if self.job.elastic is None:
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            return 0 if all(c == 0 for c in codes) else None
        if any(c is None for c in codes):
            return None
        return 0 if 0 in codes else next(c for c in codes if c)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every agent and worker, SIGKILL what is left after ``grace``."""
        pids = [pid for agent in self.agents for pid in (agent.pid, *_descendants(agent.pid))]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for agent in self.agents:
            try:
                agent.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for agent in self.agents:
            agent.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The end of the first failed node's log (or node 0's)."""
        codes = self.poll()
        index = next((i for i, c in enumerate(codes) if c not in (None, 0)), 0)
        text = self.logs[index].read_text(errors="replace").splitlines()
        return f"--- {self.logs[index]} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
