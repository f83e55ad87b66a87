"""Render charts/mfr-trainer with the real Helm engine: the one source of a run's objects.

``mfrctl render``, ``mfrctl submit``, ``helm install`` and ``manifests/`` all
come from the same chart through the same engine (helm-python-sdk, no helm
binary, no cluster), so they cannot drift apart.  Everything a user can get
wrong is found here, before anything is sent anywhere, and reported as one
line (ChartError, exit code 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mfr.trainer.config import ConfigError, TrainConfig, load_config, merge, parse_overrides, read_yaml, validate_config

CHART = "mfr-trainer"
# Helm's install order for the kinds the chart renders; the job goes last so
# that what its pods mount already exists.
KIND_ORDER = (
    "NetworkPolicy",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "Service",
    "Deployment",
    "PodMonitor",
    "PrometheusRule",
    "TrainingRuntime",
    "ClusterTrainingRuntime",
    "PyTorchJob",
    "TrainJob",
)
JOB_KINDS = ("PyTorchJob", "TrainJob")
# The operator names pods and Services <job>-<type>-<index>, which must stay a
# DNS-1035 label (<= 63 characters): room for "-worker-NNNN" is kept.
MAX_NAME = 50
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Docker's reference grammar: [host[:port]/]path[:tag][@digest].
_IMAGE = re.compile(
    r"^(?P<repository>(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable literal blocks."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


class ChartError(ValueError):
    """Bad input found before anything is sent: one line, exit code 2."""


def chart_dir() -> Path:
    """The chart shipped inside the package (charts/ in a checkout)."""
    return Path(str(resources.files("mfr.charts") / CHART))


@dataclass(frozen=True)
class Rendered:
    """A rendered run: its objects in install order, and the chart's NOTES."""

    objects: list[dict[str, Any]]
    sources: list[str]
    notes: str

    @property
    def job(self) -> dict[str, Any]:
        """The PyTorchJob or TrainJob."""
        return next(o for o in self.objects if o["kind"] in JOB_KINDS)

    def to_yaml(self) -> str:
        docs = [
            f"---\n# Source: {source}\n" + yaml.dump(obj, Dumper=_Dumper, sort_keys=False)
            for obj, source in zip(self.objects, self.sources)
        ]
        return "".join(docs)

    def to_list(self) -> dict[str, Any]:
        """A kubectl-style v1 List, for -o json."""
        return {"apiVersion": "v1", "kind": "List", "items": self.objects}


def check_name(name: str) -> None:
    if len(name) > MAX_NAME or not _DNS1035.match(name):
        raise ChartError(
            f"--name {name!r}: must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
            f"letter) of at most {MAX_NAME} characters: pods and Services are named <name>-worker-<index>"
        )


def check_namespace(namespace: str) -> None:
    if len(namespace) > 63 or not _DNS1123.match(namespace):
        raise ChartError(
            f"--namespace {namespace!r}: must be a DNS-1123 label (lowercase letters, digits and '-', "
            "at most 63 characters)"
        )


def parse_elastic(value: str, nodes: int | None = None) -> tuple[int, int]:
    """``--elastic MIN:MAX`` (``mfrctl train``, ``render``, ``submit``) as ``(MIN, MAX)``, with ``--nodes`` inside.

    The chart states the same rule for ``elastic.minNodes``/``maxNodes`` and ``nodes`` (values.schema.json
    and templates/pytorchjob.yaml), for helm install users; tests/test_chart.py holds the two to it.
    """
    text_low, sep, text_high = value.partition(":")
    if not (sep and text_low.isdigit() and text_high.isdigit()) or not 1 <= int(text_low) <= int(text_high):
        raise ChartError(f"--elastic {value!r}: expected MIN:MAX with 1 <= MIN <= MAX, e.g. 4:8")
    low, high = int(text_low), int(text_high)
    if nodes is not None and not low <= nodes <= high:
        raise ChartError(f"--nodes {nodes} is outside --elastic {value}")
    return low, high


def image_values(ref: str) -> dict[str, str]:
    """``registry/repo[:tag][@digest]`` as the chart's image values."""
    match = _IMAGE.match(ref)
    if match is None:
        raise ChartError(f"--image {ref!r}: expected an image reference like registry.example.com/mfr-trainer:0.1.0")
    return {"repository": match["repository"], "tag": match["tag"] or "", "digest": match["digest"] or ""}


