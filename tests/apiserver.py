"""An HTTP-level stand-in of the Kubernetes API server, for testing mfrctl against "a cluster".

No Kubernetes API server can run on these machines (no container runtime,
no etcd), so this real HTTP server on 127.0.0.1 answers the few REST calls
mfrctl makes, the way the API server does: objects stored per collection,
create / get / list / delete / delete-collection with label selectors,
409 AlreadyExists and 404 NotFound as Status objects, dryRun=All, pod logs,
and "404 page not found" for the PyTorchJob API when the operator's CRD is
not installed (likewise for prometheus-operator's monitoring API).  It records every request, so tests check exactly what was sent.
The real kubernetes client and kubeflow-training SDK talk to it through a
kubeconfig; nothing in mfrctl is replaced.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN = "stand-in-token"
_COLLECTION = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)$")
_OBJECT = re.compile(r"^(?P<collection>/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/[^/]+/[a-z]+)/(?P<name>[^/]+)(?P<log>/log)?$")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: Any


@dataclass
class ApiServer:
    crd_installed: bool = True
    monitoring_crds: bool = True  # prometheus-operator's PodMonitor/PrometheusRule API
    requests: list[Request] = field(default_factory=list)
    objects: dict[str, dict[str, dict]] = field(default_factory=dict)  # collection path -> name -> object
    logs: dict[str, str] = field(default_factory=dict)  # pod name -> log text
    denied: dict[str, str] = field(default_factory=dict)  # plural -> an admission webhook's denial
    on_create: Callable[[dict], None] | None = None  # plays the operator: called with each created object

    def start(self) -> ApiServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(
                    self.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()},
                    {k.lower(): v for k, v in self.headers.items()}, json.loads(raw) if raw else None,
                )
                server.requests.append(request)
                status, body = server.answer(request)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "ml", server: str | None = None) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": server or self.url}}],
            "users": [{"name": "tester", "user": {"token": TOKEN}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester", "namespace": namespace}},
                         {"name": "other", "context": {"cluster": "stand-in", "user": "tester"}}],
        }))
        return path

    # -- what the cluster holds -----------------------------------------------------------

    def put(self, collection: str, obj: dict) -> None:
        self.objects.setdefault(collection, {})[obj["metadata"]["name"]] = obj

    def add_pod(self, namespace: str, job: str, rtype: str, index: int, phase: str = "Running", log: str = "") -> None:
        """A pod as the operator creates it for a replica of ``job``."""
        name = f"{job}-{rtype}-{index}"
        labels = {
            "training.kubeflow.org/job-name": job,
            "training.kubeflow.org/replica-type": rtype,
            "training.kubeflow.org/replica-index": str(index),
            "training.kubeflow.org/operator-name": "pytorchjob-controller",
        }
        if rtype == "master":
            labels["training.kubeflow.org/job-role"] = "master"
        self.put(f"/api/v1/namespaces/{namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": f"gpu-node-{index}", "containers": [{"name": "pytorch", "image": "mfr-trainer:0.1.0"}]},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "pytorch", "restartCount": 1 if rtype == "worker" else 0, "ready": True,
                "image": "mfr-trainer:0.1.0", "imageID": "", "state": {},
            }]},
        })
        self.logs[name] = log

    def sent(self, method: str | None = None) -> list[tuple[str, str]]:
        """(method, path) of every request received, optionally of one method."""
        return [(r.method, r.path) for r in self.requests if method in (None, r.method)]

    # -- answers ------------------------------------------------------------------------------

    def answer(self, req: Request) -> tuple[int, Any]:
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, _status(401, "Unauthorized", "Unauthorized")
        if "/apis/kubeflow.org/" in req.path and not self.crd_installed:
            return 404, "404 page not found\n"
        if "/apis/monitoring.coreos.com/" in req.path and not self.monitoring_crds:
            return 404, "404 page not found\n"
        if match := _OBJECT.match(req.path):
            collection, name = match["collection"], match["name"]
            plural = collection.rsplit("/", 1)[1]
            obj = self.objects.get(collection, {}).get(name)
            if obj is None:
                return 404, _status(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)
            if match["log"]:
                return 200, self.logs.get(name, "")
            if req.method == "GET":
                return 200, obj
            if req.method == "DELETE":
                del self.objects[collection][name]
                return 200, _status(200, "", "", name=name, kind=plural) | {"status": "Success"}
        if match := _COLLECTION.match(req.path):
            items = [
                obj for path, objs in self.objects.items() for obj in objs.values()
                if path.endswith(f"/{match['plural']}") and (match["ns"] is None or f"/namespaces/{match['ns']}/" in path)
                and _selected(obj, req.query.get("labelSelector", ""))
            ]
            if req.method == "GET":
                return 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}
            if req.method == "DELETE":
                for obj in items:
                    del self.objects[req.path][obj["metadata"]["name"]]
                return 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}
            if req.method == "POST":
                name = req.body["metadata"]["name"]
                if match["plural"] in self.denied:
                    return 403, _status(403, "Forbidden", self.denied[match["plural"]])
                if name in self.objects.get(req.path, {}):
                    return 409, _status(
                        409, "AlreadyExists", f'{match["plural"]} "{name}" already exists', name=name, kind=match["plural"]
                    )
                created = json.loads(json.dumps(req.body))
                created["metadata"] |= {"namespace": match["ns"], "creationTimestamp": "2026-01-01T00:00:00Z", "uid": "u-1"}
                if req.query.get("dryRun") != "All":
                    self.put(req.path, created)
                    if self.on_create:
                        self.on_create(created)
                return 201, created
        return 404, "404 page not found\n"


def _selected(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, _, v in (term.partition("=") for term in selector.split(",") if term))


def _status(code: int, reason: str, message: str, **details: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message, "reason": reason,
            "details": details, "code": code}
