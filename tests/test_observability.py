"""Metrics, alerts and dashboard against a real Prometheus scraping a live ``mfrctl train --nodes 2``.

One short run per module (module-scoped fixture), scraped every second by
Prometheus from Debian's package; then every contract metric, every dashboard
panel query and every alert expression is checked through the HTTP API, and
``promtool`` checks a scraped page.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

from mfr.ctl.launcher import free_port
from tests.support.chart import ALERTS, JOB, NAME, NAMESPACE, rendered_rules
from tests.support.prometheus import PROMTOOL, Prometheus

STEPS = 40

# The metrics contract (../shared/design.md): every rank exports these.
CONTRACT = [
    "mfr_train_step",
    "mfr_train_samples_total",
    "mfr_train_loss",
    "mfr_train_learning_rate",
    "mfr_train_step_seconds_bucket",
    "mfr_train_data_wait_seconds_bucket",
    "mfr_train_grad_norm",
    "mfr_train_nonfinite_steps_total",
    "mfr_world_size",
    "mfr_elastic_restarts",
    "mfr_checkpoint_save_seconds_bucket",
    "mfr_checkpoint_last_success_timestamp_seconds",
    "mfr_checkpoint_failures_total",
    "mfr_bad_samples_total",
    "mfr_device_memory_bytes",
    "mfr_eval_tpr",
]
RANK0_ONLY = ["mfr_checkpoint_bytes"]  # rank 0 commits the checkpoint and sizes it


@dataclass
class LiveRun:
    prometheus: Prometheus
    start: float
    end: float
    returncode: int
    stderr: str
    page: str  # rank 0's /metrics while training
    metrics_port: int

    def range(self, expr: str) -> list[dict]:
        return self.prometheus.query_range(expr, self.start, self.end, step=1.0)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def live_run(prometheus_factory, tmp_path_factory) -> LiveRun:
    run_dir = tmp_path_factory.mktemp("live-run")
    port = free_port(2)
    pods = [f"{NAME}-master-0", f"{NAME}-worker-0"]
    prometheus = prometheus_factory(
        {JOB: [(f"127.0.0.1:{port + i}", {"namespace": NAMESPACE, "pod": pod}) for i, pod in enumerate(pods)]}
    )
    command = [
        sys.executable,
        "-m",
        "mfr.ctl.main",
        "train",
        "--nodes",
        "2",
        "--output-dir",
        str(run_dir),
        "--fresh",
        "--set",
        f"run.steps={STEPS}",
        "--set",
        "eval.num_identities=10",
        "--set",
        "eval.images_per_identity=4",
        "--set",
        "data.batch_size=16",
        "--set",
        "checkpoint.every_steps=10",
        "--set",
        "metrics.address=127.0.0.1",
        "--set",
        f"metrics.port={port}",
    ]
    start = time.time()
    stderr_path = run_dir / "mfrctl.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    page = ""
    try:
        while proc.poll() is None:
            try:
                text = _get(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                text = ""
            step = re.search(r'^mfr_train_step\{rank="0"\} (\S+)$', text, re.M)
            if step and float(step.group(1)) >= 15 and not page:
                page = text
            time.sleep(0.2)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    end = time.time()
    return LiveRun(prometheus, start, end, proc.returncode, stderr_path.read_text(), page, port)


def test_mfrctl_train_prints_where_every_rank_serves_metrics(live_run):
    assert live_run.returncode == 0, live_run.stderr
    for rank in (0, 1):
        line = (
            f"metrics of node {rank} process 0 (rank {rank}): http://127.0.0.1:{live_run.metrics_port + rank}/metrics"
        )
        assert line in live_run.stderr, live_run.stderr


def test_prometheus_scraped_every_contract_metric_from_every_rank(live_run):
    for name in CONTRACT:
        ranks = {s["metric"]["rank"] for s in live_run.range(f'count by (rank) ({name}{{job="{JOB}"}})')}
        assert ranks == {"0", "1"}, name
    for name in RANK0_ONLY:
        ranks = {s["metric"]["rank"] for s in live_run.range(f'count by (rank) ({name}{{job="{JOB}"}})')}
        assert ranks == {"0"}, name


def test_scraped_values_follow_the_run(live_run):
    (steps,) = live_run.range(f'max(max_over_time(mfr_train_step{{job="{JOB}"}}[1h]))')
    assert 0 < float(steps["values"][-1][1]) <= STEPS
    world = live_run.range(f'mfr_world_size{{job="{JOB}"}}')
    assert {float(v) for s in world for _, v in s["values"]} == {2.0}
    samples = live_run.range(f'max by (rank) (max_over_time(mfr_train_samples_total{{job="{JOB}"}}[1h]))')
    for series in samples:  # 16 samples per rank and step (a scrape may fall between the two updates)
        step = live_run.range(f'max_over_time(mfr_train_step{{job="{JOB}",rank="{series["metric"]["rank"]}"}}[1h])')
        done = float(step[0]["values"][-1][1])
        assert float(series["values"][-1][1]) in (16 * done, 16 * (done - 1))
    tprs = live_run.range(f'mfr_eval_tpr{{job="{JOB}",fpr="1e-01"}}')
    assert {s["metric"]["protocol"] for s in tprs} == {"unmasked-unmasked", "masked-unmasked", "masked-masked"}
    assert all(0 <= float(v) <= 1 for s in tprs for _, v in s["values"])


def test_scraped_page_passes_promtool_check_metrics(live_run):
    assert "mfr_train_step{" in live_run.page
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=live_run.page, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_promtool_check_metrics_can_fail():
    bad = "# HELP mfr_bad_count a counter\n# TYPE mfr_bad_count counter\nmfr_bad_count 1\n"
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=bad, capture_output=True, text=True)
    assert 'counter metrics should have "_total" suffix' in proc.stdout + proc.stderr


def test_every_alert_expression_evaluates_against_the_live_run(live_run):
    rules = [r for g in rendered_rules()["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        live_run.range(rule["expr"])  # raises PrometheusError on a bad expression
    # the healthy run trips none of them: no non-finite step, no failed checkpoint, no rank down
    for name in ("MFRLossNonFinite", "MFRCheckpointFailing", "MFRBadSamplesHigh", "MFRElasticRestartsClimbing"):
        (rule,) = [r for r in rules if r["alert"] == name]
        assert live_run.range(rule["expr"]) == [], name


def _dashboard_expr(expr: str) -> str:
    """A panel query as Grafana sends it for this run (its variables filled in)."""
    return (
        expr.replace("$namespace", NAMESPACE)
        .replace("$job", JOB)
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
    )


def test_every_dashboard_panel_query_returns_data_from_the_live_run(live_run):
    import json

    from charts.generate import dashboard_path
    from charts.generate.dashboard import panel_queries

    queries = panel_queries(json.loads(dashboard_path().read_text()))
    assert len(queries) >= 20
    empty = [(title, expr) for title, expr in queries if not live_run.range(_dashboard_expr(expr))]
    assert empty == []


def test_dashboard_variables_find_the_run(live_run):
    api = live_run.prometheus.api
    assert NAMESPACE in api("label/namespace/values", **{"match[]": "mfr_train_step"})
    assert JOB in api("label/job/values", **{"match[]": f'mfr_train_step{{namespace="{NAMESPACE}"}}'})
