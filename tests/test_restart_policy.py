"""Exit codes and the operator's restart policy (restartPolicy: ExitCode), without training.

A pod's code comes from its workers' (mfr.trainer.launch); the operator
(played by mfr.ctl.launcher.RunningJob, here over real processes that exit
with chosen codes) recreates pods that exit 128 or more and fails the job on
anything else.  The end-to-end runs are in tests/test_elastic.py.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from mfr.ctl.launcher import LocalJob, RunningJob
from mfr.trainer import exitcodes
from mfr.trainer.dist import is_peer_loss
from mfr.trainer.launch import worker_exit_code


@pytest.mark.parametrize(
    "failures, expected",
    [
        ([(1.0, -9)], 137),  # a worker killed (the OOM killer): retryable
        ([(1.0, 129), (2.0, -15)], 129),  # the earliest retryable code
        ([(1.0, 129), (1.0, -15)], 143),  # in the same second, the lost peer is the consequence
        ([(2.0, 129), (1.0, -6)], 134),
        ([(1.0, 129), (2.0, 2)], 2),  # a config error on one rank is never retried for a lost peer on another
        ([(1.0, -9), (2.0, 1)], 1),
        ([(2.0, 1), (1.0, 2)], 2),  # the earliest permanent code
    ],
)
def test_a_pods_exit_code_is_the_earliest_permanent_one_else_the_earliest_retryable(failures, expected):
    assert worker_exit_code(failures) == expected


def test_exit_codes_say_what_they_mean():
    assert [exitcodes.retryable(c) for c in (0, 1, 2, 127, 128, 129, 137, 143)] == [False] * 4 + [True] * 4
    assert exitcodes.UNAVAILABLE == 128 + signal.SIGHUP and exitcodes.PREEMPTED == 143
    assert exitcodes.describe(137) == "137 (SIGKILL, retryable)"
    assert exitcodes.describe(2) == "2 (config error, permanent)"
    assert exitcodes.describe(129) == "129 (peer or store unavailable, retryable)"


@pytest.mark.parametrize(
    "error, lost",
    [
        (
            RuntimeError(
                "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:5012: "
                "Connection reset by peer. This is typically caused by a remote worker hanging"
            ),
            True,
        ),
        (RuntimeError("[gloo/transport/tcp/pair.cc:446] Connection closed by peer [10.0.0.3]:36871"), True),
        (RuntimeError("Timed out waiting 1800000ms for recv operation to complete"), True),
        (dist.DistNetworkError("failed to recv, got 0 bytes"), True),
        (dist.DistStoreError("Timed out after 901 seconds waiting for clients"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 64x16)"), False),
        (ValueError("Connection reset by peer"), False),  # not a distributed error, whatever it says
    ],
)
def test_lost_peers_are_told_from_the_runs_own_errors(error, lost):
    assert is_peer_loss(error) is lost


def test_a_peer_loss_is_found_behind_a_wrapping_error():
    try:
        try:
            raise dist.DistNetworkError("Broken pipe")
        except dist.DistNetworkError as inner:
            raise RuntimeError("checkpoint failed") from inner
    except RuntimeError as outer:
        assert is_peer_loss(outer)


@dataclasses.dataclass(frozen=True)
class ScriptedJob(LocalJob):
    """A LocalJob whose pods run a script that exits with the next code of its node's list."""

    codes: tuple[tuple[int, ...], ...] = ()

    def command(self) -> list[str]:
        script = (
            "import os, sys\n"
            "codes = [int(c) for c in os.environ['CODES'].split(',')]\n"
            "node = int(os.environ.get('PET_NODE_RANK', os.environ.get('NODE', '0')))\n"
            "marker = os.path.join(os.environ['RUN'], f'node-{node}.runs')\n"
            "runs = os.path.getsize(marker) if os.path.exists(marker) else 0\n"
            "open(marker, 'a').write('x')\n"
            "sys.exit(codes[min(runs, len(codes) - 1)])\n"
        )
        return [sys.executable, "-c", script]

    def node_env(self, node_rank: int) -> dict[str, str]:
        return super().node_env(node_rank) | {
            "CODES": ",".join(map(str, self.codes[node_rank])),
            "RUN": str(self.run_dir),
            "NODE": str(node_rank),
        }


