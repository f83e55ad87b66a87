"""mfrctl without training: the torch-free promise, usage errors, the pods' environment."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mfr.ctl.launcher import LocalJob
from tests.support.cli import MFRCTL


def mfrctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*MFRCTL, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_never_imports_torch():
    code = "import sys, mfr.ctl.main; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_console_script_is_installed():
    proc = subprocess.run([Path(sys.executable).parent / "mfrctl", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "head.margins=[1.0, -0.2, 0.0]"], "head: margins m2 must be in [0, pi/2)"),
        (["--set", "model.backbone=r7"], "model.backbone: Input should be"),
        (["--config", "/nonexistent.yaml"], "cannot read config /nonexistent.yaml"),
        (["--nodes", "2", "--elastic", "3:1"], "--elastic '3:1': expected MIN:MAX"),
        (["--nodes", "5", "--elastic", "1:3"], "--nodes 5 is outside --elastic 1:3"),
    ],
)
def test_train_usage_errors_exit_2_with_one_line(args, message, tmp_path):
    proc = mfrctl("train", "--output-dir", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_busy_rendezvous_port_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = mfrctl("train", "--output-dir", str(tmp_path), "--master-port", str(port))
    assert proc.returncode == 2
    assert f"rendezvous port {port} on 127.0.0.1 is already in use" in proc.stderr


def test_config_show_fills_defaults():
    proc = mfrctl("config", "show", "--set", "head.sample_rate=0.2", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["head"]["sample_rate"] == 0.2
    assert shown["optim"]["micro_batches"] == 1
    assert yaml.safe_load(mfrctl("config", "show").stdout)["head"]["num_classes"] == 256


def _job(**kw) -> LocalJob:
    return LocalJob(nodes=3, nproc_per_node=2, config_path=Path("c.yaml"), run_dir=Path("r"), master_port=29400, **kw)


def test_static_pod_environment_matches_the_operator():
    envs = [_job().node_env(i) for i in range(3)]
    for node, env in enumerate(envs):
        assert env == {
            "PYTHONUNBUFFERED": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29400",
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": "29400",
            "WORLD_SIZE": "6",  # replicas x nprocPerNode
            "RANK": str(node),
            "PET_NODE_RANK": str(node),
            "PET_NNODES": "3",
            "PET_NPROC_PER_NODE": "2",
        }


def test_elastic_pod_environment_matches_the_operator():
    env = _job(elastic=(1, 4), max_restarts=5, run_id="demo").node_env(1)
    assert {k: env[k] for k in ("PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_NNODES", "PET_MAX_RESTARTS")} == {
        "PET_RDZV_ENDPOINT": "127.0.0.1:29400",
        "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "1:4",
        "PET_MAX_RESTARTS": "5",
    }
    assert env["PET_RDZV_ID"] == "demo" and "last_call_timeout" in env["PET_RDZV_CONF"]
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} & set(env), "elastic pods get no static rank"


def test_pod_command_is_torchrun_of_the_trainer_with_retryable_exit_codes():
    assert _job().command() == [sys.executable, "-m", "mfr.trainer.launch", "--config", "c.yaml"]


def test_config_error_found_at_start_up_exits_2(tmp_path):
    """Only the trainer knows the world size: 100 samples cannot feed 2 ranks x 64."""
    proc = mfrctl(
        "train",
        "--nodes",
        "2",
        "--output-dir",
        str(tmp_path),
        "--set",
        "head.num_classes=100",
        "--set",
        "data.images_per_identity=1",
        "--set",
        "data.batch_size=64",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "an epoch of 100 samples holds no global batch of 128 (2 ranks x data.batch_size 64)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_several_processes_per_node(tmp_path):
    """--nproc-per-node: torchrun starts M workers per emulated pod, WORLD_SIZE = N x M."""
    proc = mfrctl(
        "train",
        "--nodes",
        "2",
        "--nproc-per-node",
        "2",
        "--output-dir",
        str(tmp_path),
        "-o",
        "json",
        "--set",
        "run.steps=2",
        "--set",
        "optim.warmup_steps=0",
        "--set",
        "eval.at_start=false",
        "--set",
        "head.num_classes=16",
        "--set",
        "data.images_per_identity=8",
        "--set",
        "data.batch_size=8",
        "--set",
        "eval.num_identities=4",
        "--set",
        "eval.images_per_identity=2",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 4 and start["global_batch"] == 32
    result = json.loads(proc.stdout)
    assert list(result["eval"]) == ["trained"] and result["steps"] == 2 and result["restarts"] == 0
