"""The chart's cluster-operations values: Kueue, placement, NCCL fabrics, requests, and strict free-form values."""

from __future__ import annotations

import helm_python
import kubernetes_validate
import pytest

from mfr.ctl.chart import ChartError, chart_dir, render, requests_for
from mfr.trainer.config import validate_config
from tests.support.chart import KUBE_VERSION
from tests.support.pod_security import restricted_violations

ON_S3 = {"train": {"checkpoint": {"uri": "s3://bucket/x"}}, "s3": {"existingSecret": "mfr-s3"}}


def _job(values: dict) -> dict:
    (job,) = [o for o in render(values, name="exp", namespace="ml").objects if o["kind"] == "PyTorchJob"]
    return job


def _pod(values: dict, rtype: str = "Worker") -> dict:
    return _job(values)["spec"]["pytorchReplicaSpecs"][rtype]["template"]


def test_the_queue_label_is_on_the_job_for_kueue_and_job_labels_never_hide_the_runs():
    job = _job(
        {
            "queue": "team-a",
            "jobLabels": {"cost": "ml", "app.kubernetes.io/instance": "stolen"},
            "jobAnnotations": {"owner": "faces"},
            **ON_S3,
        }
    )
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["cost"] == "ml"
    assert labels["app.kubernetes.io/instance"] == "exp"  # mfrctl finds the run's objects by it
    assert job["metadata"]["annotations"] == {"owner": "faces"}
    assert (
        "kueue.x-k8s.io/queue-name"
        not in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    )
    assert "suspend" not in job["spec"]["runPolicy"]  # Kueue's webhook suspends it, and starts it once admitted


def test_placement_values_reach_every_pod_and_pass_the_kubernetes_schema():
    values = {
        **ON_S3,
        "runtimeClassName": "nvidia",
        "priorityClassName": "training-high",
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "exp"}},
            }
        ],
        "extraVolumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "faces-cache"}}],
        "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache", "readOnly": True}],
    }
    for rtype in ("Master", "Worker"):
        template = _pod(values, rtype)
        spec = template["spec"]
        assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "training-high"
        assert spec["topologySpreadConstraints"] == values["topologySpreadConstraints"]
        assert values["extraVolumes"][0] in spec["volumes"]
        assert values["extraVolumeMounts"][0] in spec["containers"][0]["volumeMounts"]
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
            KUBE_VERSION,
            strict=True,
        )


def test_the_nccl_block_sets_fabric_variables_and_opt_in_privileges():
    default = _pod(ON_S3)
    assert not default["spec"].get("hostNetwork") and restricted_violations(default) == []
    fabric = _pod(
        {
            **ON_S3,
            "nccl": {"env": {"NCCL_IB_HCA": "mlx5", "NCCL_IB_GID_INDEX": 3}, "ipcLock": True, "hostNetwork": True},
        }
    )
    (container,) = fabric["spec"]["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_IB_GID_INDEX"] == "3"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert fabric["spec"]["hostNetwork"] is True and fabric["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    # both are privileges the restricted standard forbids: opt-in only, and said so in values.yaml
    violations = restricted_violations(fabric)
    assert "host namespaces: hostNetwork" in violations and any("IPC_LOCK" in v for v in violations)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"resources": {"limit": {"memory": "64Gi"}}}, "values resources: additional properties 'limit' not allowed"),
        (
            {"tolerations": [{"key": "gpu", "efect": "NoSchedule"}]},
            "values tolerations.0: additional properties 'efect' not allowed",
        ),
        ({"env": [{"name": "FOO", "valu": "x"}]}, "values env.0: additional properties 'valu' not allowed"),
        ({"affinity": {"nodeAffinty": {}}}, "values affinity: additional properties 'nodeAffinty' not allowed"),
        ({"securityContext": {"runAsUsr": 0}}, "values securityContext: additional properties 'runAsUsr' not allowed"),
        ({"extraVolumes": [{"name": "x", "hostpath": {"path": "/"}}]}, "values extraVolumes.0: additional properties"),
        ({"nccl": {"env": {"IB_HCA": "mlx5"}}}, "does not match pattern '^NCCL_[A-Z0-9_]+$'"),
        ({"queue": "Team A"}, "values queue: 'Team A' does not match pattern"),
        ({"env": [{"name": "MASTER_ADDR", "value": "x"}]}, "env MASTER_ADDR is set by the training operator"),
        ({"env": [{"name": "PET_NNODES", "value": "2"}]}, "env PET_NNODES is set by the training operator"),
        (
            {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]},
            "env AWS_SECRET_ACCESS_KEY holds a literal value, which would be stored in the job: pass it with "
            "valueFrom.secretKeyRef",
        ),
        ({"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "env HF_TOKEN holds a literal value"),
        ({"env": [{"name": "WANDB_API_KEY", "value": "x"}]}, "env WANDB_API_KEY holds a literal value"),
    ],
)
def test_free_form_values_are_checked_as_kubernetes_would(values, message):
    with pytest.raises(ChartError) as raised:
        render({**ON_S3, **values}, name="exp", namespace="ml")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_helm_itself_refuses_them_too():
    """helm install/template validate values.schema.json the same way (no mfrctl involved)."""
    with helm_python.Chart.load(chart_dir()) as chart, pytest.raises(helm_python.HelmValuesError, match="efect"):
        chart.render({**ON_S3, "tolerations": [{"key": "gpu", "efect": "NoSchedule"}]}, name="exp", namespace="ml")


def test_secrets_by_reference_and_other_names_pass():
    env = [
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        {"name": "KEYBOARD_LAYOUT", "value": "us"},
    ]
    (container,) = _pod({**ON_S3, "env": env})["spec"]["containers"]
    assert all(var in container["env"] for var in env)


def test_the_charts_default_requests_are_the_demos_as_sized_by_the_model():
    with helm_python.Chart.load(chart_dir()) as chart:
        values = chart.values
        assert values["resources"]["requests"] == requests_for(validate_config(values["train"]), values)


def _mebibytes(requests: dict) -> int:
    return int(requests["memory"].removesuffix("Mi"))


def test_render_sizes_requests_for_the_runs_config_unless_set():
    demo = _pod({})["spec"]["containers"][0]["resources"]["requests"]
    big = {
        "train": {
            "head": {"num_classes": 2_000_000},
            "model": {"embedding_size": 512},
            "data": {"num_workers": 4},
            "checkpoint": {"uri": "s3://bucket/x"},
        },
        "s3": {"existingSecret": "mfr-s3"},
        "nprocPerNode": 2,
    }
    sized = _pod(big)["spec"]["containers"][0]["resources"]["requests"]
    assert sized["cpu"] == "10"  # 2 processes x (1 + 4 DataLoader workers)
    # two processes, each with 4 workers, a 1M-row head shard of 512 floats and its momentum
    assert _mebibytes(sized) > 2 * (_mebibytes(demo) + 4 * 512 + 2 * 1_000_000 * 512 * 4 // 2**20)
    own = _pod({**ON_S3, "resources": {"requests": {"cpu": "3"}}})["spec"]["containers"][0]["resources"]
    assert own["requests"] == {"cpu": "3", "memory": demo["memory"]}  # what the user sets wins, the rest is sized
