"""ApiServer: the stand-in on 127.0.0.1 (HTTP/1.1, chunked streams for watches and followed logs) and its test API."""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tests.support.apiserver import workloads
from tests.support.apiserver.resources import (
    ACCESS_REVIEW,
    BUILTINS,
    CRD_RESOURCE,
    KUEUE_CRDS,
    MONITORING_CRDS,
    TORCH_RUNTIME,
    TRAINER_V2_CRDS,
    Resource,
    crd_resource,
    load_yaml,
)
from tests.support.apiserver.rest import NAMESPACES, TOKEN, Reply, Request, RestApi, decode_body
from tests.support.apiserver.store import Store, now
from tests.support.operator_rules import PYTORCHJOB_CRD

MONITORING = [crd_resource(crd) for crd in MONITORING_CRDS]
KUEUE = [crd_resource(crd) for crd in KUEUE_CRDS]


@cache
def _vendored(path: Path) -> Resource:
    if not path.exists():
        pytest.skip(f"{path} is missing: the CRDs are vendored in ../shared/crds (see its README.md)")
    return crd_resource(load_yaml(path))


@dataclass
class ApiServer(RestApi):
    """A kube-apiserver stand-in; the flags say which optional APIs the cluster serves (they may change any time)."""

    crd_installed: bool = True  # the Kubeflow training operator's PyTorchJob (kubeflow.org/v1)
    monitoring_crds: bool = True  # prometheus-operator's PodMonitor and PrometheusRule (monitoring.coreos.com/v1)
    trainer_v2: bool = False  # Kubeflow Trainer v2.3.0 (trainer.kubeflow.org/v1alpha1), with its torch-distributed
    kueue: bool = False  # Kueue's LocalQueue, Workload, ClusterQueue, ResourceFlavor (kueue.x-k8s.io/v1beta1)
    operator: bool = False  # play the training operator: each created PyTorchJob gets its pods and Services
    namespaces: tuple[str, ...] = ("default", "ml")  # the namespaces that exist at start
    requests: list[Request] = field(default_factory=list, repr=False)  # every request received, in order
    denied: dict[str, str] = field(default_factory=dict)  # plural -> an admission webhook's denial of creates
    rbac_denied: set[tuple[str, str, str | None]] = field(default_factory=set)  # see forbid()
    on_create: Callable[[dict[str, Any]], None] | None = None  # called with each object created through the API
    store: Store = field(default_factory=Store, repr=False)
    logs: dict[tuple[str, str, str], list[tuple[float, str]]] = field(default_factory=dict, repr=False)
    previous_logs: dict[tuple[str, str, str], list[tuple[float, str]]] = field(default_factory=dict, repr=False)
    stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    installed_crds: list[Resource] = field(default_factory=list)  # see install_crd()

    def resources(self) -> list[Resource]:
        """Every kind served now: the built-in ones, and the custom ones whose CRDs are installed."""
        custom = (
            ([_vendored(PYTORCHJOB_CRD)] if self.crd_installed else [])
            + (MONITORING if self.monitoring_crds else [])
            + ([_vendored(path) for path in TRAINER_V2_CRDS] if self.trainer_v2 else [])
            + (KUEUE if self.kueue else [])
            + self.installed_crds
        )
        return [*BUILTINS, CRD_RESOURCE, ACCESS_REVIEW, *custom]

    def after_create(self, resource: Resource, obj: dict[str, Any]) -> None:
        if self.operator and resource.plural == "pytorchjobs":
            workloads.start_pytorchjob(self, obj)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ApiServer:
        self.resources()  # a missing vendored CRD skips the test here, not in a request thread
        for namespace in self.namespaces:
            self.put(
                NAMESPACES,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                },
            )
        if self.trainer_v2:
            self.put("/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes", load_yaml(TORCH_RUNTIME))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"api": self}))
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.store.lock:
            self.store.lock.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "ml", server: str | None = None) -> Path:
        """A kubeconfig for this server: context stand-in (namespace ``namespace``) and other (no namespace)."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "stand-in",
                    "clusters": [{"name": "stand-in", "cluster": {"server": server or self.url}}],
                    "users": [{"name": "tester", "user": {"token": TOKEN}}],
                    "contexts": [
                        {
                            "name": "stand-in",
                            "context": {"cluster": "stand-in", "user": "tester", "namespace": namespace},
                        },
                        {"name": "other", "context": {"cluster": "stand-in", "user": "tester"}},
                    ],
                }
            )
        )
        return path

    # -- what the cluster holds ----------------------------------------------------------------

    @property
    def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Collection path (e.g. /api/v1/namespaces/ml/configmaps) -> name -> stored object."""
        return self.store.objects

    def put(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as if it had been there all along (no validation, no controllers)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if "/namespaces/" in collection:
            meta.setdefault("namespace", collection.split("/namespaces/")[1].split("/")[0])
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        return self.store.write(collection, obj)

    def sent(self, method: str | None = None) -> list[tuple[str, str]]:
        """(method, path) of every request received, optionally of one method."""
        return [(r.method, r.path) for r in self.requests if method in (None, r.method)]

    def install_crd(self, crd: dict[str, Any]) -> None:
        """Serve a CustomResourceDefinition's kind from now on (resources.loose_crd makes a permissive one)."""
        self.installed_crds.append(crd_resource(crd))

    def forbid(self, verb: str, resource: str, namespace: str | None = None) -> None:
        """Deny ``verb`` ("*" for all) on ``resource`` (a plural, or "pods/log"), in one namespace or all, as RBAC."""
        self.rbac_denied.add((verb, resource, namespace))

    def compact(self) -> None:
        """Forget the change history: a watch from an older resourceVersion gets 410 Gone."""
        self.store.compact()

    # -- what controllers and kubelets do (workloads.py) -----------------------------------------

    def add_pod(
        self, namespace: str, job: str, rtype: str, index: int, phase: str = "Running", log: str = ""
    ) -> dict[str, Any]:
        """A pod of replica ``rtype`` ``index`` as the operator creates it (owned by ``job`` if it exists)."""
        name = f"{job}-{rtype}-{index}"
        owner = self.store.get(f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs", job)
        self.put(
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": workloads.operator_labels(job, rtype, index),
                    **({"ownerReferences": [workloads.owner_reference(owner)]} if owner else {}),
                },
                "spec": {
                    "nodeName": f"gpu-node-{index}",
                    "containers": [{"name": "pytorch", "image": "mfr-trainer:0.1.0"}],
                },
            },
        )
        if log:
            self.write_log(namespace, name, log)
        return self.set_pod_phase(namespace, name, phase)

    def set_pod_phase(
        self,
        namespace: str,
        name: str,
        phase: str,
        exit_code: int | None = None,
        reason: str | None = None,
        node: str | None = None,
    ) -> dict[str, Any]:
        """Pending (waiting: ContainerCreating), Running, or Succeeded/Failed with the containers' exit code."""
        return workloads.set_pod_phase(self, namespace, name, phase, exit_code, reason, node)

    def restart_container(
        self, namespace: str, name: str, exit_code: int = 1, reason: str = "Error", container: str | None = None
    ) -> dict[str, Any]:
        """The container exited and was restarted: restartCount+1, lastState, its log becomes ``previous``."""
        return workloads.restart_container(self, namespace, name, exit_code, reason, container)

    def write_log(self, namespace: str, pod: str, text: str, container: str | None = None) -> None:
        """Append to a container's log (default: the pod's first container)."""
        workloads.write_log(self, namespace, pod, text, container)

    def set_job_condition(
        self,
        namespace: str,
        name: str,
        type_: str,
        status: str = "True",
        reason: str = "",
        message: str = "",
        plural: str = "pytorchjobs",
    ) -> dict[str, Any]:
        """Set a condition of a job's status (Succeeded/Failed turn Running False and set completionTime)."""
        return workloads.set_condition(self, namespace, name, type_, status, reason, message, plural)

    def emit_event(
        self, obj: dict[str, Any], reason: str, message: str, type_: str = "Normal", component: str = "stand-in"
    ) -> dict[str, Any]:
        """A core/v1 Event whose involvedObject is ``obj``."""
        return workloads.emit_event(self, obj, reason, message, type_, component)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms wait for a delayed ACK
    api: ApiServer

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = decode_body(self.rfile.read(length) if length else b"", headers.get("content-type", ""))
        request = Request(self.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}, headers, body)
        self.api.requests.append(request)
        reply = self.api.answer(request)
        if reply.stream is None:
            self._send(reply)
        else:
            self._stream(reply, "text/plain" if url.path.endswith("/log") else "application/json")

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

    def _send(self, reply: Reply) -> None:
        text = isinstance(reply.body, str)
        data = reply.body.encode() if text else json.dumps(reply.body).encode()
        self.send_response(reply.code)
        self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, reply: Reply, content_type: str) -> None:
        self.send_response(reply.code)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in (c for c in reply.stream if c):  # an empty chunk would end the stream
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            pass
        finally:
            reply.stream.close()
