"""The cluster side of mfrctl: which cluster, creating a run's objects, reading and deleting runs.

The cluster is found as kubectl finds it: --kubeconfig, else $KUBECONFIG,
else ~/.kube/config, with --context; in a pod without a kubeconfig, the pod's
service account.  Jobs are read as raw dicts, never through the
kubeflow-training 1.9.4 models, which cannot parse a job that sets
``elasticPolicy.metrics``; the SDK's TrainingClient finds a job's pods, reads
their logs and deletes jobs.  Every failure is one ClusterError line naming
the cluster (server and kubeconfig), never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GROUP, VERSION, JOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
MONITORING = "monitoring.coreos.com/v1"  # prometheus-operator's API: only there when its CRDs are installed
# API version and collection name of every kind the chart renders.
KINDS = {
    "ConfigMap": ("v1", "configmaps"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Secret": ("v1", "secrets"),
    "Service": ("v1", "services"),
    "Deployment": ("apps/v1", "deployments"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "PodMonitor": (MONITORING, "podmonitors"),
    "PrometheusRule": (MONITORING, "prometheusrules"),
    "PyTorchJob": (f"{GROUP}/{VERSION}", JOB_PLURAL),
}
# A run's objects carry the chart's labels; these find them all.
CHART_SELECTOR = "app.kubernetes.io/name=mfr-trainer"
RUN_LABEL = "app.kubernetes.io/instance"
FIELD_MANAGER = "mfrctl"
# Labels the operator puts on every pod.
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
FINAL_STATES = ("Succeeded", "Failed")
REQUEST_TIMEOUT = (10, 60)  # seconds: connect, read
POLL_SECONDS = 5.0
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterError(RuntimeError):
    """One line about the cluster; exit code 2 when it is the user's setup, else 1."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def run_selector(name: str) -> str:
    return f"{CHART_SELECTOR},{RUN_LABEL}={name}"


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """REST path of a kind's collection, e.g. /api/v1/namespaces/ns/configmaps."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{KINDS[kind][1]}"


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """The job's state (its newest true condition) and that condition's message."""
    conditions = [c for c in job.get("status", {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return "Pending", ""
    last = conditions[-1]
    return last["type"], last.get("message", "")


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """What status and list show of a raw PyTorchJob."""
    spec, status = job.get("spec", {}), job.get("status", {})
    state, message = job_state(job)
    elastic = spec.get("elasticPolicy")
    replicas = {kind: r.get("replicas", 1) for kind, r in (spec.get("pytorchReplicaSpecs") or {}).items()}
    return {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace", ""),
        "state": state,
        "message": message,
        "mode": f"elastic {elastic.get('minReplicas')}:{elastic.get('maxReplicas')}" if elastic else "static",
        "replicas": replicas,
        "nprocPerNode": spec.get("nprocPerNode", ""),
        "replicaStatuses": status.get("replicaStatuses", {}),
        "created": job["metadata"].get("creationTimestamp", ""),
        "completed": status.get("completionTime", ""),
    }


def first_pod(job: dict[str, Any]) -> tuple[str, int]:
    """Rank 0's pod: master-0 of a static job, worker-0 of an elastic one."""
    return ("master", 0) if "Master" in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}) else ("worker", 0)


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

    client: Any  # kubeflow.training.TrainingClient
    namespace: str
    server: str
    source: str

    @property
    def api(self):
        return self.client.custom_api.api_client

    # -- runs -------------------------------------------------------------------------

    def create_run(self, objects: list[dict[str, Any]], *, dry_run: bool = False) -> list[str]:
        """Create a rendered run's objects; refuses a taken name, rolls back a partial run.

        Returns ``kind/name`` of every object created (or that would be, with dry_run:
        the API server validates them, webhooks included, and stores nothing).
        """
        job = next(o for o in objects if o["kind"] == "PyTorchJob")
        name = job["metadata"]["name"]
        if self.get_job(name, missing_ok=True) is not None:
            raise ClusterError(
                f"PyTorchJob {name} already exists in namespace {self.namespace}: "
                f"choose another --name, or remove it with mfrctl delete {name} -n {self.namespace}"
            )
        from kubernetes.client.rest import ApiException

        query = [("fieldManager", FIELD_MANAGER)] + ([("dryRun", "All")] if dry_run else [])
        created: list[dict[str, Any]] = []
        try:
            for obj in objects:
                path = collection_path(obj["apiVersion"], obj["kind"], self.namespace)
                try:
                    with self._errors(f"create {obj['kind']} {obj['metadata']['name']}", conflict=name,
                                      passthrough_404=True):
                        self._request("POST", path, body=obj, query=query)
                except ApiException:  # the kind's API is not served by this cluster
                    raise self._missing_api(obj["kind"]) from None
                created.append(obj)
        except ClusterError as err:
            if created and not dry_run:
                self._rollback(created)
                raise ClusterError(f"{err} (removed what was created: {', '.join(_ref(o) for o in created)})") from None
            raise
        return [_ref(o) for o in created]

    def get_job(self, name: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        path = f"{collection_path(f'{GROUP}/{VERSION}', 'PyTorchJob', self.namespace)}/{name}"
        try:
            with self._errors(f"get PyTorchJob {name}", passthrough_404=True):
                return self._request("GET", path)
        except ApiException as err:  # only 404 passes through
            if not _is_status(err, "NotFound", kind=JOB_PLURAL):
                raise self._no_operator() from None
            if missing_ok:
                return None
            raise ClusterError(
                f"no PyTorchJob {name} in namespace {self.namespace} (mfrctl list -n {self.namespace} shows the runs)"
            ) from None

    def list_jobs(self, *, all_namespaces: bool = False) -> list[dict[str, Any]]:
        path = collection_path(f"{GROUP}/{VERSION}", "PyTorchJob", None if all_namespaces else self.namespace)
        with self._errors("list PyTorchJobs", missing_api=True):
            return self._request("GET", path, query=[("labelSelector", CHART_SELECTOR)])["items"]

    def pods(self, name: str) -> list[Any]:
        """The job's pods (kubernetes V1Pod objects), found by the operator's labels."""
        with self._errors(f"list the pods of {name}"):
            return self.client.get_job_pods(name, namespace=self.namespace, timeout=REQUEST_TIMEOUT[1])

    def logs(self, name: str, *, replica: str | None, index: int | None, follow: bool) -> dict[str, str]:
        """Logs of the chosen pods (default: rank 0's pod); with follow they are printed as they come."""
        if replica is None:
            replica, index = first_pod(self.get_job(name))
        with self._errors(f"read the logs of {name}"):
            logs, _ = self.client.get_job_logs(
                name, namespace=self.namespace, is_master=False, replica_type=replica,
                replica_index=index, follow=follow, timeout=REQUEST_TIMEOUT[1],
            )
        return logs

    def delete_run(self, name: str) -> list[str]:
        """Delete the job (the operator's pods and Services go with it) and every labelled object of the run."""
        from kubernetes.client.rest import ApiException

        deleted = []
        try:
            with self._errors(f"delete PyTorchJob {name}", passthrough_404=True):
                self.client.delete_job(name, namespace=self.namespace)
            deleted.append(f"pytorchjob/{name}")
        except ApiException as err:
            if not _is_status(err, "NotFound", kind=JOB_PLURAL):
                raise self._no_operator() from None
        for kind, (api_version, plural) in KINDS.items():
            if kind == "PyTorchJob":
                continue
            path = collection_path(api_version, kind, self.namespace)
            try:
                with self._errors(f"delete the {plural} of {name}", passthrough_404=api_version == MONITORING):
                    gone = self._request("DELETE", path, query=[("labelSelector", run_selector(name))])
            except ApiException:  # no prometheus-operator here, so none of its objects either
                continue
            deleted += [f"{kind.lower()}/{item['metadata']['name']}" for item in gone.get("items") or []]
        if not deleted:
            raise ClusterError(f"no run {name} in namespace {self.namespace} (mfrctl list -n {self.namespace} shows the runs)")
        return deleted

    def wait(self, name: str, on_change: Callable[[str, str], None], poll: float = POLL_SECONDS) -> str:
        """Poll the job until it succeeds or fails; returns the final state."""
        previous = None
        while True:
            state, message = job_state(self.get_job(name))
            if state != previous:
                on_change(state, message)
                previous = state
            if state in FINAL_STATES:
                return state
            time.sleep(poll)

    def wait_for_start(self, name: str, poll: float = POLL_SECONDS) -> None:
        """Wait until rank 0's pod has started (or the job is over), so its logs can be followed."""
        while (job := self.get_job(name)) and job_state(job)[0] not in FINAL_STATES:
            replica, index = first_pod(job)
            pods = [p for p in self.pods(name) if replica_of(p) == (replica, index)]
            if any(p.status is not None and p.status.phase not in (None, "Pending") for p in pods):
                return
            time.sleep(poll)

    # -- plumbing -----------------------------------------------------------------------

    def _request(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None) -> Any:
        return self.api.call_api(
            path, method, query_params=query or [], body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            auth_settings=["BearerToken"], response_type="object", _return_http_data_only=True,
            _request_timeout=REQUEST_TIMEOUT,
        )

    def _rollback(self, objects: list[dict[str, Any]]) -> None:
        for obj in reversed(objects):
            path = f"{collection_path(obj['apiVersion'], obj['kind'], self.namespace)}/{obj['metadata']['name']}"
            try:
                self._request("DELETE", path)
            except Exception:  # best effort: the error being reported matters more
                pass

    def _missing_api(self, kind: str) -> ClusterError:
        if kind == "PyTorchJob":
            return self._no_operator()
        if KINDS[kind][0] == MONITORING:
            return ClusterError(
                f"the cluster at {self.server} serves no {MONITORING} {kind} API: install the prometheus-operator "
                "(e.g. kube-prometheus-stack), or leave the chart's monitoring.podMonitor/prometheusRule disabled"
            )
        return ClusterError(f"the cluster at {self.server} serves no {KINDS[kind][0]} {kind} API")

    def _no_operator(self) -> ClusterError:
        return ClusterError(
            f"the cluster at {self.server} serves no {GROUP}/{VERSION} PyTorchJob API: install the Kubeflow "
            "training operator v1.9 (see manifests/README.md)"
        )

    @contextmanager
    def _errors(
        self, action: str, *, conflict: str | None = None, passthrough_404: bool = False, missing_api: bool = False
    ) -> Iterator[None]:
        """Turn client and SDK exceptions into one ClusterError line."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except (ApiException, HTTPError, RuntimeError, TimeoutError) as raised:
            err = _root_cause(raised)
            if isinstance(err, ApiException):
                if err.status == 404 and passthrough_404:
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
    from kubeflow.training import TrainingClient
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
    training = TrainingClient(client_configuration=configuration, namespace=namespace)
    return Cluster(client=training, namespace=namespace, server=configuration.host, source=source)


def replica_of(pod: Any) -> tuple[str, int]:
    """A pod's (replica type, index), from the operator's labels."""
    labels = pod.metadata.labels or {}
    return labels.get(REPLICA_TYPE_LABEL, ""), int(labels.get(REPLICA_INDEX_LABEL, -1))


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}/{obj['metadata']['name']}"


def _root_cause(err: BaseException) -> BaseException:
    """The SDK wraps client errors in RuntimeError: find the ApiException or urllib3 error inside."""
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
