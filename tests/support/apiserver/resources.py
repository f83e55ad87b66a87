"""The kinds the stand-in serves, and API discovery (/api, /apis, /apis/<group>/<version>) listing exactly those.

Built-in kinds are served always; a custom resource only while its CRD is installed, as on a
cluster: the Kubeflow training operator's PyTorchJob (kubeflow.org/v1) and Trainer v2's kinds
(trainer.kubeflow.org/v1alpha1) from the CRDs vendored in ../shared/crds, prometheus-operator's
PodMonitor and PrometheusRule and Kueue's kinds from schemas that only know their top-level fields
(no CRD of theirs is vendored: their spec is kept as sent, unvalidated), and any CRD a test installs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tests.support.apiserver.schema import Schema, builtin_schema
from tests.support.operator_rules import CRDS

TRAINER_V2_CRDS = [
    CRDS / "trainer-v2.3.0" / f"trainer.kubeflow.org_{plural}.yaml"
    for plural in ("trainjobs", "trainingruntimes", "clustertrainingruntimes")
]
TORCH_RUNTIME = CRDS / "trainer-v2.3.0" / "torch_distributed_runtime.yaml"
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(eq=False)
class Resource:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    status: bool = False  # has a status subresource
    generation: bool = False  # metadata.generation is maintained (kinds with a spec the controllers act on)
    crd: dict[str, Any] | None = None  # the CustomResourceDefinition of a custom resource

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The resource as kube-apiserver names it in messages: pods, pytorchjobs.kubeflow.org."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """The kind as Invalid errors name it: Pod, Deployment.apps, PyTorchJob.kubeflow.org."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else "/api/v1"

    def collection(self, namespace: str | None) -> str:
        scope = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        return f"{self.prefix}{scope}/{self.plural}"

    @cached_property
    def schema(self) -> Schema:
        if self.crd is None:
            return builtin_schema(self.group, self.version, self.kind)
        (version,) = [v for v in self.crd["spec"]["versions"] if v["name"] == self.version]
        return Schema(version["schema"]["openAPIV3Schema"], structural=True)


def _builtin(group: str, version: str, kind: str, plural: str, namespaced: bool = True, **flags: bool) -> Resource:
    return Resource(group, version, kind, plural, namespaced, **flags)


BUILTINS = [
    _builtin("", "v1", "Pod", "pods", status=True),
    _builtin("", "v1", "ConfigMap", "configmaps"),
    _builtin("", "v1", "Secret", "secrets"),
    _builtin("", "v1", "Service", "services", status=True),
    _builtin("", "v1", "ServiceAccount", "serviceaccounts"),
    _builtin("", "v1", "Event", "events"),
    _builtin("", "v1", "Endpoints", "endpoints"),
    _builtin("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", status=True),
    _builtin("", "v1", "LimitRange", "limitranges"),
    _builtin("", "v1", "ResourceQuota", "resourcequotas", status=True),
    _builtin("", "v1", "Namespace", "namespaces", namespaced=False, status=True),
    _builtin("", "v1", "Node", "nodes", namespaced=False, status=True),
    _builtin("", "v1", "PersistentVolume", "persistentvolumes", namespaced=False, status=True),
    *(
        _builtin("apps", "v1", kind, f"{kind.lower()}s", status=True, generation=True)
        for kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
    ),
    _builtin("batch", "v1", "Job", "jobs", status=True, generation=True),
    _builtin("batch", "v1", "CronJob", "cronjobs", status=True, generation=True),
    _builtin("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", generation=True),
    _builtin("networking.k8s.io", "v1", "Ingress", "ingresses", status=True, generation=True),
    _builtin("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", status=True, generation=True),
    _builtin("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    _builtin("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    _builtin("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", namespaced=False),
    _builtin("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False),
    _builtin("scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", namespaced=False),
    _builtin("storage.k8s.io", "v1", "StorageClass", "storageclasses", namespaced=False),
]
# Served by the stand-in itself rather than stored: the installed CRDs (read-only) and access reviews.
CRD_RESOURCE = _builtin(
    "apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False, status=True
)
ACCESS_REVIEW = _builtin(
    "authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", namespaced=False
)


def crd_resource(crd: dict[str, Any]) -> Resource:
    """The resource a CRD serves (its storage version)."""
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage", True))
    return Resource(
        spec["group"],
        version["name"],
        spec["names"]["kind"],
        spec["names"]["plural"],
        spec["scope"] == "Namespaced",
        status="status" in (version.get("subresources") or {}),
        generation=True,
        crd=crd,
    )


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # libyaml: the Trainer's CRDs are 7,000 lines


def loose_crd(group: str, version: str, kind: str, plural: str, namespaced: bool = True) -> dict[str, Any]:
    """A CRD whose schema knows only the top-level fields: its spec and status are kept as sent."""
    free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": free,
            "status": free,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "scope": "Namespaced" if namespaced else "Cluster",
            "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }


MONITORING_CRDS = [
    loose_crd("monitoring.coreos.com", "v1", "PodMonitor", "podmonitors"),
    loose_crd("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules"),
]
KUEUE_CRDS = [
    loose_crd("kueue.x-k8s.io", "v1beta1", "LocalQueue", "localqueues"),
    loose_crd("kueue.x-k8s.io", "v1beta1", "Workload", "workloads"),
    loose_crd("kueue.x-k8s.io", "v1beta1", "ClusterQueue", "clusterqueues", namespaced=False),
    loose_crd("kueue.x-k8s.io", "v1beta1", "ResourceFlavor", "resourceflavors", namespaced=False),
]


# -- discovery ----------------------------------------------------------------------------


def api_versions(server: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    }


def api_group(group: str, resources: list[Resource]) -> dict[str, Any]:
    versions = sorted({r.version for r in resources if r.group == group})
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(resources: list[Resource]) -> dict[str, Any]:
    groups = sorted({r.group for r in resources if r.group})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(g, resources) for g in groups]}


def api_resource_list(group_version: str, resources: list[Resource]) -> dict[str, Any]:
    entries = []
    for r in (r for r in resources if r.group_version == group_version):
        verbs = ["create"] if r is ACCESS_REVIEW else ["get", "list", "watch"] if r is CRD_RESOURCE else VERBS
        entries.append(
            {
                "name": r.plural,
                "singularName": r.kind.lower(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": verbs,
            }
        )
        if r.status:
            entries.append(
                {
                    "name": f"{r.plural}/status",
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        if r.plural == "pods":
            entries.append(
                {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]}
            )
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": entries}
