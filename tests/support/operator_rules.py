"""What the Kubeflow training operator (v1.9) does with a PyTorchJob, for tests.

Written from the operator's own code, independently of ctl/ and the chart:
* the CRD schema (../shared/crds), made strict so a misspelled field fails;
* the validating webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go);
* the environment it gives each replica's container (../shared/design.md,
  "The operator's environment contract"; pkg/controller.v1/pytorch);
* the pod it creates for a replica (pkg/controller.v1/common/pod.go
  createNewPod, pytorch/initcontainer.go): the template with that
  environment, restartPolicy ExitCode turned into the pod's Never, and, in
  every Worker pod of a job that has a Master, the init container
  ``init-pytorch`` appended to the template's own (never replacing one).
  Its spec comes from the file the operator's
  ``--pytorch-init-container-template-file`` names (default
  /etc/config/initContainer.yaml) when that file exists, else from a
  built-in one: image ``--pytorch-init-container-image`` (alpine:3.10),
  50m/10Mi requests, 100m/20Mi limits, a shell loop of ``nslookup`` of the
  master's Service, and no securityContext at all.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[3] / "shared" / "crds"
PYTORCHJOB_CRD = CRDS / "kubeflow.org_pytorchjobs.yaml"
DEFAULT_PORT = 23456
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _strict(schema: Any) -> Any:
    """Every object schema that lists its properties gets additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


@cache
def crd_validator():
    """A jsonschema validator of the CRD's openAPIV3Schema, strict about field names."""
    import jsonschema

    if not PYTORCHJOB_CRD.exists():
        pytest.skip(
            f"{PYTORCHJOB_CRD} is missing: it is kubeflow/training-operator v1.9.0 manifests/base/crds/"
            "kubeflow.org_pytorchjobs.yaml (or `kubectl get crd pytorchjobs.kubeflow.org -o yaml`)"
        )
    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(job: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in crd_validator().iter_errors(job)]


def webhook_errors(job: dict[str, Any]) -> list[str]:
    """The operator's validating webhook for PyTorchJob create (v1.9)."""
    errors = []
    name = job["metadata"]["name"]
    if len(name) > 63 or not _DNS1035.match(name):
        errors.append(f"metadata.name {name!r}: not a DNS-1035 label")
    spec = job["spec"]
    specs = spec.get("pytorchReplicaSpecs")
    if not specs:
        return errors + ["spec.pytorchReplicaSpecs: must be required"]
    if "elasticPolicy" in spec:
        if "Worker" not in specs:
            errors.append("spec.pytorchReplicaSpecs[Worker]: must be configured if elastic policy is used")
        if "nProcPerNode" in spec["elasticPolicy"] and "nprocPerNode" in spec:
            errors.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    managed_by = spec.get("runPolicy", {}).get("managedBy")
    if managed_by not in (None, "kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"):
        errors.append(f"spec.runPolicy.managedBy {managed_by!r}: not supported")
    for rtype, rspec in specs.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"spec.pytorchReplicaSpecs[{rtype}]: unsupported replica type")
        containers = rspec.get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            errors.append(f"spec.pytorchReplicaSpecs[{rtype}].template.spec.containers: must be specified")
        if any(not c.get("image") for c in containers):
            errors.append(f"spec.pytorchReplicaSpecs[{rtype}]: every container needs an image")
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"spec.pytorchReplicaSpecs[{rtype}]: must have at least one container with name pytorch")
        replicas = rspec.get("replicas")
        if rtype == "Master" and replicas != 1:
            errors.append("spec.pytorchReplicaSpecs[Master].replicas: must be 1")
        elif replicas is not None and replicas < 1:
            errors.append(f"spec.pytorchReplicaSpecs[{rtype}].replicas: must be at least 1")
    return errors


def _container(job: dict[str, Any], rtype: str) -> dict[str, Any]:
    containers = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pytorch")


def _port(job: dict[str, Any], rtype: str) -> int:
    ports = _container(job, rtype).get("ports") or []
    return next(p["containerPort"] for p in ports if p.get("name") == "pytorchjob-port")


def _nproc_int(job: dict[str, Any]) -> int:
    """WORLD_SIZE counts processes only for an integer nprocPerNode (auto/cpu/gpu count pods)."""
    nproc = str(job["spec"].get("nprocPerNode", "auto"))
    return int(nproc) if nproc.isdigit() else 1