def _run(tmp_path: Path, codes, elastic=None, backoff_limit=6, one_look=False) -> tuple[int, RunningJob, list[str]]:
    """Play the operator over scripted pods; one_look: it first looks once every first pod has ended."""
    said: list[str] = []
    job = ScriptedJob(
        nodes=len(codes),
        nproc_per_node=1,
        config_path=tmp_path / "c.yaml",
        run_dir=tmp_path,
        master_port=1,
        elastic=elastic,
        backoff_limit=backoff_limit,
        codes=tuple(map(tuple, codes)),
    )
    running = RunningJob.start(job, say=said.append)
    if one_look:
        for agent in running.agents:
            agent.wait()
    try:
        while (code := running.finished()) is None:
            pass
    finally:
        running.stop()
    return code, running, said


def test_retryable_failures_recreate_the_pod_until_it_succeeds(tmp_path):
    code, running, said = _run(tmp_path, [(0,), (137, 129, 0)])
    assert code == 0 and running.restarts == 2
    assert [(f.pod, f.code) for f in running.failures] == [("worker-0", 137), ("worker-0", 129)]
    assert (
        said[0]
        == "mfr: pod worker-0 (node 1) exited 137 (SIGKILL, retryable); restarting it (restart 1 of backoffLimit 6)"
    )


def test_a_permanent_code_fails_the_job_at_once(tmp_path):
    code, running, _ = _run(tmp_path, [(0,), (2,)])
    assert code == 2 and running.restarts == 0
    assert running.failure_message() == "pod worker-0 (node 1) exited 2 (config error, permanent)"


def test_the_backoff_limit_bounds_the_restarts(tmp_path):
    code, running, said = _run(tmp_path, [(0,), (143,)], backoff_limit=2)
    assert code == 143 and running.restarts == 2 and len(said) == 2
    assert running.failure_message() == (
        "pod worker-0 (node 1) exited 143 (SIGTERM, retryable), and backoffLimit 2 allows no more restarts"
    )
    code, running, _ = _run(tmp_path / "zero", [(137,)], backoff_limit=0)
    assert code == 137 and running.restarts == 0


def test_a_lost_peers_129_is_not_blamed_when_the_pod_it_lost_ended_in_the_same_look(tmp_path):
    _code, running, _ = _run(tmp_path, [(129,), (137,)], backoff_limit=0, one_look=True)
    assert running.failure_message().startswith("pod worker-0 (node 1) exited 137")


def test_an_elastic_job_that_succeeded_restarts_nothing(tmp_path):
    code, running, _ = _run(tmp_path, [(0,), (137,)], elastic=(1, 2), one_look=True)
    assert code == 0 and running.restarts == 0 and running.failures == []


def test_mfrctl_trains_emulated_pods_have_each_apis_environment_contract(tmp_path):
    """LocalJob gives each pod what the operator (v1) or Trainer v2's torch plugin gives it
    (tests/support/operator_rules.py, written from their code): the same variables, values mapped to this machine."""
    from mfr.ctl.chart import render
    from tests.support.operator_rules import operator_env, trainjob_env

    for api in ("pytorchjob", "trainjob"):
        objects = render({"api": api, "nodes": 3, "nprocPerNode": 2, "port": 4242}, name="exp", namespace="ml").objects
        (job,) = [o for o in objects if o["kind"] in ("PyTorchJob", "TrainJob")]
        local = LocalJob(
            nodes=3, nproc_per_node=2, config_path=tmp_path / "c.yaml", run_dir=tmp_path, master_port=4242, api=api
        )
        for node in range(3):
            if api == "trainjob":
                (runtime,) = [o for o in objects if o["kind"] == "TrainingRuntime"]
                expected = trainjob_env(job, runtime, node) | {
                    "PET_MASTER_ADDR": "127.0.0.1",
                    "PET_MASTER_PORT": "4242",
                }
            else:
                rtype, index = ("Master", 0) if node == 0 else ("Worker", node - 1)
                env = operator_env(job, rtype, index)
                expected = {k: v.replace("exp-master-0", "127.0.0.1") for k, v in env.items()}
            assert local.node_env(node) == expected, (api, node)
