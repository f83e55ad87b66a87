"""What the cluster's controllers and kubelets would do, played for tests: the training operator, pods, events, logs.

The training operator stand-in does what Kubeflow training operator v1.9 does when a PyTorchJob
is created (pkg/controller.v1/common and pytorch): it defaults the ``pytorchjob-port`` (23456),
sets the Created condition ("PyTorchJob <name> is created."), and creates, for every replica, the
pod of tests/support/operator_rules.py (``<job>-master-0``, ``<job>-worker-<i>``, with the operator's
labels) and a headless Service of the same name, each owned by the job (controller: true), with a
SuccessfulCreatePod / SuccessfulCreateService event.  It creates them through the API's own create
path, so they are validated, get a uid, and go when the job goes.  Then the tests move pods through
their phases, restart containers, write their logs and set the job's conditions, as kubelet and the
operator would.
"""

from __future__ import annotations

import copy
import secrets
import time
from typing import TYPE_CHECKING, Any

from tests.support.apiserver.resources import BUILTINS, Resource
from tests.support.apiserver.store import now
from tests.support.operator_rules import DEFAULT_PORT, operator_pod, replicas

if TYPE_CHECKING:
    from tests.support.apiserver.server import ApiServer

CONTROLLER = "pytorchjob-controller"
PODS, SERVICES, EVENTS = (next(r for r in BUILTINS if r.plural == p) for p in ("pods", "services", "events"))
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
FINAL_CONDITIONS = ("Succeeded", "Failed")


def owner_reference(obj: dict[str, Any], controller: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def operator_labels(job: str, rtype: str, index: int) -> dict[str, str]:
    """The labels v1.9 puts on a replica's pod (GenLabels, plus replica type, index and the master's role)."""
    return {
        "training.kubeflow.org/operator-name": CONTROLLER,
        JOB_NAME_LABEL: job,
        "training.kubeflow.org/replica-type": rtype.lower(),
        "training.kubeflow.org/replica-index": str(index),
        **({"training.kubeflow.org/job-role": "master"} if rtype.lower() == "master" else {}),
    }


def start_pytorchjob(api: ApiServer, job: dict[str, Any]) -> None:
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    defaulted = copy.deepcopy(job)
    for rspec in defaulted["spec"].get("pytorchReplicaSpecs", {}).values():
        for container in rspec.get("template", {}).get("spec", {}).get("containers", []):
            ports = container.setdefault("ports", [])
            if container.get("name") == "pytorch" and not any(p.get("name") == "pytorchjob-port" for p in ports):
                ports.append({"name": "pytorchjob-port", "containerPort": DEFAULT_PORT, "protocol": "TCP"})
    set_condition(
        api,
        job["metadata"]["namespace"],
        name,
        "Created",
        reason="PyTorchJobCreated",
        message=f"PyTorchJob {name} is created.",
    )
    for rtype, index in replicas(defaulted):
        pod = operator_pod(defaulted, rtype, index)
        pod["metadata"] |= {"namespace": namespace, "ownerReferences": [owner_reference(job)]}
        pod["metadata"]["labels"] |= operator_labels(name, rtype, index)
        created = api.create_object(PODS, namespace, pod, [], CONTROLLER, dry_run=False)
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
        port = next(p["containerPort"] for p in container["ports"] if p.get("name") == "pytorchjob-port")
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": created["metadata"]["name"],
                "namespace": namespace,
                "labels": operator_labels(name, rtype, index),
                "ownerReferences": [owner_reference(job)],
            },
            "spec": {
                "clusterIP": "None",
                "selector": operator_labels(name, rtype, index),
                "ports": [{"name": "pytorchjob-port", "port": port, "targetPort": port}],
            },
        }
        api.create_object(SERVICES, namespace, service, [], CONTROLLER, dry_run=False)
        emit_event(api, job, "SuccessfulCreatePod", f"Created pod: {created['metadata']['name']}", component=CONTROLLER)
        emit_event(
            api, job, "SuccessfulCreateService", f"Created service: {service['metadata']['name']}", component=CONTROLLER
        )


def _update(api: ApiServer, resource: Resource, namespace: str, name: str, change: Any) -> dict[str, Any]:
    """Apply ``change(obj)`` to a copy of a stored object and store it, as a controller's update would."""
    collection = resource.collection(namespace)
    with api.store.lock:
        obj = copy.deepcopy(api.store.get(collection, name))
        if obj is None:
            raise KeyError(f"no {resource.kind} {namespace}/{name}")
        change(obj)
        return api.store.write(collection, obj)


