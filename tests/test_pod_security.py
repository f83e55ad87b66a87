"""Every pod a run creates passes the "restricted" Pod Security Standard, operator injections included.

The pods are built as the operator (v1.9) builds them (tests/support/operator_rules.py:
the template, its environment, the ``init-pytorch`` init container it appends
to static Workers) and checked control by control (tests/support/pod_security.py).
The operator's built-in init container has no securityContext: with it, only
that container fails, which is why manifests/operator/ mounts a restricted one.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from charts.generate import MANIFESTS, manifests_dir
from mfr.ctl.chart import render
from tests.support.operator_rules import init_containers, operator_pod, replicas, trainjob_pods
from tests.support.pod_security import restricted_violations

INIT_TEMPLATE = (manifests_dir() / "operator" / "initContainer.yaml").read_text()
ON_S3 = {"train": {"checkpoint": {"uri": "s3://bucket/x"}}, "s3": {"existingSecret": "mfr-s3"}}
RENDERS = {
    "chart-defaults": lambda: render({}, name="mfr", namespace="ml").objects,
    "static-8x8gpu": lambda: render({"nodes": 8, "gpusPerNode": 8, **ON_S3}, name="mfr", namespace="ml").objects,
    "elastic": lambda: (
        render(
            {"nodes": 4, "elastic": {"enabled": True, "minNodes": 2, "maxNodes": 4}, **ON_S3},
            name="mfr",
            namespace="ml",
        ).objects
    ),
    "claim": lambda: render({"nodes": 3, "workspace": {"existingClaim": "runs"}}, name="mfr", namespace="ml").objects,
    **{
        f"manifests/{name}": (
            lambda name=name: [d for d in yaml.safe_load_all((manifests_dir() / name).read_text()) if d]
        )
        for name in MANIFESTS
    },
}


def _pods(objects: list[dict], init_template: str | None) -> list[dict]:
    pods = []
    for obj in objects:
        if obj["kind"] == "PyTorchJob":
            pods += [operator_pod(obj, rtype, index, init_template) for rtype, index in replicas(obj)]
        elif obj["kind"] == "TrainJob":
            (runtime,) = [o for o in objects if o["kind"].endswith("TrainingRuntime")]
            pods += [pod for _, pod in trainjob_pods(obj, runtime)]
        elif obj["kind"] == "Deployment":
            pods.append({"metadata": {"name": obj["metadata"]["name"]}, "spec": obj["spec"]["template"]["spec"]})
    return pods


@pytest.mark.parametrize("case", RENDERS)
def test_every_pod_passes_the_restricted_standard_with_the_restricted_init_container(case):
    pods = _pods(RENDERS[case](), INIT_TEMPLATE)
    assert pods
    for pod in pods:
        assert restricted_violations(pod) == [], pod["metadata"]["name"]


@pytest.mark.parametrize("case", RENDERS)
def test_with_the_operators_builtin_init_container_only_it_fails(case):
    objects = RENDERS[case]()
    (job,) = [o for o in objects if o["kind"] in ("PyTorchJob", "TrainJob")]
    specs = job["spec"].get("pytorchReplicaSpecs") or {}
    static_workers = "Master" in specs and "Worker" in specs  # a TrainJob's pods get no init container
    for pod in _pods(objects, None):
        violations = restricted_violations(pod)
        if static_workers and pod["metadata"]["name"].startswith(f"{job['metadata']['name']}-worker-"):
            assert violations and all(v.startswith("initContainers[init-pytorch]") for v in violations), violations
        else:
            assert violations == []


def test_the_restricted_init_container_is_the_operators_wait_and_nothing_else():
    (ours,) = init_containers("exp-master-0", INIT_TEMPLATE)
    (builtin,) = init_containers("exp-master-0")
    assert {k: v for k, v in ours.items() if k != "securityContext"} | {"command": None} == builtin | {"command": None}
    assert "nslookup exp-master-0" in ours["command"][2] and "seq 100" in ours["command"][2]
    assert ours["securityContext"]["runAsUser"] != 0  # alpine's user is root: a pod without runAsUser still starts


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c, p: c.__setitem__("securityContext", {**c["securityContext"], "privileged": True}), "privileged"),
        (lambda c, p: c["securityContext"]["capabilities"].__setitem__("drop", []), "must drop ALL"),
        (lambda c, p: c["securityContext"].__setitem__("allowPrivilegeEscalation", True), "allowPrivilegeEscalation"),
        (lambda c, p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot must be true"),
        (lambda c, p: p["securityContext"].pop("seccompProfile"), "seccompProfile must be RuntimeDefault"),
        (lambda c, p: p.__setitem__("hostNetwork", True), "host namespaces: hostNetwork"),
        (lambda c, p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h: hostPath"),
        (lambda c, p: c["securityContext"]["capabilities"].__setitem__("add", ["IPC_LOCK"]), "only NET_BIND_SERVICE"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(change, expected):
    (job,) = [o for o in render({}, name="mfr", namespace="ml").objects if o["kind"] == "PyTorchJob"]
    pod = copy.deepcopy(operator_pod(job, "Master", 0))
    change(pod["spec"]["containers"][0], pod["spec"])
    assert any(expected in v for v in restricted_violations(pod)), restricted_violations(pod)
