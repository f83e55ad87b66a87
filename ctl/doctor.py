"""``mfrctl doctor``: will a run start on this cluster?  Each check a row, each failure with its fix.

Multi-node training fails most often before its first step: a missing CRD, no
GPU nodes free, a bucket the pods cannot reach, a namespace whose Pod Security
level rejects the operator's pods.  The checks read the cluster (discovery,
nodes, the namespace, the run's Secret) and, for the checkpoint URI, write and
read back a probe object with the run's credentials.  ``submit`` runs the cheap
ones (``preflight``) before it creates anything.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from mfr.trainer.credentials import redact

from .kube import PYTORCHJOB, TRAINER_API, Cluster, ClusterError, job_api

OK, WARN, FAIL = "ok", "warn", "fail"
# API group versions a run may rely on: (what, api version, what it is for).
APIS = [
    ("PyTorchJob API", PYTORCHJOB.api_version, "the Kubeflow training operator v1.9: elastic runs, and static ones"),
    ("TrainJob API", TRAINER_API, "Kubeflow Trainer v2: static runs as TrainJobs (--api trainjob)"),
    ("Kueue", "kueue.x-k8s.io/v1beta1", "queues (--queue)"),
    ("prometheus-operator", "monitoring.coreos.com/v1", "PodMonitor and alerts (--monitoring)"),
    ("Volcano", "scheduling.volcano.sh/v1beta1", "gang scheduling (gang.enabled)"),
    ("scheduler-plugins", "scheduling.x-k8s.io/v1alpha1", "gang scheduling (gang.enabled)"),
]
GPU = "nvidia.com/gpu"
POD_SECURITY = "pod-security.kubernetes.io/enforce"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def preflight(cluster: Cluster, job: dict[str, Any], *, queue: bool) -> list[Check]:
    """What submit checks before it creates anything: the namespace, the job's API, Kueue when asked for."""
    checks = [namespace_check(cluster)]
    if checks[0].status == FAIL:
        return checks
    api = job_api(job["kind"])
    served = cluster.serves(api.api_version)
    checks.append(
        Check(
            f"{api.kind} API",
            OK if served else FAIL,
            f"{api.api_version} {'served' if served else 'not served'}",
            "" if served else f"install {api.install}",
        )
    )
    if queue:
        checks += [
            c if c.status == OK else Check(c.name, FAIL, c.detail, "install Kueue, or drop --queue")
            for c in api_checks(cluster, ["Kueue"])
        ]
    return checks


def namespace_check(cluster: Cluster) -> Check:
    try:
        namespace = cluster.namespace_object()
    except ClusterError as err:  # forbidden: namespaces are cluster-scoped, many users may not read them
        return Check(
            "namespace",
            WARN,
            f"{cluster.namespace}: cannot read it ({err})",
            "the mfrctl-doctor ClusterRole of manifests/rbac/mfrctl.yaml lets mfrctl look",
        )
    if namespace is None:
        return Check(
            "namespace",
            FAIL,
            f'namespace "{cluster.namespace}" not found',
            f"kubectl create namespace {cluster.namespace}",
        )
    return Check("namespace", OK, cluster.namespace)


def api_checks(cluster: Cluster, names: list[str] | None = None) -> list[Check]:
    """Which of APIS the cluster serves (``names``: only these)."""
    checks = []
    served = {api: cluster.serves(api) for name, api, _ in APIS if names is None or name in names}
    jobs = served.get(PYTORCHJOB.api_version, False) or served.get(TRAINER_API, False)
    for name, api, purpose in APIS:
        if api not in served:
            continue
        required = name == "PyTorchJob API" and not jobs  # one of the two job APIs must be there
        status = OK if served[api] else (FAIL if required else WARN)
        fix = (
            ""
            if served[api]
            else (
                "install the Kubeflow training operator v1.9 (manifests/README.md)"
                if required
                else f"only needed for {purpose}"
            )
        )
        checks.append(Check(name, status, f"{api} {'served' if served[api] else 'not served'}", fix))
    return checks


def gpu_check(cluster: Cluster, nodes: int, gpus_per_node: int) -> Check:
    """Are there ``nodes`` nodes with ``gpus_per_node`` allocatable GPUs each?"""
    try:
        items = cluster.nodes()
    except ClusterError as err:
        return Check("GPU nodes", WARN, f"cannot list nodes: {err}", "ask for list on nodes, or check by hand")
    fitting = [n["metadata"]["name"] for n in items if _gpus(n) >= gpus_per_node and not _unschedulable(n)]
    total = sum(_gpus(n) for n in items)
    detail = f"{len(fitting)} of {len(items)} nodes have {gpus_per_node} allocatable GPUs ({total} GPUs in all)"
    if len(fitting) >= nodes:
        return Check("GPU nodes", OK, detail)
    return Check(
        "GPU nodes",
        FAIL,
        detail + f"; the run needs {nodes}",
        "fewer --nodes or --gpus-per-node, or wait for capacity (allocatable, not free, is counted here)",
    )


