"""The cluster side of mfrctl: which cluster, creating a run's objects, reading and deleting runs.

The cluster is found as kubectl finds it: --kubeconfig, else $KUBECONFIG,
else ~/.kube/config, with --context; in a pod without a kubeconfig, the pod's
service account.  Every call is plain REST through the kubernetes client,
with objects as raw dicts: the kubeflow-training SDK's models cannot parse a
job that sets ``elasticPolicy.metrics``, and its log reader has no tail,
since, previous or per-line prefixes.  Every failure is one ClusterError line
naming the cluster (server and kubeconfig), never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MONITORING_API = "monitoring.coreos.com/v1"  # prometheus-operator's API: only there when its CRDs are installed
TRAINER_API = "trainer.kubeflow.org/v1alpha1"  # Kubeflow Trainer v2


@dataclass(frozen=True)
class JobApi:
    """A Kubeflow job kind mfrctl runs: where it is served, and how its pods are found."""

    kind: str
    api_version: str
    plural: str
    container: str  # the trainer's container in its pods
    job_label: str  # the pod label that names the job
    type_label: str | None  # the pod label of the replica type (None: one type, "node")
    index_label: str  # the pod label of the replica index
    install: str  # what serves it, for the error when the cluster does not


PYTORCHJOB = JobApi(
    "PyTorchJob",
    "kubeflow.org/v1",
    "pytorchjobs",
    "pytorch",
    "training.kubeflow.org/job-name",
    "training.kubeflow.org/replica-type",
    "training.kubeflow.org/replica-index",
    "the Kubeflow training operator v1.9 (see manifests/README.md)",
)
TRAINJOB = JobApi(
    "TrainJob",
    TRAINER_API,
    "trainjobs",
    "node",
    "jobset.sigs.k8s.io/jobset-name",
    None,
    "batch.kubernetes.io/job-completion-index",
    "Kubeflow Trainer v2.3 (or use --api pytorchjob)",
)
JOB_APIS = (PYTORCHJOB, TRAINJOB)
# API version and collection name of every kind the chart renders.
KINDS = {
    "ConfigMap": ("v1", "configmaps"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Secret": ("v1", "secrets"),
    "Service": ("v1", "services"),
    "Deployment": ("apps/v1", "deployments"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "PodMonitor": (MONITORING_API, "podmonitors"),
    "PrometheusRule": (MONITORING_API, "prometheusrules"),
    "TrainingRuntime": (TRAINER_API, "trainingruntimes"),
    "ClusterTrainingRuntime": (TRAINER_API, "clustertrainingruntimes"),
    **{api.kind: (api.api_version, api.plural) for api in JOB_APIS},
}
CLUSTER_SCOPED = {"ClusterTrainingRuntime"}
KIND_OF_JOBS = {api.kind for api in JOB_APIS}
# A run's objects carry the chart's labels; these find them all.
CHART_SELECTOR = "app.kubernetes.io/name=mfr-trainer"
RUN_LABEL = "app.kubernetes.io/instance"
FIELD_MANAGER = "mfrctl"
SUCCEEDED = ("Succeeded", "Complete")  # a PyTorchJob's and a TrainJob's condition
FINAL_STATES = (*SUCCEEDED, "Failed")
REQUEST_TIMEOUT = (10, 60)  # seconds: connect, read
POLL_SECONDS = 5.0
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def job_api(kind: str) -> JobApi:
    return next(api for api in JOB_APIS if api.kind == kind)


class ClusterError(RuntimeError):
    """One line about the cluster; exit code 2 when it is the user's setup, else 1."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def is_shared(obj: dict[str, Any]) -> bool:
    """An object every run shares (the Grafana dashboard): created once, never deleted with a run."""
    return (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "dashboard"


def run_selector(name: str) -> str:
    return f"{CHART_SELECTOR},{RUN_LABEL}={name}"


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """REST path of a kind's collection, e.g. /api/v1/namespaces/ns/configmaps (cluster-scoped kinds: no namespace)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace and kind not in CLUSTER_SCOPED else ""
    return f"{prefix}{scope}/{KINDS[kind][1]}"


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """The job's state (its newest true condition) and that condition's message."""
    conditions = [c for c in job.get("status", {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return "Pending", ""
    last = conditions[-1]
    return last["type"], last.get("message", "")


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """What status and list show of a raw PyTorchJob or TrainJob."""
    spec, status = job.get("spec", {}), job.get("status", {})
    state, message = job_state(job)
    if job["kind"] == TRAINJOB.kind:
        trainer = spec.get("trainer") or {}
        mode, replicas, nproc = "static", {"Node": trainer.get("numNodes", 1)}, trainer.get("numProcPerNode", "auto")
    else:
        elastic = spec.get("elasticPolicy")
        mode = f"elastic {elastic.get('minReplicas')}:{elastic.get('maxReplicas')}" if elastic else "static"
        replicas = {kind: r.get("replicas", 1) for kind, r in (spec.get("pytorchReplicaSpecs") or {}).items()}
        nproc = spec.get("nprocPerNode", "")
    return {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace", ""),
        "kind": job["kind"],
        "state": state,
        "message": message,
        "mode": mode,
        "replicas": replicas,
        "nprocPerNode": nproc,
        "created": job["metadata"].get("creationTimestamp", ""),
        "completed": status.get("completionTime", ""),
    }


def first_pod(job: dict[str, Any]) -> tuple[str, int]:
    """Rank 0's pod: master-0 of a static PyTorchJob, worker-0 of an elastic one, node 0 of a TrainJob."""
    if job["kind"] == TRAINJOB.kind:
        return "node", 0
    return ("master", 0) if "Master" in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}) else ("worker", 0)


