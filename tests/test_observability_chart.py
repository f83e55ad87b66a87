"""The chart's monitoring objects: PodMonitor, PrometheusRule (promtool check/test rules), dashboard ConfigMap.

promtool comes from Debian's ``prometheus`` package (.ci/setup installs it).
The alert unit tests run the rendered rules: each alert fires on its failure
series and stays quiet on a healthy one.
"""

from __future__ import annotations

import subprocess

import helm_python
import pytest
import yaml

from mfr.ctl.chart import ChartError, chart_dir, render
from mfr.trainer.config import MetricsConfig
from tests.support.chart import ALERTS, JOB, KUBE_VERSION, MONITORING, NAME, NAMESPACE, rendered_rules
from tests.support.prometheus import PROMTOOL


def _objects(values: dict, name: str = NAME) -> dict[str, dict]:
    return {o["kind"]: o for o in render(values, name=name, namespace=NAMESPACE).objects}


@pytest.mark.parametrize(
    "values",
    [MONITORING, {**MONITORING, "nprocPerNode": 4, "gpusPerNode": 4, "elastic": {"enabled": True}, "nodes": 2}],
)
def test_helm_lint_is_clean_with_monitoring(values):
    report = helm_python.lint(chart_dir(), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


def test_monitoring_objects_are_off_by_default():
    assert not {"PodMonitor", "PrometheusRule"} & set(_objects({}))
    assert all(
        o["metadata"]["name"] != "mfr-training-dashboard" for o in render({}, name=NAME, namespace=NAMESPACE).objects
    )


def test_podmonitor_scrapes_every_process_of_every_pod():
    objects = _objects({**MONITORING, "gpusPerNode": 4, "train": {"metrics": {"port": 9500}}})
    monitor, job = objects["PodMonitor"], objects["PyTorchJob"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == [f"metrics-{i}" for i in range(4)]
    for rspec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = rspec["template"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert {e["port"]: ports[e["port"]] for e in endpoints} == {f"metrics-{i}": 9500 + i for i in range(4)}


def test_release_label_is_a_value_and_extra_labels_apply():
    monitoring = {**MONITORING["monitoring"], "release": "prom", "labels": {"team": "faces"}}
    objects = _objects({**MONITORING, "monitoring": monitoring})
    for kind in ("PodMonitor", "PrometheusRule"):
        assert objects[kind]["metadata"]["labels"]["release"] == "prom"
        assert objects[kind]["metadata"]["labels"]["team"] == "faces"


def test_chart_default_metrics_port_is_the_trainers():
    objects = _objects(MONITORING)
    ports = {
        p["name"]: p["containerPort"]
        for p in objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "ports"
        ]
    }
    assert ports["metrics-0"] == MetricsConfig().port


def test_podmonitor_refuses_a_trainer_without_metrics():
    with pytest.raises(ChartError, match="needs train.metrics.enabled"):
        _objects({**MONITORING, "train": {"metrics": {"enabled": False}}})


def test_every_alert_has_summary_description_and_runbook():
    rules = [
        r
        for g in rendered_rules(
            {"monitoring": {**MONITORING["monitoring"], "prometheusRule": {"enabled": True, "runbookUrl": "https://r"}}}
        )["groups"]
        for r in g["rules"]
    ]
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert {"summary", "description", "runbook", "runbook_url"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert f'job="{JOB}"' in rule["expr"]


def test_promtool_check_rules_accepts_the_rendered_rules(tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rendered_rules()))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_check_rules_can_fail(tmp_path):
    rules = rendered_rules()
    rules["groups"][0]["rules"][0]["expr"] = "max by (job) (changes(mfr_train_step[10m]) == "
    rules["groups"][0]["rules"][1]["annotations"]["summary"] = "{{ $labels.job "
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MFRTrainingStalled" in proc.stdout + proc.stderr or "parse error" in proc.stdout + proc.stderr


# --- promtool test rules: one failure and one healthy history per alert ----------------------------------------
# Series at 1m resolution; promtool's clock starts at 0 (so a "timestamp" series counts seconds from there).
SEL = f'job="{JOB}",namespace="{NAMESPACE}"'
RANK0, RANK1 = f'{{{SEL},rank="0"}}', f'{{{SEL},rank="1"}}'
GROUP = {"namespace": NAMESPACE, "job": JOB}
CASES = {
    # alert: (failure series, healthy series, eval time, expected labels of the firing alert)
    "MFRTrainingStalled": (
        {f"mfr_train_step{RANK0}": "0+1x20 20x40", f"mfr_train_step{RANK1}": "0+1x20 20x40"},
        {f"mfr_train_step{RANK0}": "0+1x60", f"mfr_train_step{RANK1}": "0+1x60"},
        "60m",
        {**GROUP, "severity": "critical"},
    ),
    "MFRLossNonFinite": (
        {f"mfr_train_nonfinite_steps_total{RANK0}": "0x30 1x30"},
        {f"mfr_train_nonfinite_steps_total{RANK0}": "0x60"},
        "33m",
        {**GROUP, "severity": "warning"},
    ),
    "MFRCheckpointStale": (  # rendered with a 600 s interval x 3 intervals: stale after 30m
        {f"mfr_checkpoint_last_success_timestamp_seconds{RANK0}": "0+60x30 1800x90"},
        {f"mfr_checkpoint_last_success_timestamp_seconds{RANK0}": "0+60x120"},
        "100m",
        {**GROUP, "severity": "warning"},
    ),
    "MFRCheckpointFailing": (
        {f"mfr_checkpoint_failures_total{RANK1}": "0x20 1x40"},
        {f"mfr_checkpoint_failures_total{RANK1}": "0x60"},
        "25m",
        {**GROUP, "severity": "warning"},
    ),
    "MFRThroughputDropped": (  # 10 samples/s per rank, then 100 a minute
        {f"mfr_train_samples_total{RANK0}": "0+600x60 36000+100x60"},
        {f"mfr_train_samples_total{RANK0}": "0+600x120"},
        "90m",
        {**GROUP, "severity": "warning"},
    ),
    "MFRRankDown": (
        {f'up{{{SEL},pod="mfr-worker-0",instance="10.0.0.2:9410"}}': "1x10 0x20"},
        {f'up{{{SEL},pod="mfr-worker-0",instance="10.0.0.2:9410"}}': "1x30"},
        "20m",
        {**GROUP, "pod": "mfr-worker-0", "instance": "10.0.0.2:9410", "severity": "critical"},
    ),
    "MFRBadSamplesHigh": (  # 10% of samples bad vs 1 in 600
        {f"mfr_train_samples_total{RANK0}": "0+600x60", f"mfr_bad_samples_total{RANK0}": "0+60x60"},
        {f"mfr_train_samples_total{RANK0}": "0+600x60", f"mfr_bad_samples_total{RANK0}": "0+1x60"},
        "40m",
        {**GROUP, "severity": "warning"},
    ),
    "MFRElasticRestartsClimbing": (  # ranks renumbered by the restarts: new series, the count goes on
        {f"mfr_elastic_restarts{RANK0}": "0x10 1x10 2x10 3x30", f"mfr_elastic_restarts{RANK1}": "_x30 3x30"},
        {f"mfr_elastic_restarts{RANK0}": "0x30 1x30"},
        "50m",
        {**GROUP, "severity": "warning"},
    ),
}


def _unit_tests(alert: str) -> list[dict]:
    failing, healthy, at, labels = CASES[alert]
    tests = []
    for series, expected in ((failing, [{"exp_labels": labels}]), (healthy, [])):
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}],
            }
        )
    return tests


