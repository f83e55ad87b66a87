"""The chart as the tests render and check it: the Kubernetes version it must meet, and the release whose
monitoring objects (PodMonitor, alert rules, dashboard) the monitoring tests switch on and query."""

from __future__ import annotations

from mfr.ctl.chart import render

KUBE_VERSION = "1.29.0"  # the Kubernetes whose schemas helm lint and kubernetes-validate check rendered objects against
NAMESPACE, NAME = "ml", "mfr"  # the release the monitoring tests render
JOB = f"{NAMESPACE}/{NAME}"  # the job label prometheus-operator gives a PodMonitor's targets
MONITORING = {
    "monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}
}
ALERTS = {
    "MFRTrainingStalled",
    "MFRLossNonFinite",
    "MFRCheckpointStale",
    "MFRCheckpointFailing",
    "MFRThroughputDropped",
    "MFRRankDown",
    "MFRBadSamplesHigh",
    "MFRElasticRestartsClimbing",
}


def rendered_rules(values: dict | None = None) -> dict:
    """The PrometheusRule's spec as a Prometheus rule file."""
    objects = {o["kind"]: o for o in render({**MONITORING, **(values or {})}, name=NAME, namespace=NAMESPACE).objects}
    return {"groups": objects["PrometheusRule"]["spec"]["groups"]}