def flag_values(
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    nproc_per_node: int | None = None,
    elastic: str | None = None,
    image: str | None = None,
    config: Path | None = None,
    checkpoint: str | None = None,
    workspace_claim: str | None = None,
    queue: str | None = None,
    monitoring: bool | None = None,
    api: str | None = None,
) -> dict[str, Any]:
    """The chart values mfrctl's flags stand for (None = leave the chart's value)."""
    values: dict[str, Any] = {}
    if nodes is not None:
        if nodes < 1:
            raise ChartError(f"--nodes {nodes}: a job needs at least 1 node")
        values["nodes"] = nodes
    if gpus_per_node is not None:
        if gpus_per_node < 0:
            raise ChartError(f"--gpus-per-node {gpus_per_node}: must be >= 0 (0 trains on CPU)")
        values["gpusPerNode"] = gpus_per_node
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise ChartError(f"--nproc-per-node {nproc_per_node}: must be >= 1")
        values["nprocPerNode"] = nproc_per_node
    if elastic is not None:
        low, high = parse_elastic(elastic, nodes)
        values["elastic"] = {"enabled": True, "minNodes": low, "maxNodes": high}
        values.setdefault("nodes", high)
    if image is not None:
        values["image"] = image_values(image)
    if config is not None:
        try:
            values["train"] = load_config(config).model_dump(mode="json")
        except ConfigError as err:
            raise ChartError(f"config: {err}") from None
    if checkpoint is not None:
        values.setdefault("train", {}).setdefault("checkpoint", {})["uri"] = checkpoint
    if workspace_claim is not None:
        if not _DNS1123_SUBDOMAIN.match(workspace_claim) or len(workspace_claim) > 253:
            raise ChartError(
                f"--workspace-claim {workspace_claim!r}: not a PersistentVolumeClaim name "
                "(lowercase letters, digits, '-' and '.')"
            )
        values["workspace"] = {"existingClaim": workspace_claim}
    if queue is not None:
        if len(queue) > 63 or not _DNS1123.match(queue):
            raise ChartError(f"--queue {queue!r}: not a Kueue LocalQueue name (a DNS-1123 label)")
        values["queue"] = queue
    if monitoring is not None:
        values["monitoring"] = {"podMonitor": {"enabled": monitoring}, "prometheusRule": {"enabled": monitoring}}
    if api is not None:
        values["api"] = api
    return values


def file_values(path: Path) -> dict[str, Any]:
    """A ``-f values.yaml`` file."""
    try:
        return read_yaml(path, what="-f values file")
    except ConfigError as err:
        raise ChartError(str(err)) from None


def set_values(expression: str) -> dict[str, Any]:
    """A ``--set a.b=c`` expression; the value is YAML, as in ``mfrctl train --set``.

    (Helm's own --set keeps 0.1 a string, which the schema then rejects.)
    """
    try:
        return parse_overrides([expression])
    except ConfigError as err:
        raise ChartError(str(err)) from None


def render(values: dict[str, Any], *, name: str, namespace: str) -> Rendered:
    """Render the chart, after checking everything that can be checked without a cluster."""
    import helm_python

    check_name(name)
    check_namespace(namespace)
    with helm_python.Chart.load(chart_dir()) as chart:
        manifests = _render_chart(chart, values, name, namespace)
        merged = chart.merge_values(values)
        try:
            train = validate_config(merged["train"])
        except ConfigError as err:
            raise ChartError(f"config: {err}") from None
        # The chart's requests are the demo's: size them for this run; the ones the user set win.
        wanted = requests_for(train, merged) | ((values.get("resources") or {}).get("requests") or {})
        if wanted != merged["resources"].get("requests"):
            values = merge(values, {"resources": {"requests": wanted}})
            manifests = _render_chart(chart, values, name, namespace)
    return _collect(manifests)


def requests_for(train: TrainConfig, values: dict[str, Any]) -> dict[str, str]:
    """The pods' CPU and memory requests for a run of ``train`` with chart ``values`` (ctl/resources.py)."""
    from .resources import pod_requests

    gpus = int(values["gpusPerNode"])
    nproc = int(values["nprocPerNode"]) or max(gpus, 1)
    nodes = int(values["elastic"]["maxNodes"] if values["elastic"]["enabled"] else values["nodes"])
    return pod_requests(train, nodes=nodes, nproc=nproc, gpus=gpus, shm=str(values["shm"].get("sizeLimit") or ""))


def _render_chart(chart, values: dict[str, Any], name: str, namespace: str) -> dict[str, str]:
    import helm_python

    try:
        return chart.render(values, name=name, namespace=namespace, is_install=True)
    except helm_python.HelmValuesError as err:
        raise ChartError(_schema_message(str(err), values)) from None
    except helm_python.HelmRenderError as err:
        raise ChartError(_render_message(str(err))) from None


def _collect(manifests: dict[str, str]) -> Rendered:
    found: list[tuple[dict[str, Any], str]] = []
    notes = ""
    for source, text in sorted(manifests.items()):
        if source.endswith("NOTES.txt"):
            notes = text
            continue
        found += [(doc, source) for doc in yaml.safe_load_all(text) if doc]
    found.sort(key=lambda item: KIND_ORDER.index(item[0]["kind"]) if item[0]["kind"] in KIND_ORDER else len(KIND_ORDER))
    return Rendered([obj for obj, _ in found], [source for _, source in found], notes)


def _schema_message(message: str, values: dict[str, Any]) -> str:
    """Helm's multi-line schema report as one line: ``values nodes: minimum: got 0, want 1``."""
    parts = []
    for line in message.splitlines():
        match = re.match(r"^- at '(.*?)': (.*)$", line.strip())
        if match:
            where = match[1].strip("/").replace("/", ".")
            parts.append(f"values{' ' + where if where else ''}: {match[2]}")
    text = "; ".join(parts) or " ".join(message.split())
    if any(key in TrainConfig.model_fields for key in values):
        text += " (training settings go under train., e.g. --set train.head.sample_rate=0.1)"
    return text


def _render_message(message: str) -> str:
    """The chart's own ``fail`` message, without Go's template position."""
    match = re.search(r"execution error at \(.*?\): (.*)", message)
    return match[1].strip() if match else " ".join(message.split())