def _promtool_test(tmp_path, tests: list[dict]) -> subprocess.CompletedProcess:
    rules = rendered_rules(
        {
            "monitoring": {
                **MONITORING["monitoring"],
                "prometheusRule": {"enabled": True, "checkpointIntervalSeconds": 600},
            }
        }
    )
    for group in rules["groups"]:  # promtool compares annotations exactly; `check rules` checks their templates
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    return subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests.yml")], capture_output=True, text=True)


def test_every_alert_has_a_unit_test():
    assert set(CASES) == ALERTS


def test_promtool_test_rules_every_alert_fires_on_failure_and_not_when_healthy(tmp_path):
    proc = _promtool_test(tmp_path, [t for alert in sorted(CASES) for t in _unit_tests(alert)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("alert", sorted(CASES))
def test_promtool_unit_test_fails_when_the_alert_is_swapped(tmp_path, alert):
    """Each case can fail: with the failure and healthy histories swapped, promtool reports a mismatch."""
    _failing, healthy, at, labels = CASES[alert]
    swapped = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in healthy.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels}]}],
        }
    ]
    proc = _promtool_test(tmp_path, swapped)
    assert proc.returncode != 0 and alert in proc.stdout + proc.stderr


# --- the dashboard ------------------------------------------------------------------------------------------------
def test_dashboard_json_in_the_chart_is_the_generated_one():
    """Fails when charts/generate/dashboard.py changed and `python -m charts.generate` was not run."""
    from charts.generate import dashboard_path
    from charts.generate.dashboard import dashboard_json

    assert dashboard_path().read_text() == dashboard_json()


