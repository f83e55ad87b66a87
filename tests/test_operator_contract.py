"""The rendered PyTorchJob runs: each pod's own command, with the operator's environment.

This proves the manifest, not just the trainer.  The test renders the chart,
then plays the Kubeflow operator (v1.9) and the kubelet on this machine: for
every replica it builds the environment the operator injects
(tests/operator_rules.py, written from the operator's code, independently of
ctl/launcher.py), maps the job's Service names (<job>-master-0,
<job>-worker-0) to 127.0.0.1, mounts the ConfigMap and the working-directory
emptyDir as local directories, and starts the container's command and args
exactly as rendered, with `python` resolved on a PATH that holds the
package install (as in the image).  The job must complete on every pod.
The checkpoint URI points at one directory shared by the pods, standing in
for S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mfr.ctl.chart import render
from mfr.ctl.launcher import free_port
from tests.operator_rules import operator_env, replicas, webhook_errors

pytestmark = pytest.mark.e2e

TINY = {  # a few seconds of training on 2 CPU cores
    "model": {"backbone": "tiny", "embedding_size": 32},
    "head": {"num_classes": 16, "margins": [1.0, 0.3, 0.0], "scale": 16.0},
    "data": {"images_per_identity": 4, "batch_size": 8, "num_workers": 0},
    "optim": {"warmup_steps": 0},
    "run": {"steps": 6, "log_every": 1, "device": "cpu"},
    "checkpoint": {"every_steps": 3},
    "eval": {"num_identities": 4, "images_per_identity": 2, "fprs": [0.1], "batch_size": 16, "at_start": False},
}


def _pod(job: dict, configmaps: dict[str, dict], rtype: str, index: int, root: Path) -> tuple[list[str], dict, Path]:
    """What the kubelet would run for this replica: (argv, environment, working directory)."""
    name = job["metadata"]["name"]
    pod = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
    mounts = {}
    for volume in pod["volumes"]:
        local = root / f"{rtype.lower()}-{index}" / volume["name"]
        local.mkdir(parents=True)
        if "configMap" in volume:
            for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
        mounts[volume["name"]] = local
    paths = {m["mountPath"]: mounts[m["name"]] for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"}

    def local(value: str) -> str:
        for mount, path in paths.items():
            value = value.replace(mount, str(path)) if value.startswith(mount) else value
        return value

    services = [f"{name}-{r.lower()}-{i}" for r, i in replicas(job)]

    def resolve(value: str) -> str:
        for service in services:
            value = value.replace(service, "127.0.0.1")
        return value

    env = {var["name"]: var["value"] for var in container.get("env", []) if "value" in var}
    env |= {key: resolve(value) for key, value in operator_env(job, rtype, index).items()}
    base = {key: os.environ[key] for key in ("HOME", "LANG", "TMPDIR") if key in os.environ}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the image's python
    base["OMP_NUM_THREADS"] = "1"
    argv = [local(arg) for arg in [*container["command"], *container["args"]]]
    return argv, base | env, local(container["workingDir"])


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"nodes": 2}, id="static-master-worker"),
        pytest.param({"nodes": 2, "elastic": {"enabled": True, "minNodes": 1, "maxNodes": 2}}, id="elastic-2-workers"),
    ],
)
def test_rendered_job_completes_under_the_operators_environment(values, tmp_path):
    train = TINY | {"checkpoint": TINY["checkpoint"] | {"uri": str(tmp_path / "shared-checkpoints")}}
    objects = render(values | {"port": free_port(), "train": train}, name="e2e", namespace="ml").objects
    job = next(o for o in objects if o["kind"] == "PyTorchJob")
    assert webhook_errors(job) == []
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    pods = []
    for rtype, index in replicas(job):
        argv, env, cwd = _pod(job, configmaps, rtype, index, tmp_path)
        log = tmp_path / f"{rtype.lower()}-{index}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        pods.append((f"{rtype.lower()}-{index}", proc, log))
    try:
        deadline = time.monotonic() + 240
        while any(p.poll() is None for _, p, _ in pods) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for _, p, _ in pods):
                break  # a failed pod fails the job
            time.sleep(0.5)
        logs = {name: log.read_text(errors="replace") for name, _, log in pods}
        codes = {name: p.poll() for name, p, _ in pods}
        assert codes == {name: 0 for name in codes}, "\n".join(f"--- {n}\n{t[-3000:]}" for n, t in logs.items())
    finally:
        for _, proc, _ in pods:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    rank0 = logs[pods[0][0]]
    # the mounted ConfigMap was the config: 16 classes, 6 steps, 2 ranks from the operator's variables
    assert "world size 2 on cpu, global batch 16, 16 classes (8 on rank 0), 6 steps" in rank0
    assert "step 6/6" in rank0 and "eval trained masked-unmasked TPR@FPR" in rank0
    assert (tmp_path / "shared-checkpoints" / "step-00000006" / "COMMITTED").exists()