def replica_counts(job: dict[str, Any]) -> dict[str, int]:
    """Replica type (lower case, as pods are labelled) -> how many the job asks for."""
    return {kind.lower(): count for kind, count in job_summary(job)["replicas"].items()}


def age(timestamp: str, now: datetime | None = None) -> str:
    """kubectl-style age of an RFC 3339 timestamp: 45s, 12m, 3h, 2d."""
    if not timestamp:
        return ""
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(timezone.utc)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


@dataclass
class Cluster:
    """A connection to one cluster and namespace (nothing is sent until a method is called)."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str
    server: str
    source: str
    warn: Callable[[str], None] = print  # one-line notes about what an operation skipped
    discovered: dict[str, bool] = field(default_factory=dict)  # API group version -> served, as discovery said

    # -- runs -------------------------------------------------------------------------

    def create_run(self, objects: list[dict[str, Any]], *, dry_run: bool = False) -> list[str]:
        """Create a rendered run's objects; refuses a taken name, rolls back a partial run.

        The job goes last (what its pods mount exists first); then every other object
        of the run in its namespace gets an ownerReference to it, so that deleting the
        job, by hand or by ``ttlSecondsAfterFinished``, lets the garbage collector
        remove them too.  A shared object (the Grafana dashboard) is created only where
        it is missing and is never the run's.  Returns ``kind/name`` of every object
        created (or that would be, with dry_run: the API server validates them,
        webhooks included, and stores nothing).
        """
        job = next(o for o in objects if o["kind"] in KIND_OF_JOBS)
        api, name = job_api(job["kind"]), job["metadata"]["name"]
        if self._get_job(api, name) is not None:
            raise ClusterError(
                f"{api.kind} {name} already exists in namespace {self.namespace}: "
                f"choose another --name, or remove it with mfrctl delete {name} -n {self.namespace}"
            )
        from kubernetes.client.rest import ApiException

        query = [("fieldManager", FIELD_MANAGER), ("fieldValidation", "Strict")] + (
            [("dryRun", "All")] if dry_run else []
        )
        created: list[dict[str, Any]] = []
        refs: list[str] = []
        try:
            for obj in objects:
                if is_shared(obj) and self._exists(obj):
                    continue
                try:
                    with self._errors(
                        f"create {obj['kind']} {obj['metadata']['name']}", conflict=name, passthrough_404=True
                    ):
                        stored = self._request("POST", self._collection(obj), body=obj, query=query)
                except ApiException as err:
                    raise self._missing(obj, err) from None
                refs.append(_ref(obj))
                if not is_shared(obj):
                    created.append(stored or obj)
            if not dry_run:
                owner = next(o for o in created if o["kind"] == api.kind)
                for obj in created:  # a cluster-scoped object cannot have a namespaced owner
                    if obj is not owner and obj["kind"] not in CLUSTER_SCOPED:
                        self._own(obj, owner)
        except ClusterError as err:
            if created and not dry_run:
                self._rollback(created)
                raise ClusterError(f"{err} (removed what was created: {', '.join(_ref(o) for o in created)})") from None
            raise
        return refs

    def get_job(self, name: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """The run's job, a PyTorchJob or a TrainJob (whichever the cluster serves and holds)."""
        served = [api for api in JOB_APIS if self.serves(api.api_version)]
        if not served:
            raise self._no_operator()
        for api in served:
            job = self._get_job(api, name)
            if job is not None:
                return job
        if missing_ok:
            return None
        kinds = " or ".join(api.kind for api in served)
        raise ClusterError(
            f"no {kinds} {name} in namespace {self.namespace} (mfrctl list -n {self.namespace} shows the runs)"
        )

    def _get_job(self, api: JobApi, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            with self._errors(f"get {api.kind} {name}", passthrough_404=True):
                return self._request("GET", f"{collection_path(api.api_version, api.kind, self.namespace)}/{name}")
        except ApiException:  # no such job, or its API is not served here
            return None

    def list_jobs(self, *, all_namespaces: bool = False) -> list[dict[str, Any]]:
        """Every job of this chart, PyTorchJobs and TrainJobs alike, in the namespace (or all)."""
        served = [api for api in JOB_APIS if self.serves(api.api_version)]
        if not served:
            raise self._no_operator()
        jobs = []
        for api in served:
            path = collection_path(api.api_version, api.kind, None if all_namespaces else self.namespace)
            with self._errors(f"list {api.kind}s"):
                jobs += [
                    item | {"kind": api.kind, "apiVersion": api.api_version}
                    for item in self._request("GET", path, query=[("labelSelector", CHART_SELECTOR)])["items"]
                ]
        return sorted(jobs, key=lambda job: (job["metadata"].get("namespace", ""), job["metadata"]["name"]))

    def pods(self, job: dict[str, Any], replica: str | None = None, index: int | None = None) -> list[dict[str, Any]]:
        """The job's pods (raw dicts, by replica and index), found by the labels its controller gives them."""
        api, name = job_api(job["kind"]), job["metadata"]["name"]
        selector = f"{api.job_label}={name}"
        if replica is not None and api.type_label is not None:
            selector += f",{api.type_label}={replica}"
        if index is not None:
            selector += f",{api.index_label}={index}"
        with self._errors(f"list the pods of {name}"):
            items = self._request(
                "GET", f"/api/v1/namespaces/{self.namespace}/pods", query=[("labelSelector", selector)]
            )["items"]
        return sorted(items, key=lambda pod: (replica_of(pod)[0] != "master", replica_of(pod)[1]))

    def pod_log(
        self, pod: dict[str, Any], *, tail: int | None = None, since: int | None = None, previous: bool = False
    ) -> str:
        """The log of a pod's trainer container (``previous``: of its last terminated run)."""
        name = pod["metadata"]["name"]
        with self._errors(f"read the log of pod {name}"):
            return self._request(
                "GET",
                f"/api/v1/namespaces/{self.namespace}/pods/{name}/log",
                query=_log_query(pod, tail, since, previous),
                accept="text/plain",
            )

    def follow_log(
        self, pod: dict[str, Any], on_line: Callable[[str], None], *, tail: int | None = None, since: int | None = None
    ) -> None:
        """Stream a pod's trainer log to ``on_line`` until the container ends."""
        name = pod["metadata"]["name"]
        with self._errors(f"follow the log of pod {name}"):
            response = self.api.call_api(
                f"/api/v1/namespaces/{self.namespace}/pods/{name}/log",
                "GET",
                query_params=[*_log_query(pod, tail, since, False), ("follow", "true")],
                header_params={"Accept": "text/plain"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=(REQUEST_TIMEOUT[0], None),
            )
            pending = b""
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    on_line(line.decode(errors="replace"))
            if pending:
                on_line(pending.decode(errors="replace"))

    def events(self, names: list[str]) -> list[dict[str, Any]]:
        """Events about the named objects (the job, its pods), oldest first."""
        found = []
        for name in names:
            with self._errors(f"list the events of {name}"):
                found += self._request(
                    "GET",
                    f"/api/v1/namespaces/{self.namespace}/events",
                    query=[("fieldSelector", f"involvedObject.name={name}")],
                )["items"]
        return sorted(found, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def delete_run(self, name: str) -> list[str]:
        """Delete the job (the operator's pods and Services go with it) and every object labelled as the run's.

        Objects are found by the run's labels and deleted by name, so a Role needs only
        list and delete.  A kind whose API the cluster does not serve (404) or that the
        user may not list (403) cannot hold objects of this run that mfrctl could remove:
        it is skipped (the 403 with a note), and whatever the job owned, the garbage
        collector removes with it.
        """
        from kubernetes.client.rest import ApiException

        job = self.get_job(name, missing_ok=True)
        found, skipped = [], []
        for kind, (api_version, plural) in KINDS.items():  # first what the run has, the GC may be quicker than us
            if kind in KIND_OF_JOBS or kind in CLUSTER_SCOPED:
                continue
            try:
                with self._errors(f"list the {plural} of {name}", passthrough_404=True, passthrough_403=True):
                    items = self._request(
                        "GET",
                        collection_path(api_version, kind, self.namespace),
                        query=[("labelSelector", run_selector(name))],
                    )["items"]
            except ApiException as err:
                if err.status == 403:
                    skipped.append(plural)
                continue
            found += [(api_version, kind, item["metadata"]["name"]) for item in items]
        runtime = (job or {}).get("spec", {}).get("runtimeRef") or {}
        if runtime.get("kind") in CLUSTER_SCOPED:  # a cluster-wide runtime the chart made for this run
            api_version = KINDS[runtime["kind"]][0]
            shipped = self._get_or_none(
                f"{collection_path(api_version, runtime['kind'], None)}/{runtime['name']}",
                f"get {runtime['kind']} {runtime['name']}",
            )
            if shipped and (shipped["metadata"].get("labels") or {}).get(RUN_LABEL) == name:
                found.append((api_version, runtime["kind"], runtime["name"]))
        deleted = []
        if job is not None:
            try:
                with self._errors(f"delete {job['kind']} {name}", passthrough_404=True):
                    self._request(
                        "DELETE",
                        self._object_path(job["apiVersion"], job["kind"], name),
                        query=[("propagationPolicy", "Background")],
                    )
            except ApiException:  # deleted meanwhile
                pass
            deleted.append(f"{job['kind'].lower()}/{name}")
        for api_version, kind, item in found:
            try:
                with self._errors(f"delete {kind} {item}", passthrough_404=True):
                    self._request("DELETE", self._object_path(api_version, kind, item))
            except ApiException:  # already gone: the garbage collector removed it with the job
                pass
            deleted.append(f"{kind.lower()}/{item}")
        if not deleted:
            raise ClusterError(
                f"no run {name} in namespace {self.namespace} (mfrctl list -n {self.namespace} shows the runs)"
            )
        if skipped:
            self.warn(f"not allowed to list {', '.join(skipped)} in namespace {self.namespace}: skipped")
        return deleted

    def wait(
        self,
        name: str,
        on_change: Callable[[str, str], None],
        poll: float = POLL_SECONDS,
        deadline: float | None = None,
    ) -> str:
        """Poll the job until it succeeds or fails (or ``deadline``, a time.monotonic(), passes); its last state."""
        previous = None
        while True:
            state, message = job_state(self.get_job(name))
            if state != previous:
                on_change(state, message)
                previous = state
            if state in FINAL_STATES or (deadline is not None and time.monotonic() >= deadline):
                return state
            time.sleep(poll)

    def wait_for_start(self, name: str, poll: float = POLL_SECONDS, deadline: float | None = None) -> None:
        """Wait until rank 0's pod has started (or the job is over, or ``deadline`` passes)."""
        while (job := self.get_job(name)) and job_state(job)[0] not in FINAL_STATES:
            if any(
                (p.get("status") or {}).get("phase") not in (None, "Pending") for p in self.pods(job, *first_pod(job))
            ):
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(poll)

    def serves(self, api_version: str) -> bool:
        """Does the cluster serve this API group version (discovery: /apis/<group>/<version>; asked once)?"""
        from kubernetes.client.rest import ApiException

        if api_version not in self.discovered:
            try:
                with self._errors(f"discover {api_version}", passthrough_404=True):
                    self._request("GET", f"/apis/{api_version}")
                self.discovered[api_version] = True
            except ApiException:
                self.discovered[api_version] = False
        return self.discovered[api_version]

    def namespace_object(self) -> dict[str, Any] | None:
        """This namespace's object (its labels carry the Pod Security level), None when it does not exist."""
        return self._get_or_none(f"/api/v1/namespaces/{self.namespace}", f"get namespace {self.namespace}")

    def secret_data(self, name: str) -> dict[str, str] | None:
        """A Secret's data (base64), None when it does not exist."""
        secret = self._get_or_none(f"/api/v1/namespaces/{self.namespace}/secrets/{name}", f"get secret {name}")
        return None if secret is None else secret.get("data") or {}

    def nodes(self) -> list[dict[str, Any]]:
        with self._errors("list nodes"):
            return self._request("GET", "/api/v1/nodes")["items"]

    def _get_or_none(self, path: str, action: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            with self._errors(action, passthrough_404=True):
                return self._request("GET", path)
        except ApiException:
            return None

    def apply(self, obj: dict[str, Any], *, dry_run: bool = False) -> None:
        """Create or update ``obj`` in place (server-side apply, as kubectl apply --server-side)."""
        from kubernetes.client.rest import ApiException

        query = [("fieldManager", FIELD_MANAGER), ("force", "true"), ("fieldValidation", "Strict")]
        try:
            with self._errors(f"apply {obj['kind']} {obj['metadata']['name']}", passthrough_404=True):
                self._request(
                    "PATCH",
                    f"{self._collection(obj)}/{obj['metadata']['name']}",
                    body=obj,
                    query=query + ([("dryRun", "All")] if dry_run else []),
                    content_type="application/apply-patch+yaml",
                )
        except ApiException as err:
            raise self._missing(obj, err) from None

    def delete_object(self, obj: dict[str, Any]) -> bool:
        """Delete ``obj`` (by kind, namespace and name); False when it was not there."""
        from kubernetes.client.rest import ApiException

        try:
            with self._errors(f"delete {obj['kind']} {obj['metadata']['name']}", passthrough_404=True):
                self._request("DELETE", f"{self._collection(obj)}/{obj['metadata']['name']}")
        except ApiException as err:
            if _is_status(err, "NotFound", kind="namespaces"):
                raise self._missing(obj, err) from None
            return False
        return True

    # -- plumbing -----------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> Any:
        return self.api.call_api(
            path,
            method,
            query_params=query or [],
            body=body,
            header_params={"Accept": accept, "Content-Type": content_type},
            auth_settings=["BearerToken"],
            response_type="object" if accept == "application/json" else "str",
            _return_http_data_only=True,
            _request_timeout=REQUEST_TIMEOUT,
        )

    def _collection(self, obj: dict[str, Any]) -> str:
        """Where an object is created: its own namespace when it names one (the dashboard may), else ours."""
        return collection_path(obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace") or self.namespace)

    def _object_path(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> str:
        return f"{collection_path(api_version, kind, namespace or self.namespace)}/{name}"

    def _exists(self, obj: dict[str, Any]) -> bool:
        from kubernetes.client.rest import ApiException

        try:
            with self._errors(f"get {obj['kind']} {obj['metadata']['name']}", passthrough_404=True):
                self._request("GET", f"{self._collection(obj)}/{obj['metadata']['name']}")
        except ApiException:
            return False
        return True

    def _own(self, obj: dict[str, Any], owner: dict[str, Any]) -> None:
        """Make ``owner`` (the job) the owner of ``obj``, now that its uid is known."""
        reference = {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "blockOwnerDeletion": False,
        }
        with self._errors(f"set the owner of {obj['kind']} {obj['metadata']['name']}"):
            self._request(
                "PATCH",
                f"{self._collection(obj)}/{obj['metadata']['name']}",
                body={"metadata": {"ownerReferences": [reference]}},
                content_type="application/merge-patch+json",
            )

    def _rollback(self, objects: list[dict[str, Any]]) -> None:
        for obj in reversed(objects):
            try:
                self._request("DELETE", f"{self._collection(obj)}/{obj['metadata']['name']}")
            except Exception:  # best effort: the error being reported matters more
                pass

    def _missing(self, obj: dict[str, Any], err: Any) -> ClusterError:
        """A 404 on create: the namespace does not exist, or the kind's API is not served."""
        namespace = obj["metadata"].get("namespace") or self.namespace
        if _is_status(err, "NotFound", kind="namespaces"):
            return ClusterError(
                f'namespace "{namespace}" not found on {self.server} (kubectl create namespace {namespace})'
            )
        return self._missing_api(obj["kind"])

    def _missing_api(self, kind: str) -> ClusterError:
        if kind in KIND_OF_JOBS:
            api = job_api(kind)
            return ClusterError(
                f"the cluster at {self.server} serves no {api.api_version} {kind} API: install {api.install}"
            )
        if KINDS[kind][0] == MONITORING_API:
            return ClusterError(
                f"the cluster at {self.server} serves no {MONITORING_API} {kind} API: install the prometheus-operator "
                "(e.g. kube-prometheus-stack), or leave the chart's monitoring.podMonitor/prometheusRule disabled"
            )
        if KINDS[kind][0] == TRAINER_API:
            return self._missing_api(TRAINJOB.kind)
        return ClusterError(f"the cluster at {self.server} serves no {KINDS[kind][0]} {kind} API")

    def _no_operator(self) -> ClusterError:
        return ClusterError(
            f"the cluster at {self.server} serves neither {PYTORCHJOB.api_version} PyTorchJob nor {TRAINER_API} "
            f"TrainJob: install {PYTORCHJOB.install}"
        )

    @contextmanager
    def _errors(
        self,
        action: str,
        *,
        conflict: str | None = None,
        passthrough_404: bool = False,
        missing_api: bool = False,
        passthrough_403: bool = False,
    ) -> Iterator[None]:
        """Turn client and SDK exceptions into one ClusterError line."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except (ApiException, HTTPError, RuntimeError, TimeoutError) as raised:
            err = _root_cause(raised)
            if isinstance(err, ApiException):
                if (err.status == 404 and passthrough_404) or (err.status == 403 and passthrough_403):
                    raise err from None
                if err.status == 404 and missing_api:
                    raise self._no_operator() from None
                if err.status == 409 and conflict:
                    raise ClusterError(
                        f"cannot {action}: it already exists in namespace {self.namespace}: choose another --name, "
                        f"or remove the old run with mfrctl delete {conflict} -n {self.namespace}"
                    ) from None
                raise ClusterError(f"cannot {action} (HTTP {err.status}): {_api_message(err)}") from None
            if isinstance(err, HTTPError):
                raise ClusterError(
                    f"cannot reach the Kubernetes API server {self.server} ({self.source}): {_reason(err)}"
                ) from None
            if isinstance(err, TimeoutError):
                raise ClusterError(f"cannot {action}: no answer from {self.server} ({self.source})") from None
            raise ClusterError(f"cannot {action}: {err}") from None


def connect(kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> Cluster:
    """Load the cluster's config as kubectl would; sends nothing."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    paths = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    if not any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p):
        if kubeconfig or context or "KUBERNETES_SERVICE_HOST" not in os.environ:
            raise ClusterError(
                f"no Kubernetes config: {paths} does not exist (pass --kubeconfig or set KUBECONFIG; "
                "inside a pod the service account is used)",
                code=2,
            )
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as err:
            raise ClusterError(f"in-cluster Kubernetes config: {err}", code=2) from None
        source = "in-cluster service account"
        namespace = namespace or _SA_NAMESPACE.read_text().strip()
    else:
        try:
            contexts, active = config.list_kube_config_contexts(config_file=paths)
            if context is not None:
                names = [c["name"] for c in contexts]
                if context not in names:
                    raise ClusterError(f"no context {context!r} in {paths} (it has: {', '.join(names)})", code=2)
                active = next(c for c in contexts if c["name"] == context)
            config.load_kube_config(config_file=paths, context=context, client_configuration=configuration)
        except ConfigException as err:
            raise ClusterError(f"Kubernetes config {paths}: {err}", code=2) from None
        source = f"context {active['name']} in {paths}"
        namespace = namespace or active["context"].get("namespace") or "default"
    return Cluster(api=client.ApiClient(configuration), namespace=namespace, server=configuration.host, source=source)


def replica_of(pod: dict[str, Any]) -> tuple[str, int]:
    """A pod's (replica type, index), from its controller's labels (a TrainJob's are all "node")."""
    labels = pod["metadata"].get("labels") or {}
    if PYTORCHJOB.type_label in labels:
        return labels[PYTORCHJOB.type_label], int(labels.get(PYTORCHJOB.index_label, -1))
    return "node", int(labels.get(TRAINJOB.index_label, -1))


def trainer_container(pod: dict[str, Any]) -> str:
    """The name of a pod's trainer container: the operator's pytorch, or Trainer v2's node."""
    labels = pod["metadata"].get("labels") or {}
    return PYTORCHJOB.container if PYTORCHJOB.job_label in labels else TRAINJOB.container


def pod_summary(pod: dict[str, Any]) -> dict[str, Any]:
    """What status and describe show of a pod: replica, phase, restarts, node, and how its trainer last ended."""
    status = pod.get("status") or {}
    statuses = [c for c in status.get("containerStatuses") or [] if c.get("name") == trainer_container(pod)]
    container = statuses[0] if statuses else {}
    ended = (container.get("state") or {}).get("terminated") or (container.get("lastState") or {}).get("terminated")
    waiting = (container.get("state") or {}).get("waiting") or {}
    return {
        "name": pod["metadata"]["name"],
        "replica": "-".join(map(str, replica_of(pod))),
        "phase": status.get("phase", ""),
        "restarts": sum(c.get("restartCount", 0) for c in status.get("containerStatuses") or []),
        "node": (pod.get("spec") or {}).get("nodeName") or "",
        "exit_code": None if ended is None else ended.get("exitCode"),
        "reason": (ended or {}).get("reason") or waiting.get("reason") or "",
    }


def _log_query(pod: dict[str, Any], tail: int | None, since: int | None, previous: bool) -> list[tuple[str, str]]:
    query = [("container", trainer_container(pod))]
    if tail is not None:
        query.append(("tailLines", str(tail)))
    if since is not None:
        query.append(("sinceSeconds", str(since)))
    if previous:
        query.append(("previous", "true"))
    return query


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}/{obj['metadata']['name']}"


def _root_cause(err: BaseException) -> BaseException:
    """The client wraps connection errors (MaxRetryError around a refused connection): find the one inside."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    seen = err
    while seen is not None:
        if isinstance(seen, (ApiException, HTTPError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _is_status(err: Any, reason: str, *, kind: str) -> bool:
    """Is this a Kubernetes Status of that reason about that kind (not, e.g., a 404 for a missing API)?"""
    try:
        body = json.loads(err.body)
    except (TypeError, ValueError):
        return False
    return body.get("reason") == reason and (body.get("details") or {}).get("kind") == kind


def _api_message(err: Any) -> str:
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return err.reason or "no message"


def _reason(err: Exception) -> str:
    text = str(getattr(err, "reason", None) or err)
    match = re.search(r"\[Errno -?\d+\] (.*?)['\")]*$", text)
    return match[1] if match else text
