"""The run as a Kubeflow Trainer v2 TrainJob: its runtime, the strict CRDs, the v2 environment contract.

The TrainJob, TrainingRuntime and ClusterTrainingRuntime are checked against
the vendored v2.3.0 CRDs (made strict) and the Trainer's webhook rules; the
pods are built as its JobSet builds them, with the torch plugin's environment
(tests/support/operator_rules.py, written from the Trainer's code at v2.3.0).
"""

from __future__ import annotations

import pytest

from mfr.ctl.chart import ChartError, render
from tests.support.network_policy import Pod, allowed
from tests.support.operator_rules import (
    trainer_crd_errors,
    trainjob_env,
    trainjob_pods,
    trainjob_webhook_errors,
    with_change,
)
from tests.support.pod_security import restricted_violations

ON_S3 = {"train": {"checkpoint": {"uri": "s3://bucket/x"}}, "s3": {"existingSecret": "mfr-s3"}}
CASES = {
    "demo": {"api": "trainjob"},
    "gpus": {"api": "trainjob", "nodes": 4, "gpusPerNode": 8, **ON_S3},
    "gang-coscheduling": {"api": "trainjob", "gang": {"enabled": True, "scheduleTimeoutSeconds": 300}, **ON_S3},
    "gang-volcano": {"api": "trainjob", "gang": {"enabled": True, "plugin": "volcano"}, **ON_S3},
    "cluster-runtime": {
        "api": "trainjob",
        "trainJob": {"runtime": {"kind": "ClusterTrainingRuntime", "name": "mfr-torch"}},
        **ON_S3,
    },
    "kueue-and-monitoring": {
        "api": "trainjob",
        "queue": "team-a",
        "monitoring": {"podMonitor": {"enabled": True}},
        "nprocPerNode": 2,
        **ON_S3,
    },
}


def _objects(values: dict, name: str = "exp") -> tuple[dict, dict, list[dict]]:
    objects = render(values, name=name, namespace="ml").objects
    (trainjob,) = [o for o in objects if o["kind"] == "TrainJob"]
    (runtime,) = [o for o in objects if o["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime")]
    assert not [o for o in objects if o["kind"] == "PyTorchJob"]
    return trainjob, runtime, objects


@pytest.mark.parametrize("case", CASES)
def test_trainjob_and_runtime_pass_the_strict_crds_and_the_webhook(case):
    trainjob, runtime, objects = _objects(CASES[case])
    assert trainer_crd_errors(trainjob) == [] and trainer_crd_errors(runtime) == []
    assert trainjob_webhook_errors(trainjob, runtime) == []
    assert objects[-1] is trainjob and objects[-2] is runtime  # the runtime exists before its job


@pytest.mark.parametrize(
    "which, path, value, expected",
    [
        ("trainjob", "spec.trainer.numNode", 2, "Additional properties are not allowed ('numNode'"),
        ("trainjob", "spec.runtimeRef.nam", "x", "Additional properties are not allowed ('nam'"),
        ("runtime", "spec.template.spec.failurePolicy.maxRestart", 3, "Additional properties are not allowed"),
        ("runtime", "spec.mlPolicy.numNodes", "two", "is not of type 'integer'"),
    ],
)
def test_a_misspelled_or_wrong_field_fails_the_strict_crd(which, path, value, expected):
    trainjob, runtime, _ = _objects(CASES["demo"])
    changed = with_change(trainjob if which == "trainjob" else runtime, path, value)
    assert any(expected in e for e in trainer_crd_errors(changed)), trainer_crd_errors(changed)


def test_the_webhook_refuses_reserved_env_and_a_missing_runtime():
    trainjob, runtime, _ = _objects(CASES["demo"])
    bad = with_change(
        trainjob, "spec.trainer", {**trainjob["spec"]["trainer"], "env": [{"name": "PET_MASTER_PORT", "value": "1"}]}
    )
    assert trainjob_webhook_errors(bad, runtime) == [
        "spec.trainer.env: must not have reserved envs, invalid envs configured: PET_MASTER_PORT"
    ]
    assert trainjob_webhook_errors(trainjob, None) == ["spec.runtimeRef: TrainingRuntime exp not found"]


def test_the_runtime_carries_the_pod_template_and_failure_semantics():
    trainjob, runtime, objects = _objects(CASES["kueue-and-monitoring"])
    assert trainjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert trainjob["spec"]["trainer"]["numNodes"] == 2 and trainjob["spec"]["trainer"]["numProcPerNode"] == 2
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"] == {
        "maxRestarts": 6,
        "rules": [{"name": "permanent", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
    }
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == "node"
    job = node["template"]["spec"]
    assert job["backoffLimit"] == 0  # any other failure fails the Job, and the JobSet recreates every pod
    assert job["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [1, 2]}}
    ]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node" and pod["restartPolicy"] == "Never"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert [p["name"] for p in container["ports"]] == ["rendezvous", "metrics-0", "metrics-1"]
    assert "PodMonitor" in {o["kind"] for o in objects}
    gpus, _gpu_runtime, _ = _objects(CASES["gpus"])
    assert gpus["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
    assert _objects(CASES["gang-volcano"])[1]["spec"]["podGroupPolicy"] == {"volcano": {}}
    assert _objects(CASES["gang-coscheduling"])[1]["spec"]["podGroupPolicy"] == {
        "coscheduling": {"scheduleTimeoutSeconds": 300}
    }


def test_the_trial_store_and_its_secret_reach_the_trainjobs_pods():
    trainjob, runtime, objects = _objects(CASES["demo"])
    ((_, pod), _) = trainjob_pods(trainjob, runtime)
    (container,) = pod["spec"]["containers"]
    env = {v["name"]: v for v in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "exp-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert {"Secret", "Deployment", "Service"} <= {o["kind"] for o in objects}


def test_the_v2_environment_contract_has_pet_variables_only():
    trainjob, runtime, _ = _objects({**CASES["gpus"], "nprocPerNode": 8})
    assert trainjob_env(trainjob, runtime, 3) == {
        "PET_NNODES": "4",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "3",
        "PET_MASTER_ADDR": "exp-node-0-0.exp",
        "PET_MASTER_PORT": "29500",
    }


@pytest.mark.parametrize("case", CASES)
def test_trainjob_pods_pass_the_restricted_standard_and_the_network_policy(case):
    trainjob, runtime, objects = _objects(CASES[case])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = [
        Pod(
            "ml",
            pod["metadata"]["labels"],
            {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]},
        )
        for _, pod in trainjob_pods(trainjob, runtime)
    ]
    for _, pod in trainjob_pods(trainjob, runtime):
        assert restricted_violations(pod) == []  # v2 injects no init container
    assert all(allowed(policies, "ml", a, b, 29500) for a in pods for b in pods)
    assert not allowed(policies, "ml", Pod("ml", {"app": "notebook"}), pods[0], 29500)


def test_elastic_runs_stay_pytorchjobs():
    with pytest.raises(ChartError, match="^elastic training runs as a PyTorchJob: Kubeflow Trainer v2.2 removed"):
        render({"api": "trainjob", "elastic": {"enabled": True}, **ON_S3}, name="exp", namespace="ml")
