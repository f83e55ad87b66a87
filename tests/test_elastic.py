"""Lost pods, preemption and elastic membership changes, end to end, with real torchrun agents.

An emulated pod is a ``python -m mfr.trainer.launch`` agent (the pod command)
with the operator's environment.  Workers are killed with SIGKILL, whole
nodes are lost, nodes join, and pods are SIGTERMed; each time the job must
resume from its newest committed checkpoint and go on where it was.  In a
static job nothing restarts inside a pod: the surviving pods exit with a
retryable code, and the operator (played by mfrctl train) recreates them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mfr.ctl.launcher import LocalJob, _descendants, free_port
from mfr.trainer.storage import MARKER, Storage
from tests.support.cli import MFRCTL
from tests.support.configs import TINY_RUN
from tests.support.processes import agent_of, kill_tree, store_host
from tests.support.runs import assert_learned, read_events

pytestmark = pytest.mark.e2e


def _wait(what: str, predicate, timeout: float = 240, alive: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"the job ended (exit {alive.returncode}) while waiting for {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _agents(config: Path) -> list[int]:
    """Agent (pod) processes of a run, found by their command line."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mfr.trainer.launch" in argv and str(config).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def _resumes(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == "resume"]


def _start_before(events: list[dict], resume: dict) -> dict:
    """The start event of the incarnation that resumed (it comes just before its resume)."""
    return [e for e in events[: events.index(resume)] if e["event"] == "start"][-1]


def _steps_after(events: list[dict], resume: dict) -> list[dict]:
    index = events.index(resume)
    return [e for e in events[index:] if e["event"] == "step"]


