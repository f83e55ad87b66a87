"""Emulate a multi-node PyTorchJob on one machine: its pods, and the operator's restarts.

Every emulated pod is one ``torchrun`` agent started with exactly the
environment the Kubeflow training operator (v1.9) injects into a pod, so the
trainer runs the real multi-node code path: static Master + Workers
(MASTER_ADDR/PORT, WORLD_SIZE, RANK, PET_*) or an elastic job
(PET_RDZV_ENDPOINT, PET_NNODES=min:max, ...).  See ../shared/design.md.

The operator's side is played too, as its v1.9 code does under
``restartPolicy: ExitCode``: a pod that exits with a permanent code (1-127)
fails the job; one that exits with a retryable code (128 or more) is deleted
and created again with the same environment, and resumes from the newest
committed checkpoint.  Each retried pod failure counts against
``backoff_limit``, as a batch Job counts failed pods.
No process outlives the launcher: every agent and its workers are stopped
when it exits, whatever the reason.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mfr.trainer import exitcodes
from mfr.trainer.config import METRICS_PORT_ENV
from mfr.trainer.progress import EVENTS_ENV

LOOPBACK = "127.0.0.1"
# torchrun with retryable exit codes on SIGTERM (see mfr.trainer.launch); the pod command too.
LAUNCH = [sys.executable, "-m", "mfr.trainer.launch"]
# Fast failure detection, so a lost node is noticed in seconds, not ~45 s.
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
    backoff_limit: int = 6  # retried pod failures before the job fails (runPolicy.backoffLimit)
    api: str = "pytorchjob"  # whose environment contract the pods get: pytorchjob (v1 operator) or trainjob (v2)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def events_path(self) -> Path:
        """Where rank 0 appends its JSON progress events."""
        return self.run_dir / "events.jsonl"

    def pod_name(self, node_rank: int) -> str:
        """The replica name of node ``node_rank``: master-0, worker-<i> (a TrainJob's: node-0-<i>)."""
        if self.api == "trainjob":
            return f"node-0-{node_rank}"
        if self.elastic is None:
            return "master-0" if node_rank == 0 else f"worker-{node_rank - 1}"
        return f"worker-{node_rank}"

    def node_env(self, node_rank: int) -> dict[str, str]:
        """What the operator (or Trainer v2's torch plugin) puts in pod ``node_rank``'s environment."""
        env = {} if self.metrics_port is None else {METRICS_PORT_ENV: str(self.node_metrics_port(node_rank))}
        if self.api == "trainjob":  # v2.3.0: PET_* only; no MASTER_ADDR, RANK or WORLD_SIZE
            return env | {
                "PET_NNODES": str(self.nodes),
                "PET_NPROC_PER_NODE": str(self.nproc_per_node),
                "PET_NODE_RANK": str(node_rank),
                "PET_MASTER_ADDR": LOOPBACK,
                "PET_MASTER_PORT": str(self.master_port),
            }
        env |= {"PYTHONUNBUFFERED": "1", "PET_NPROC_PER_NODE": str(self.nproc_per_node)}
        if self.elastic is None:
            env |= {
                "MASTER_ADDR": LOOPBACK,
                "MASTER_PORT": str(self.master_port),
                "PET_MASTER_ADDR": LOOPBACK,
                "PET_MASTER_PORT": str(self.master_port),
                "WORLD_SIZE": str(self.world_size),
                "RANK": str(node_rank),
                "PET_NODE_RANK": str(node_rank),
                "PET_NNODES": str(self.nodes),
            }
        else:
            low, high = self.elastic
            env |= {
                "PET_RDZV_ENDPOINT": f"{LOOPBACK}:{self.master_port}",
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
        host = LOOPBACK if address in ("0.0.0.0", "::", "") else address
        host = f"[{host}]" if ":" in host else host
        return [
            (node, local, f"http://{host}:{self.node_metrics_port(node) + local}/metrics")
            for node in range(self.nodes)
            for local in range(self.nproc_per_node)
        ]

    def command(self) -> list[str]:
        """The pod command: torchrun of the trainer module, via mfr.trainer.launch."""
        return [*LAUNCH, "--config", str(self.config_path)]


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 65535


def free_port(count: int = 1, tries: int = 200) -> int:
    """A port P such that P .. P+count-1 are free on 127.0.0.1.

    Picked below the kernel's ephemeral range, so no outgoing connection (gloo opens
    many) can take it between this pick and the trainer's bind, and never handed out
    twice by this process, so concurrent local jobs cannot collide as they could with
    bind-to-0 (every pod has its own network namespace on a cluster; here they share one).
    """
    low, _ = _ephemeral_range()
    ceiling = low if low > 20000 else 65535
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(15000, ceiling - count)
        ports = range(base, base + count)
        if _handed_out.intersection(ports):
            continue
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind((LOOPBACK, port))
        except OSError:
            continue
        _handed_out.update(ports)
        return base
    raise LaunchError(f"found no {count} free consecutive port(s) on {LOOPBACK}; pass --master-port")


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
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


@dataclass(frozen=True)
class PodFailure:
    """A pod that ended with a non-zero exit code, as the operator saw it."""

    node: int
    pod: str
    code: int

    @property
    def retryable(self) -> bool:
        return exitcodes.retryable(self.code)

    def __str__(self) -> str:
        return f"pod {self.pod} (node {self.node}) exited {exitcodes.describe(self.code)}"


@dataclass
class RunningJob:
    """The agents of a started LocalJob, one per emulated node, and the operator's view of them."""

    job: LocalJob
    agents: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    failures: list[PodFailure] = field(default_factory=list)  # every pod failure, retried or not
    failed: PodFailure | None = None  # the one that failed the job
    say: Callable[[str], None] = print  # where the operator's decisions are reported
    _settled: set[int] = field(default_factory=set)  # ended pods the operator leaves alone

    @classmethod
    def start(cls, job: LocalJob, say: Callable[[str], None] = print) -> RunningJob:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        job.events_path.unlink(missing_ok=True)
        running = cls(job, say=say)
        for node in range(job.nodes):
            running.logs.append(job.run_dir / f"node-{node}.log")
            running.logs[node].unlink(missing_ok=True)
            running.agents.append(running._start_agent(node))
        return running

    @property
    def restarts(self) -> int:
        """Pods deleted and created again after a retryable failure."""
        return sum(f.retryable for f in self.failures) - (self.failed is not None and self.failed.retryable)

    def _start_agent(self, node: int) -> subprocess.Popen:
        job = self.job
        threads = max(1, (os.cpu_count() or 1) // job.world_size)
        # gloo's connections between ranks listen on loopback only (torch's TCPStores bind every address)
        env = (
            os.environ
            | job.node_env(node)
            | {"OMP_NUM_THREADS": str(threads), EVENTS_ENV: str(job.events_path), "GLOO_SOCKET_IFNAME": "lo"}
        )
        with open(self.logs[node], "ab") as out:
            return subprocess.Popen(
                job.command(),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def poll(self) -> list[int | None]:
        """Each agent's exit code as a pod reports it (128 + signal when killed), or None."""
        codes = [agent.poll() for agent in self.agents]
        return [exitcodes.from_signal(-c) if c is not None and c < 0 else c for c in codes]

    def finished(self) -> int | None:
        """Play the operator once; the job's exit code once it is over, else None.

        A pod with a retryable code is restarted while the backoff limit allows;
        any other failure fails the job.  Static: the job succeeds when every pod
        has.  Elastic: like the operator, it succeeds as soon as any pod has, and
        is over when every pod is.
        """
        codes = self.poll()
        succeeded = 0 in codes
        # Pods that ended since the last look; a lost peer (129) is the consequence of another's end.
        ended = sorted((c == exitcodes.UNAVAILABLE, node) for node, c in enumerate(codes) if c not in (None, 0))
        for _, node in ended:
            if self.failed is not None or node in self._settled:
                continue
            if self.job.elastic is not None and succeeded:
                self._settled.add(node)  # the job has already succeeded: nothing is restarted
                continue
            failure = PodFailure(node, self.job.pod_name(node), codes[node])
            self.failures.append(failure)
            if not failure.retryable or self.restarts > self.job.backoff_limit:
                self.failed = failure
            else:
                self.say(
                    f"mfr: {failure}; restarting it (restart {self.restarts} of backoffLimit {self.job.backoff_limit})"
                )
                with open(self.logs[node], "ab") as out:
                    out.write(f"\n--- mfr: {failure}; restarted ---\n".encode())
                self.agents[node] = self._start_agent(node)
                codes[node] = None
        if self.failed is not None:
            return self.failed.code
        if self.job.elastic is None:
            return 0 if all(c == 0 for c in codes) else None
        return None if any(c is None for c in codes) else 0

    def failure_message(self) -> str:
        """One line naming the pod that failed the job, and why."""
        failed = self.failed
        assert failed is not None
        if failed.retryable:
            return f"{failed}, and backoffLimit {self.job.backoff_limit} allows no more restarts"
        return str(failed)

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
        """The end of the log of the pod that failed the job (or node 0's)."""
        index = self.failed.node if self.failed is not None else 0
        text = self.logs[index].read_text(errors="replace").splitlines()
        return f"--- {self.logs[index]} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