def operator_env(job: dict[str, Any], rtype: str, index: int) -> dict[str, str]:
    """The variables the operator adds to the pytorch container of replica ``rtype`` ``index``."""
    name, spec = job["metadata"]["name"], job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    env = {"PYTHONUNBUFFERED": "1"}
    if "nprocPerNode" in spec:
        env["PET_NPROC_PER_NODE"] = str(spec["nprocPerNode"])
    if "Master" in specs:
        total = sum(r.get("replicas", 1) for r in specs.values())
        rank = index + 1 if rtype == "Worker" else index
        master, port = f"{name}-master-0", str(_port(job, "Master"))
        env |= {
            "MASTER_ADDR": master,
            "MASTER_PORT": port,
            "PET_MASTER_ADDR": master,
            "PET_MASTER_PORT": port,
            "WORLD_SIZE": str(total * _nproc_int(job)),
            "RANK": str(rank),
            "PET_NODE_RANK": str(rank),
            "PET_NNODES": str(total),
        }
    policy = spec.get("elasticPolicy")
    if policy is not None:
        host = policy.get("rdzvHost") or f"{name}-worker-0"
        port = policy.get("rdzvPort") or _port(job, "Worker")
        env |= {
            "PET_RDZV_ENDPOINT": f"{host}:{port}",
            "PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
            "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}"
            if "minReplicas" in policy
            else str(specs["Worker"]["replicas"]),
        }
        if "maxRestarts" in policy:
            env["PET_MAX_RESTARTS"] = str(policy["maxRestarts"])
        if "rdzvId" in policy:
            env["PET_RDZV_ID"] = policy["rdzvId"]
        if policy.get("rdzvConf"):
            env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])
    return env


INIT_IMAGE = "alpine:3.10"  # --pytorch-init-container-image's default
INIT_MAX_TRIES = 100  # --pytorch-init-container-max-tries's default


def init_containers(
    master_addr: str, template: str | None = None, image: str = INIT_IMAGE, max_tries: int = INIT_MAX_TRIES
) -> list[dict[str, Any]]:
    """What the operator appends to a Worker pod: its template file filled in (Go template
    fields .MasterAddr, .InitContainerImage, .MaxTries), or its built-in container."""
    if template is None:
        return [
            {
                "name": "init-pytorch",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "resources": {
                    "limits": {"cpu": "100m", "memory": "20Mi"},
                    "requests": {"cpu": "50m", "memory": "10Mi"},
                },
                "command": [
                    "sh",
                    "-c",
                    f"err=1;for i in $(seq {max_tries}); do if nslookup {master_addr}; then err=0 "
                    "&& break; fi;echo waiting for master; sleep 2; done; exit $err",
                ],
            }
        ]
    fields = {"MasterAddr": master_addr, "InitContainerImage": image, "MaxTries": str(max_tries)}
    text = re.sub(r"{{\s*\.(\w+)\s*}}", lambda m: fields[m[1]], template)
    return yaml.safe_load(text)


def operator_pod(job: dict[str, Any], rtype: str, index: int, init_template: str | None = None) -> dict[str, Any]:
    """The Pod the operator creates for replica ``rtype`` ``index`` (init_template: its template file, if any)."""
    name, specs = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]
    template = copy.deepcopy(specs[rtype]["template"])
    spec = template["spec"]
    env = [{"name": k, "value": v} for k, v in operator_env(job, rtype, index).items()]
    for container in spec["containers"]:
        container["env"] = container.get("env", []) + env
    if specs[rtype].get("restartPolicy") == "ExitCode":
        spec["restartPolicy"] = "Never"
    if rtype == "Worker" and "Master" in specs:
        spec["initContainers"] = spec.get("initContainers", []) + init_containers(f"{name}-master-0", init_template)
    labels = template.get("metadata", {}).get("labels", {}) | {
        "training.kubeflow.org/job-name": name,
        "training.kubeflow.org/replica-type": rtype.lower(),
        "training.kubeflow.org/replica-index": str(index),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-{rtype.lower()}-{index}", "labels": labels},
        "spec": spec,
    }


def replicas(job: dict[str, Any]) -> list[tuple[str, int]]:
    """Every pod of the job as (replica type, index), Master first."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    return [
        (rtype, i) for rtype in ("Master", "Worker") if rtype in specs for i in range(specs[rtype].get("replicas", 1))
    ]


def with_change(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of obj with one dotted path set (list items by index), for negative tests."""
    changed = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = changed
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return changed