def test_elastic_job_survives_a_killed_worker_a_joining_node_and_a_lost_node(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            *MFRCTL,
            "train",
            "--nodes",
            "2",
            "--elastic",
            "1:3",
            "--master-port",
            str(port),
            "--output-dir",
            str(tmp_path),
            "-o",
            "json",
            "--set",
            "run.steps=100",
            "--set",
            "checkpoint.every_steps=10",
            "--set",
            "run.log_every=5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    config = tmp_path / "config.yaml"
    extra = None
    try:

        def committed_at_least(step):
            return lambda: [e for e in read_events(tmp_path) if e["event"] == "checkpoint" and e["step"] >= step]

        # (a) kill -9 one worker process
        _wait("a first checkpoint", committed_at_least(10), alive=proc)
        agents = _agents(config)
        assert len(agents) == 2
        victim = _trainer_of(agents[1])
        os.kill(victim, signal.SIGKILL)
        first = _wait("a resume after the killed worker", lambda: _resumes(tmp_path), alive=proc)[0]
        assert first["step"] >= 10 and first["from_world_size"] == 2

        # (c) a node joins: every worker is restarted in a world of 3
        _wait("a checkpoint after the first resume", committed_at_least(first["step"] + 10), alive=proc)
        job = LocalJob(
            nodes=3,
            nproc_per_node=1,
            config_path=config,
            run_dir=tmp_path,
            master_port=port,
            elastic=(1, 3),
            run_id=tmp_path.resolve().name,
        )
        extra = subprocess.Popen(
            [*job.command()],
            env=os.environ | job.node_env(2) | {"OMP_NUM_THREADS": "1"},
            stdout=open(tmp_path / "node-2.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        second = _wait("a resume in a world of 3", lambda: _resumes(tmp_path)[1:], alive=proc)[0]
        joined = _start_before(read_events(tmp_path), second)
        assert joined["world_size"] == 3 and second["step"] > first["step"]

        # (b) a whole node is lost: the one that joined (mfrctl train's operator would recreate its own pods;
        # this one it never created).  It never hosts the rendezvous store: that agent came first.
        _wait(
            "a checkpoint in the world of 3",
            lambda: [
                e for e in read_events(tmp_path)[read_events(tmp_path).index(joined) :] if e["event"] == "checkpoint"
            ],
            alive=proc,
        )
        assert agent_of(store_host(port), _agents(config)) != extra.pid
        kill_tree(extra.pid)
        third = _wait("a resume after the lost node", lambda: _resumes(tmp_path)[2:], alive=proc)[0]
        back = _start_before(read_events(tmp_path), third)
        assert back["world_size"] == 2 and third["step"] > second["step"]

        out, err = proc.communicate(timeout=600)
    finally:
        for p in (proc, extra):
            if p is not None and p.poll() is None:
                kill_tree(p.pid)
    assert proc.returncode == 0, err[-3000:]

    events = read_events(tmp_path)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[-1]["step"] == 100
    initial_loss = steps[0]["loss"]
    for resume in _resumes(tmp_path):
        after = _steps_after(events, resume)
        # the job went on from the checkpoint: later step numbers and a loss far below the start
        assert after[0]["step"] > resume["step"] >= 10
        assert after[0]["loss"] < initial_loss - 0.5, (resume, after[0], initial_loss)
    assert_learned(json.loads(out), min_gain=0.1)


def _pod(tmp_path: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """One static pod: the launch wrapper with the operator's environment."""
    config = tmp_path / "config.yaml"
    if not config.exists():
        args = [sys.executable, "-m", "mfr.ctl.main", "config", "show", "--set", f"run.output_dir={tmp_path}"]
        for o in overrides:
            args += ["--set", o]
        config.write_text(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    job = LocalJob(nodes=1, nproc_per_node=nproc, config_path=config, run_dir=tmp_path, master_port=free_port())
    env = os.environ | job.node_env(0) | {"OMP_NUM_THREADS": "1", "MFR_EVENTS_FILE": str(tmp_path / "events.jsonl")}
    return subprocess.Popen(job.command(), env=env, stdout=open(tmp_path / "pod.log", "ab"), stderr=subprocess.STDOUT)


SMALL = (
    "run.steps=40",
    "run.log_every=2",
    "eval.num_identities=10",
    "eval.images_per_identity=4",
    "eval.at_start=false",
    "data.batch_size=16",
    "optim.warmup_steps=2",
)


def test_sigterm_commits_a_checkpoint_and_exits_143_then_the_pod_resumes_there(tmp_path):
    pod = _pod(tmp_path, *SMALL, "checkpoint.every_steps=1000")
    _wait(
        "training steps",
        lambda: [e for e in read_events(tmp_path) if e["event"] == "step" and e["step"] >= 6],
        alive=pod,
    )
    pod.send_signal(signal.SIGTERM)
    assert pod.wait(timeout=60) == 143, (tmp_path / "pod.log").read_text()[-3000:]
    (saved,) = [e for e in read_events(tmp_path) if e["event"] == "checkpoint"]
    assert saved["step"] >= 6
    storage = Storage(str(tmp_path / "checkpoints"))
    assert storage.latest_committed().step == saved["step"]

    again = _pod(tmp_path)
    assert again.wait(timeout=300) == 0, (tmp_path / "pod.log").read_text()[-3000:]
    (resume,) = _resumes(tmp_path)
    assert resume["step"] == saved["step"]
    assert [e["step"] for e in read_events(tmp_path) if e["event"] == "step"][-1] == 40


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_as_latest(tmp_path):
    # A big head (100k classes) makes a save take long enough to be interrupted.
    big = (
        "head.num_classes=100000",
        "data.images_per_identity=1",
        "model.embedding_size=256",
        "checkpoint.every_steps=2",
        "checkpoint.async_save=true",
        "head.sample_rate=0.1",
    )
    pod = _pod(tmp_path, *SMALL, *big)
    root = tmp_path / "checkpoints"
    try:
        _wait("a committed checkpoint", lambda: (root / "step-00000002" / MARKER).exists(), alive=pod)
        while True:  # catch a save in the act: its directory exists, its marker does not
            writing = _wait(
                "the next save", lambda: sorted(p for p in root.glob("step-*") if not (p / MARKER).exists()), alive=pod
            )[0]
            workers = _descendants(pod.pid)
            os.kill(workers[-1], signal.SIGKILL)
            if not (writing / MARKER).exists():
                break
            pytest.fail("the save finished before the kill; make the state bigger")  # pragma: no cover
        assert pod.wait(timeout=120) != 0
    finally:
        kill_tree(pod.pid)
    storage = Storage(str(root))
    committed = [c.step for c in storage.checkpoints() if c.committed]
    assert not (writing / MARKER).exists()
    assert (root / "latest").read_text().strip() == f"step-{committed[-1]:08d}"
    assert committed[-1] < int(writing.name.removeprefix("step-"))

    again = _pod(tmp_path)
    _wait("a resume", lambda: _resumes(tmp_path), alive=again)
    again.send_signal(signal.SIGTERM)
    again.wait(timeout=120)
    assert _resumes(tmp_path)[0]["step"] == committed[-1]
    # The interrupted save was removed on resume (the kill may have come before its first file: then an
    # empty folder, which is no checkpoint, may stay); the resumed run may have saved that step anew since.
    assert all(c.committed for c in Storage(str(root)).checkpoints())
    assert not writing.exists() or (writing / MARKER).exists() or not any(writing.iterdir())


def _static_train(tmp_path: Path, steps: int, *args: str) -> subprocess.Popen:
    sets = [a for s in (*TINY_RUN, "checkpoint.every_steps=10", f"run.steps={steps}") for a in ("--set", s)]
    return subprocess.Popen(
        [*MFRCTL, "train", "--nodes", "2", "--output-dir", str(tmp_path), "-o", "json", *args, *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_node_1_trainer(tmp_path: Path, proc: subprocess.Popen, after_step: int) -> None:
    """SIGKILL the training process of node 1 (a worker-0 pod's trainer), once a checkpoint is committed."""
    _wait(
        "a committed checkpoint",
        lambda: [e for e in read_events(tmp_path) if e["event"] == "checkpoint" and e["step"] >= after_step],
        alive=proc,
    )
    agents = sorted(_agents(tmp_path / "config.yaml"))
    os.kill(_trainer_of(agents[1]), signal.SIGKILL)


def _trainer_of(agent: int) -> int:
    """The training process below an agent (``python -m mfr.trainer``), not a helper process of torch's."""
    for pid in _descendants(agent):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mfr.trainer" in argv:
            return pid
    raise AssertionError(f"no trainer process below agent {agent}")


def _listeners(text: str) -> list[tuple[str, int, str]]:
    """(address, port, command line) of every listening TCP socket of a process whose command names ``text``."""
    addresses = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                addresses[fields[9]] = (address, int(port, 16))
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            argv = (fd_dir.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if text not in argv:
                continue
            for fd in fd_dir.iterdir():
                inode = os.readlink(fd).removeprefix("socket:[").removesuffix("]")
                if inode in addresses:
                    found.append((*addresses[inode], " ".join(argv)))
        except OSError:
            continue
    return found


LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def test_a_killed_trainer_restarts_its_pod_and_the_static_job_resumes_to_its_last_step(tmp_path):
    proc = _static_train(tmp_path, 60)
    try:
        _wait("a step", lambda: [e for e in read_events(tmp_path) if e["event"] == "step"], alive=proc)
        # what mfrctl train controls listens on loopback only: metrics and gloo's connections; torch's TCPStore
        # (the agents' rendezvous) binds every address of its own accord
        listening = _listeners(str(tmp_path / "config.yaml"))
        workers = [(a, p) for a, p, argv in listening if "mfr.trainer.launch" not in argv]
        assert len(workers) >= 4 and all(address == LOOPBACK_HEX for address, _ in workers), listening
        _kill_node_1_trainer(tmp_path, proc, 10)
        out, err = proc.communicate(timeout=600)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["steps"] == 60
    # the killed pod exited 137 (SIGKILL); its peer lost it and exited 129; the operator recreated both
    assert sorted((f["pod"], f["exit_code"]) for f in result["pod_failures"]) == [("master-0", 129), ("worker-0", 137)]
    assert result["restarts"] == 2
    (resumed,) = result["resumed_at"]
    assert resumed >= 10 and resumed % 10 == 0
    starts = [e for e in read_events(tmp_path) if e["event"] == "start"]
    assert len(starts) == 2 and all(s["world_size"] == 2 for s in starts)
    assert "pod worker-0 (node 1) exited 137 (SIGKILL, retryable); restarting it (restart 1 of backoffLimit 6)" in err


def test_with_backoff_limit_0_a_killed_trainer_fails_the_job_naming_the_pod(tmp_path):
    proc = _static_train(tmp_path, 200, "--backoff-limit", "0")
    try:
        _kill_node_1_trainer(tmp_path, proc, 10)
        out, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 1 and out == ""
    assert err.strip().splitlines()[-1] == (
        "error: training failed: pod worker-0 (node 1) exited 137 (SIGKILL, retryable), "
        "and backoffLimit 0 allows no more restarts"
    )
    assert "Traceback" not in err.strip().splitlines()[-1]