def set_condition(
    api: ApiServer,
    namespace: str,
    name: str,
    type_: str,
    status: str = "True",
    reason: str = "",
    message: str = "",
    plural: str = "pytorchjobs",
) -> dict[str, Any]:
    """Set one condition of a job's status, as the operator does (Succeeded or Failed turn Running False)."""
    resource = next(r for r in api.resources() if r.plural == plural)
    stamp = now()

    def change(job: dict[str, Any]) -> None:
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        if type_ in FINAL_CONDITIONS and status == "True":
            for condition in conditions:
                if condition["type"] == "Running" and condition["status"] == "True":
                    condition |= {"status": "False", "lastTransitionTime": stamp}
        old = next((c for c in conditions if c["type"] == type_), None)
        new = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastUpdateTime": stamp,
            "lastTransitionTime": stamp if old is None or old["status"] != status else old["lastTransitionTime"],
        }
        if old is None:
            conditions.append(new)
        else:
            conditions[conditions.index(old)] = new
        if type_ in FINAL_CONDITIONS and status == "True":
            job["status"]["completionTime"] = stamp

    return _update(api, resource, namespace, name, change)


def set_pod_phase(
    api: ApiServer,
    namespace: str,
    name: str,
    phase: str,
    exit_code: int | None = None,
    reason: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """Move a pod to Pending, Running, Succeeded or Failed, with its containers' states as kubelet reports them."""
    stamp = now()

    def change(pod: dict[str, Any]) -> None:
        if node or (phase != "Pending" and not pod["spec"].get("nodeName")):
            pod["spec"]["nodeName"] = node or "stand-in-node"
        old = {s["name"]: s for s in pod.get("status", {}).get("containerStatuses", [])}
        statuses = []
        for container in pod["spec"]["containers"]:
            if phase == "Pending":
                state = {"waiting": {"reason": reason or "ContainerCreating"}}
            elif phase == "Running":
                state = {"running": {"startedAt": stamp}}
            else:
                code = exit_code if exit_code is not None else 0 if phase == "Succeeded" else 1
                state = {
                    "terminated": {
                        "exitCode": code,
                        "reason": reason or ("Completed" if code == 0 else "Error"),
                        "startedAt": stamp,
                        "finishedAt": stamp,
                    }
                }
            previous = old.get(container["name"], {})
            statuses.append(
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": phase == "Running",
                    "started": phase == "Running",
                    "state": state,
                    "lastState": previous.get("lastState", {}),
                    "restartCount": previous.get("restartCount", 0),
                }
            )
        pod["status"] = pod.get("status", {}) | {"phase": phase, "containerStatuses": statuses}
        if phase != "Pending":
            pod["status"].setdefault("startTime", stamp)

    return _update(api, PODS, namespace, name, change)


def restart_container(
    api: ApiServer, namespace: str, name: str, exit_code: int = 1, reason: str = "Error", container: str | None = None
) -> dict[str, Any]:
    """The container exited and kubelet started it again: its log becomes the ``previous`` one."""
    stamp = now()

    def change(pod: dict[str, Any]) -> None:
        wanted = container or pod["spec"]["containers"][0]["name"]
        status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == wanted)
        status |= {
            "restartCount": status.get("restartCount", 0) + 1,
            "state": {"running": {"startedAt": stamp}},
            "lastState": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": stamp}},
        }
        key = (namespace, name, wanted)
        api.previous_logs[key] = api.logs.pop(key, [])

    return _update(api, PODS, namespace, name, change)


def write_log(api: ApiServer, namespace: str, pod: str, text: str, container: str | None = None) -> None:
    """Lines the container prints (followers of its log get them at once)."""
    with api.store.lock:
        if container is None:
            container = api.store.get(PODS.collection(namespace), pod)["spec"]["containers"][0]["name"]
        stamp = time.time()
        api.logs.setdefault((namespace, pod, container), []).extend(
            (stamp, line) for line in text.splitlines(keepends=True)
        )
        api.store.lock.notify_all()


def emit_event(
    api: ApiServer, obj: dict[str, Any], reason: str, message: str, type_: str = "Normal", component: str = "stand-in"
) -> dict[str, Any]:
    """A core/v1 Event about ``obj``, as client-go's event recorder writes one."""
    meta = obj["metadata"]
    namespace = meta.get("namespace") or "default"
    stamp = now()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta.get("namespace", ""),
            "uid": meta.get("uid", ""),
            "resourceVersion": meta.get("resourceVersion", ""),
        },
        "reason": reason,
        "message": message,
        "type": type_,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": component},
        "reportingComponent": component,
    }
    return api.create_object(EVENTS, namespace, event, [], component, dry_run=False)