# -- Kubeflow Trainer v2.3.0: the TrainJob ------------------------------------------------------------------
# Written from the Trainer's code at v2.3.0 and its CRDs (../shared/crds/trainer-v2.3.0, and the README there):
# pkg/runtime/framework/plugins/torch (the environment of the container "node"), pkg/constants (port 29500,
# the reserved names), the JobSet it builds (one replicated job "node", an Indexed Job of numNodes pods named
# <trainjob>-node-0-<index>, the index in the label batch.kubernetes.io/job-completion-index), and its webhook.

TRAINER_CRDS = CRDS / "trainer-v2.3.0"
TRAINER_MASTER_PORT = 29500
TRAINER_RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


@cache
def trainer_validator(kind: str):
    """A strict jsonschema validator of a Trainer v2.3.0 CRD (TrainJob, TrainingRuntime, ClusterTrainingRuntime)."""
    import jsonschema

    plural = {
        "TrainJob": "trainjobs",
        "TrainingRuntime": "trainingruntimes",
        "ClusterTrainingRuntime": "clustertrainingruntimes",
    }[kind]
    crd = yaml.safe_load((TRAINER_CRDS / f"trainer.kubeflow.org_{plural}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def trainer_crd_errors(obj: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in trainer_validator(obj["kind"]).iter_errors(obj)
    ]


def trainjob_webhook_errors(trainjob: dict[str, Any], runtime: dict[str, Any] | None) -> list[str]:
    """The Trainer's validating webhook and the TrainJob CRD's CEL rules, for what a run can get wrong."""
    errors = []
    name = trainjob["metadata"]["name"]
    if len(name) > 63 or not _DNS1035.match(name):
        errors.append("metadata.name must match RFC 1035 DNS label format (and be no more than 63 characters)")
    trainer = trainjob["spec"].get("trainer") or {}
    for var in trainer.get("env") or []:
        if var["name"] in TRAINER_RESERVED_ENV:
            errors.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: {var['name']}")
    ref = trainjob["spec"]["runtimeRef"]
    if runtime is None or (ref.get("kind", "ClusterTrainingRuntime"), ref["name"]) != (
        runtime["kind"],
        runtime["metadata"]["name"],
    ):
        errors.append(f"spec.runtimeRef: {ref.get('kind')} {ref['name']} not found")
    elif runtime["spec"].get("mlPolicy", {}).get("torch") is None:
        errors.append("the runtime has no torch mlPolicy")
    else:
        jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        if not any(j["name"] == "node" for j in jobs):
            errors.append("the runtime has no replicated job named node")
    return errors


def trainjob_env(trainjob: dict[str, Any], runtime: dict[str, Any], index: int) -> dict[str, str]:
    """What the torch plugin gives the container "node" of pod ``index`` (no MASTER_ADDR, RANK or WORLD_SIZE)."""
    name, trainer = trainjob["metadata"]["name"], trainjob["spec"].get("trainer") or {}
    nodes = trainer.get("numNodes") or runtime["spec"]["mlPolicy"].get("numNodes", 1)
    return {
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
        "PET_NODE_RANK": str(index),
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
        "PET_MASTER_PORT": str(TRAINER_MASTER_PORT),
    }


def trainjob_pods(trainjob: dict[str, Any], runtime: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod) of every pod the TrainJob's JobSet creates: the runtime's template, with the TrainJob's
    resourcesPerNode on the container "node", the plugin's environment and JobSet's labels."""
    name, trainer = trainjob["metadata"]["name"], trainjob["spec"].get("trainer") or {}
    (node,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    nodes = trainer.get("numNodes") or runtime["spec"]["mlPolicy"].get("numNodes", 1)
    pods = []
    for index in range(nodes):
        template = copy.deepcopy(node["template"]["spec"]["template"])
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == "node"]
        if "resourcesPerNode" in trainer:
            container["resources"] = trainer["resourcesPerNode"]
        container["env"] = container.get("env", []) + [
            {"name": k, "value": v} for k, v in trainjob_env(trainjob, runtime, index).items()
        ]
        labels = template.get("metadata", {}).get("labels", {}) | {
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            JOB_COMPLETION_INDEX: str(index),
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-node-0-{index}", "labels": labels},
            "spec": template["spec"],
        }
        pods.append((pod["metadata"]["name"], pod))
    return pods