def pod_security_check(cluster: Cluster, rendered: list[dict[str, Any]]) -> Check:
    """The namespace's enforced Pod Security level against what the run's pods need."""
    try:
        labels = ((cluster.namespace_object() or {}).get("metadata") or {}).get("labels") or {}
    except ClusterError as err:
        return Check(
            "pod security",
            WARN,
            f"cannot read namespace {cluster.namespace} ({err})",
            "the mfrctl-doctor ClusterRole of manifests/rbac/mfrctl.yaml lets mfrctl look",
        )
    level = labels.get(POD_SECURITY, "privileged")
    job = next((o for o in rendered if o["kind"] == "PyTorchJob"), None)
    pod = (next(iter(job["spec"]["pytorchReplicaSpecs"].values()))["template"]["spec"]) if job else {}  # the same
    # pod template as a TrainJob's runtime holds
    privileged = pod.get("hostNetwork") or any(
        "IPC_LOCK" in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add", [])
        for c in pod.get("containers", [])
    )
    static = (
        job is not None
        and "Master" in job["spec"]["pytorchReplicaSpecs"]
        and "Worker" in job["spec"]["pytorchReplicaSpecs"]
    )
    if level == "privileged":
        return Check("pod security", OK, f"namespace enforces {level}")
    if privileged:
        return Check(
            "pod security",
            FAIL,
            f"namespace enforces {level}; the pods ask for hostNetwork or IPC_LOCK",
            "leave nccl.hostNetwork/ipcLock off, or run in a namespace that allows them",
        )
    if level == "restricted" and static:
        return Check(
            "pod security",
            WARN,
            "namespace enforces restricted; the operator adds init-pytorch to static Worker pods",
            "install the operator from manifests/operator (a restricted init-pytorch), or run --elastic N:N",
        )
    return Check("pod security", OK, f"namespace enforces {level}; the pods meet it")


def storage_check(cluster: Cluster, uri: str, secret: str | None) -> Check:
    """Write, read back and delete a probe object under ``uri`` with the credentials of ``secret``."""
    try:
        import fsspec
    except ImportError:
        return Check("checkpoint storage", WARN, f"{uri}: not probed", "pip install 'mfr[train]' for the probe")
    options: dict[str, Any] = {}
    if secret is not None:
        data = cluster.secret_data(secret)
        if data is None:
            return Check(
                "checkpoint storage",
                FAIL,
                f'secret "{secret}" not found in {cluster.namespace}',
                f"kubectl create secret generic {secret} --from-literal=AWS_ACCESS_KEY_ID=... "
                "--from-literal=AWS_SECRET_ACCESS_KEY=...",
            )
        keys = {k: base64.b64decode(v).decode() for k, v in data.items()}
        options = {
            k: v
            for k, v in {
                "key": keys.get("AWS_ACCESS_KEY_ID"),
                "secret": keys.get("AWS_SECRET_ACCESS_KEY"),
                "token": keys.get("AWS_SESSION_TOKEN"),
                "endpoint_url": keys.get("AWS_ENDPOINT_URL"),
            }.items()
            if v
        }
    probe = f"{uri.rstrip('/')}/.mfr-doctor-{uuid.uuid4().hex}"
    try:
        fs, path = fsspec.core.url_to_fs(probe, **options) if "://" in uri else (None, probe)
        if fs is None:
            return Check("checkpoint storage", WARN, f"{uri} is a path: only the pods can check it (a shared claim?)")
        fs.pipe_file(path, b"mfr doctor\n")
        ok = fs.cat_file(path) == b"mfr doctor\n"
        fs.rm_file(path)
    except Exception as err:  # every fsspec backend raises its own: one line, no credentials
        reason = redact(str(err).splitlines()[0]) if str(err) else type(err).__name__
        return Check(
            "checkpoint storage",
            FAIL,
            f"{uri}: {reason}",
            "check the bucket, the endpoint (AWS_ENDPOINT_URL) and the Secret's keys",
        )
    return Check("checkpoint storage", OK if ok else FAIL, f"{uri}: wrote, read back and removed a probe object")


def report(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]


def _gpus(node: dict[str, Any]) -> int:
    return int(((node.get("status") or {}).get("allocatable") or {}).get(GPU, 0))


def _unschedulable(node: dict[str, Any]) -> bool:
    return bool((node.get("spec") or {}).get("unschedulable"))
