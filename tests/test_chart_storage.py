"""Where a run's checkpoints go, as the chart decides it: every pod of a job must reach them.

Each rank writes only its own shards and a restarted pod resumes from what
all of them wrote, so a job of several pods whose checkpoints land in each
pod's own emptyDir could never resume (the trainer refuses to start it).
The chart refuses to render such a job, with one sentence that reaches
``mfrctl render``/``submit`` (exit 2) and ``helm template``/``install`` alike,
and it runs a trial S3 store of its own for the demo.
"""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from mfr.ctl.chart import ChartError, render

REAL_DATA = {"data": {"source": "folder", "uri": "s3://faces/train"}}
REFUSAL = (
    r"^a job of {pods} pods has no checkpoint storage that every pod can reach: pass --checkpoint "
    r"s3://BUCKET/PREFIX \(chart value train.checkpoint.uri; credentials from s3.existingSecret\) or "
    r"--workspace-claim NAME \(chart value workspace.existingClaim, a ReadWriteMany PersistentVolumeClaim\)$"
)


def _objects(values: dict, name: str = "exp") -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for obj in render(values, name=name, namespace="ml").objects:
        found.setdefault(obj["kind"], []).append(obj)
    return found


def _config(objects: dict[str, list[dict]]) -> dict:
    (configmap,) = objects["ConfigMap"]
    return yaml.safe_load(configmap["data"]["config.yaml"])


def _pod_env(objects: dict[str, list[dict]]) -> dict[str, dict]:
    (job,) = objects["PyTorchJob"]
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return {var["name"]: var for var in container.get("env", [])}


@pytest.mark.parametrize(
    "values, pods",
    [
        pytest.param({"train": REAL_DATA}, 2, id="defaults-on-real-data"),
        pytest.param({"nodes": 8, "gpusPerNode": 8, "train": REAL_DATA}, 8, id="static-8"),
        pytest.param(
            {"nodes": 1, "elastic": {"enabled": True, "minNodes": 1, "maxNodes": 4}, "train": REAL_DATA},
            4,
            id="elastic-may-grow",
        ),
        pytest.param({"trialStore": {"enabled": False}}, 2, id="demo-without-trial-store"),
        pytest.param({"train": {"checkpoint": {"uri": "/mnt/ckpt"}, **REAL_DATA}}, 2, id="a-local-path"),
        pytest.param({"train": {"checkpoint": {"uri": "file:///mnt/ckpt"}, **REAL_DATA}}, 2, id="a-file-url"),
        pytest.param({"s3": {"existingSecret": "mfr-s3"}}, 2, id="a-secret-but-no-uri"),
    ],
)
def test_a_job_of_several_pods_without_shared_checkpoints_is_refused(values, pods):
    with pytest.raises(ChartError, match=REFUSAL.format(pods=pods)):
        render(values, name="exp", namespace="ml")


def test_a_path_outside_the_claim_is_refused_by_name():
    values = {"workspace": {"existingClaim": "runs"}, "train": {"checkpoint": {"uri": "/mnt/ckpt"}, **REAL_DATA}}
    with pytest.raises(
        ChartError,
        match=r"^a job of 2 pods has its checkpoint path /mnt/ckpt outside the workspace "
        r"claim \(mounted at /workspace\): pass --checkpoint",
    ):
        render(values, name="exp", namespace="ml")


@pytest.mark.parametrize(
    "values, uri",
    [
        pytest.param(
            {"train": {"checkpoint": {"uri": "s3://bucket/runs/exp"}, **REAL_DATA}}, "s3://bucket/runs/exp", id="s3"
        ),
        pytest.param(
            {"train": {"checkpoint": {"uri": "gs://bucket/runs/exp"}, **REAL_DATA}},
            "gs://bucket/runs/exp",
            id="any-remote-fsspec-url",
        ),
        pytest.param(
            {"workspace": {"existingClaim": "runs"}, "train": REAL_DATA},
            "/workspace/checkpoints/exp",
            id="claim-default-per-job",
        ),
        pytest.param(
            {"workspace": {"existingClaim": "runs"}, "train": {"checkpoint": {"uri": "ckpt/exp"}, **REAL_DATA}},
            "ckpt/exp",
            id="claim-relative-path",
        ),
        pytest.param({"nodes": 1, "train": REAL_DATA}, None, id="one-pod-may-keep-its-own"),
    ],
)
def test_shared_checkpoints_render_into_the_config_the_pods_read(values, uri):
    objects = _objects(values)
    assert _config(objects)["checkpoint"].get("uri") == uri
    assert "Deployment" not in objects and "Secret" not in objects  # no trial store beside real storage


def test_the_demo_gets_a_trial_store_with_generated_credentials():
    objects = _objects({})
    (secret,), (service,), (deployment,) = objects["Secret"], objects["Service"], objects["Deployment"]
    assert secret["metadata"]["name"] == service["metadata"]["name"] == deployment["metadata"]["name"] == "exp-s3"
    keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    identity = json.loads(keys["s3.json"])["identities"][0]
    assert identity["credentials"] == [
        {"accessKey": keys["AWS_ACCESS_KEY_ID"], "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}
    ]
    assert len(keys["AWS_SECRET_ACCESS_KEY"]) == 40
    again = _objects({})["Secret"][0]["data"]
    assert again["AWS_SECRET_ACCESS_KEY"] != secret["data"]["AWS_SECRET_ACCESS_KEY"]  # generated, never a constant

    assert _config(objects)["checkpoint"]["uri"] == "s3://mfr/ml/exp/checkpoints"
    env = _pod_env(objects)
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://exp-s3:8333"
    assert env["MFR_WAIT_FOR"]["value"] == "exp-s3:8333"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "exp-s3", "key": name}
    # the Service selects the store's pod, and only it
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"] == pod_labels
    (job,) = objects["PyTorchJob"]
    trainer_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert not set(service["spec"]["selector"].items()) <= set(trainer_labels.items())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "-bucket=mfr" in container["args"] and f"-s3.port={service['spec']['ports'][0]['port']}" in container["args"]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"train": REAL_DATA, "nodes": 1}, id="real-data"),
        pytest.param({"train": {"checkpoint": {"uri": "s3://bucket/x"}}}, id="own-uri"),
        pytest.param({"workspace": {"existingClaim": "runs"}}, id="own-claim"),
        pytest.param({"nodes": 1, "trialStore": {"enabled": False}}, id="switched-off"),
    ],
)
def test_auto_leaves_the_trial_store_out_when_the_run_names_its_storage(values):
    assert "Deployment" not in _objects(values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"trialStore": {"enabled": True}, "train": {"checkpoint": {"uri": "s3://bucket/x"}}}, "both name checkpoint"),
        ({"trialStore": {"enabled": True}, "s3": {"existingSecret": "mfr-s3"}}, "cannot be combined with s3.existing"),
    ],
)
def test_a_trial_store_beside_other_storage_is_refused(values, message):
    with pytest.raises(ChartError, match=message):
        render(values, name="exp", namespace="ml")


def test_trial_store_can_be_asked_for_on_real_data():
    objects = _objects({"trialStore": {"enabled": True}, "train": REAL_DATA})
    assert _config(objects)["checkpoint"]["uri"] == "s3://mfr/ml/exp/checkpoints" and objects["Deployment"]