def test_dashboard_json_reads_back_into_the_sdk_model():
    import json

    from grafana_foundation_sdk.models.dashboard import Dashboard

    from charts.generate.dashboard import UID, dashboard_json

    data = json.loads(dashboard_json())
    model = Dashboard.from_json(data)
    assert model.uid == UID and len(model.panels) == len(data["panels"])


def test_dashboard_has_the_run_variables_and_every_panel_selects_the_run():
    import json

    from charts.generate.dashboard import dashboard_json, panel_queries

    data = json.loads(dashboard_json())
    assert [v["name"] for v in data["templating"]["list"]] == ["datasource", "namespace", "job"]
    queries = panel_queries(data)
    titles = {title for title, _ in queries}
    assert {
        "Throughput",
        "Step time",
        "Data wait share",
        "Loss",
        "Learning rate",
        "Gradient norm",
        "World size",
        "Elastic restarts",
        "Checkpoint age",
        "Checkpoint save duration",
        "Checkpoint size and failures",
        "Device memory",
        "Held-out TPR @ FPR",
        "Bad samples",
    } <= titles
    for title, expr in queries:
        assert expr.count('namespace="$namespace", job="$job"') == expr.count("mfr_"), title


def test_dashboard_configmap_carries_the_json_with_the_sidecar_label():
    import json

    from charts.generate.dashboard import UID

    values = {
        "monitoring": {
            "dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "ML"}}
        }
    }
    (cm,) = [
        o
        for o in render(values, name=NAME, namespace=NAMESPACE).objects
        if o["metadata"]["name"] == "mfr-training-dashboard"
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["mfr-training.json"])["uid"] == UID
    import kubernetes_validate

    kubernetes_validate.validate(cm, "1.29.0", strict=True)


def test_the_dashboard_is_one_shared_object_that_no_run_owns():
    """Every run renders the same ConfigMap (name, uid, file): never one per run, and never with a run's labels,
    so that deleting a run (mfrctl delete selects by app.kubernetes.io/instance) leaves it for the others."""
    values = {"monitoring": {"dashboard": {"enabled": True}}}
    boards = [
        next(
            o
            for o in render(values, name=run, namespace=NAMESPACE).objects
            if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard")
        )
        for run in ("exp1", "exp2")
    ]
    assert boards[0] == boards[1]
    assert "app.kubernetes.io/instance" not in boards[0]["metadata"]["labels"]


def test_notes_say_where_metrics_are_served_and_what_scrapes_them():
    notes = render({}, name=NAME, namespace=NAMESPACE).notes
    assert "serves /metrics on port 9410 + its local rank" in notes and "monitoring.podMonitor.enabled=true" in notes
    notes = render(MONITORING, name=NAME, namespace=NAMESPACE).notes
    assert f"Prometheus scrape them as job {JOB}" in notes
    assert "Alerts: PrometheusRule mfr" in notes and f"job {JOB}" in notes.split("Dashboard:")[1]
