"""Regenerate what is derived from the code: ``python -m charts.generate`` from the checkout's root.

* the ``train:`` part of charts/mfr-trainer/values.schema.json, from the
  TrainConfig model, so Helm validates training settings exactly as the
  trainer does (its cross-field rules are checked by mfrctl and the trainer);
* charts/mfr-trainer/dashboards/mfr-training.json, the Grafana dashboard
  built by charts/generate/dashboard.py (needs the test extra's grafana-foundation-sdk);
* manifests/*.yaml, each the output of the ``mfrctl render`` command written
  in its header, for kubectl/kustomize users.

Tests fail when either is stale.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from mfr.ctl.chart import chart_dir
from mfr.trainer.config import TrainConfig

# Every manifest names real checkpoint storage: an S3 URI to replace, and the Secret the pods
# read the S3 credentials from (made with the command in the manifest's header).
BUCKET = "my-bucket"
SECRET = "mfr-s3"
SECRET_COMMAND = (
    f"kubectl create secret generic {SECRET} --from-literal=AWS_ACCESS_KEY_ID=<key id> "
    "--from-literal=AWS_SECRET_ACCESS_KEY=<secret key> [--from-literal=AWS_ENDPOINT_URL=<url of a non-AWS S3>]"
)


def _on_s3(name: str) -> list[str]:
    return ["--checkpoint", f"s3://{BUCKET}/{name}/checkpoints", "--set", f"s3.existingSecret={SECRET}"]


# manifests/<file>: the mfrctl render arguments that produce it.
MANIFESTS: dict[str, list[str]] = {
    "static-8x8gpu.yaml": ["--name", "mfr", "--nodes", "8", "--gpus-per-node", "8", *_on_s3("mfr")],
    "elastic-4to8x8gpu.yaml": [
        "--name",
        "mfr-elastic",
        "--elastic",
        "4:8",
        "--gpus-per-node",
        "8",
        *_on_s3("mfr-elastic"),
    ],
    "demo-cpu-2nodes.yaml": ["--name", "mfr-demo", "--nodes", "2", *_on_s3("mfr-demo")],
    "trainjob-2x8gpu.yaml": [
        "--name",
        "mfr-tj",
        "--api",
        "trainjob",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        *_on_s3("mfr-tj"),
    ],
}


# Chart values that hold Kubernetes objects, and the type each holds (a list of them when True).  Helm (and so
# mfrctl) checks them against Kubernetes' own OpenAPI schema, the strict copy kubernetes-validate ships: a
# misspelled field (resources.limit, tolerations[].efect, env[].valu) fails the render instead of being pruned.
K8S_VERSION = "1.29.0"
K8S_VALUES: dict[str, tuple[str, bool]] = {
    "env": ("io.k8s.api.core.v1.EnvVar", True),
    "resources": ("io.k8s.api.core.v1.ResourceRequirements", False),
    "tolerations": ("io.k8s.api.core.v1.Toleration", True),
    "affinity": ("io.k8s.api.core.v1.Affinity", False),
    "topologySpreadConstraints": ("io.k8s.api.core.v1.TopologySpreadConstraint", True),
    "podSecurityContext": ("io.k8s.api.core.v1.PodSecurityContext", False),
    "securityContext": ("io.k8s.api.core.v1.SecurityContext", False),
    "extraVolumes": ("io.k8s.api.core.v1.Volume", True),
    "extraVolumeMounts": ("io.k8s.api.core.v1.VolumeMount", True),
    "trialStore.resources": ("io.k8s.api.core.v1.ResourceRequirements", False),
    "networkPolicy.metricsPodSelector": ("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector", False),
    "networkPolicy.extraIngress": ("io.k8s.api.networking.v1.NetworkPolicyIngressRule", True),
}


def kubernetes_definitions(roots: list[str]) -> dict[str, Any]:
    """The Kubernetes schema definitions ``roots`` need, transitively, without their descriptions."""
    from importlib import resources

    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    every = json.loads((path / "_definitions.json").read_text())["$defs"]

    def bare(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: bare(v) for k, v in node.items() if k != "description"}
        return [bare(v) for v in node] if isinstance(node, list) else node

    found: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in found:
            found[name] = bare(every[name])
            todo += re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(found[name]))
    return dict(sorted(found.items()))


def values_schema(current: dict[str, Any]) -> dict[str, Any]:
    """The chart's values schema with ``$defs`` regenerated: TrainConfig, and the Kubernetes types of K8S_VALUES."""
    train = TrainConfig.model_json_schema()
    defs = train.pop("$defs")
    schema = json.loads(json.dumps(current))
    for dotted, (kind, many) in K8S_VALUES.items():
        *parents, leaf = dotted.split(".")
        node = schema
        for part in parents:
            node = node["properties"][part]
        ref = {"$ref": f"#/$defs/{kind}"}
        node["properties"][leaf] = {"type": "array", "items": ref} if many else ref
    kinds = kubernetes_definitions(sorted({kind for kind, _ in K8S_VALUES.values()}))
    return {**schema, "$defs": {**defs, "TrainConfig": train, **kinds}}


def schema_path() -> Path:
    return chart_dir() / "values.schema.json"


def manifest_text(args: list[str]) -> str:
    """What ``mfrctl render ARGS`` prints, with a header saying how to regenerate it and what to replace."""
    proc = subprocess.run(
        [sys.executable, "-m", "mfr.ctl.main", "render", *args], capture_output=True, text=True, check=True
    )
    uri = args[args.index("--checkpoint") + 1]
    header = (
        f"# Rendered from charts/mfr-trainer by: mfrctl render {' '.join(args)}\n"
        "# Do not edit: regenerate every manifest with `python -m charts.generate`.\n"
        f"# Checkpoints go to {uri}: replace {BUCKET} with your bucket.  The pods read the S3\n"
        f"# credentials from Secret {SECRET} (each key a variable); make it in the namespace first:\n"
        f"#   {SECRET_COMMAND}\n"
    )
    return header + proc.stdout


def manifests_dir() -> Path:
    """manifests/ of the checkout (not part of an installed package)."""
    return chart_dir().parent.parent / "manifests"


def dashboard_path() -> Path:
    from .dashboard import FILE_NAME

    return chart_dir() / "dashboards" / FILE_NAME


def main() -> None:
    from .dashboard import dashboard_json

    path = schema_path()
    path.write_text(json.dumps(values_schema(json.loads(path.read_text())), indent=2) + "\n")
    print(f"wrote {path}")
    dashboard = dashboard_path()
    dashboard.parent.mkdir(exist_ok=True)
    dashboard.write_text(dashboard_json())
    print(f"wrote {dashboard}")
    for name, args in MANIFESTS.items():
        target = manifests_dir() / name
        target.write_text(manifest_text(args))
        print(f"wrote {target}")
