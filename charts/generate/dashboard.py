"""The run's Grafana dashboard, as code (Grafana's grafana-foundation-sdk, a Grafana 11 build).

``python -m charts.generate`` writes it as JSON to
charts/mfr-trainer/dashboards/mfr-training.json, which the chart's dashboard
ConfigMap carries; a test fails when the two drift, and every panel query is
run against a real Prometheus scraping a live run.  Only the generator and
the tests import this module (the SDK is a test/dev dependency, not the CLI's).
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh, VariableSort

UID = "mfr-training"
FILE_NAME = "mfr-training.json"
SEL = 'namespace="$namespace", job="$job"'  # the run: its namespace and the PodMonitor's job label
RATE = "$__rate_interval"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _series(title: str, description: str, unit: str, queries: list[tuple[str, str]], width: int = 12):
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    panel = panel.span(width).height(8)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def _stat(title: str, description: str, unit: str, expr: str, width: int = 4):
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(4)
        .with_target(_query(expr, title, "A"))
    )


def build() -> db.Dashboard:
    """The dashboard builder: variables for datasource, namespace and job; one row per concern."""
    return (
        db.Dashboard("mfr training")
        .uid(UID)
        .description(
            "A masked-face-recognition training run (mfr-trainer chart): progress, speed, loss, checkpoints, evaluation"
        )
        .tags(["mfr", "training", "pytorch"])
        .refresh("30s")
        .time("now-6h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query("label_values(mfr_train_step, namespace)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(
            db.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query('label_values(mfr_train_step{namespace="$namespace"}, job)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
        .with_row(db.Row("Progress"))
        .with_panel(_stat("Step", "Optimizer steps done", "none", f"max(mfr_train_step{{{SEL}}})"))
        .with_panel(_stat("World size", "Training processes in the job", "none", f"max(mfr_world_size{{{SEL}}})"))
        .with_panel(
            _stat(
                "Elastic restarts",
                "Worker-group restarts (TORCHELASTIC_RESTART_COUNT), highest of any process",
                "none",
                f"max(mfr_elastic_restarts{{{SEL}}})",
            )
        )
        .with_panel(
            _stat(
                "Samples/s",
                "Training samples per second, all ranks",
                "none",
                f"sum(rate(mfr_train_samples_total{{{SEL}}}[{RATE}]))",
            )
        )
        .with_panel(
            _stat(
                "Checkpoint age",
                "Time since the last committed checkpoint",
                "s",
                f"time() - max(mfr_checkpoint_last_success_timestamp_seconds{{{SEL}}})",
            )
        )
        .with_panel(
            _stat(
                "Non-finite steps",
                "Steps skipped for a NaN/inf loss or gradient, in the time range",
                "none",
                f"sum(increase(mfr_train_nonfinite_steps_total{{{SEL}}}[$__range]))",
            )
        )
        .with_row(db.Row("Speed"))
        .with_panel(
            _series(
                "Throughput",
                "Samples per second, per rank and in total",
                "none",
                [
                    (f"sum by (rank) (rate(mfr_train_samples_total{{{SEL}}}[{RATE}]))", "rank {{rank}}"),
                    (f"sum(rate(mfr_train_samples_total{{{SEL}}}[{RATE}]))", "total"),
                ],
            )
        )
        .with_panel(
            _series(
                "Step time",
                "Wall time of one step (data wait and checkpoint stall included)",
                "s",
                [
                    (
                        f"histogram_quantile(0.5, sum by (le) (rate(mfr_train_step_seconds_bucket{{{SEL}}}[{RATE}])))",
                        "p50",
                    ),
                    (
                        f"histogram_quantile(0.95, sum by (le) (rate(mfr_train_step_seconds_bucket{{{SEL}}}[{RATE}])))",
                        "p95",
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Data wait share",
                "Fraction of step time spent waiting for the batch, per rank",
                "percentunit",
                [
                    (
                        f"sum by (rank) (rate(mfr_train_data_wait_seconds_sum{{{SEL}}}[{RATE}]))"
                        f" / sum by (rank) (rate(mfr_train_step_seconds_sum{{{SEL}}}[{RATE}]))",
                        "rank {{rank}}",
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Device memory",
                "CUDA memory allocated and its peak (on CPU: resident set), per rank",
                "bytes",
                [
                    (f"max by (rank, kind) (mfr_device_memory_bytes{{{SEL}}})", "rank {{rank}} {{kind}}"),
                ],
            )
        )
        .with_row(db.Row("Optimization"))
        .with_panel(
            _series(
                "Loss",
                "Training loss of the last step, per rank (NaN when skipped)",
                "none",
                [
                    (f"avg(mfr_train_loss{{{SEL}}})", "mean"),
                    (f"max by (rank) (mfr_train_loss{{{SEL}}})", "rank {{rank}}"),
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Learning rate",
                "Learning rate of the last step",
                "none",
                [
                    (f"max(mfr_train_learning_rate{{{SEL}}})", "lr"),
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Gradient norm",
                "Global gradient norm before clipping",
                "none",
                [
                    (f"max(mfr_train_grad_norm{{{SEL}}})", "grad norm"),
                ],
                width=8,
            )
        )
        .with_row(db.Row("Checkpoints and data"))
        .with_panel(
            _series(
                "Checkpoint save duration",
                "From a save's start to its commit",
                "s",
                [
                    (
                        f"max(rate(mfr_checkpoint_save_seconds_sum{{{SEL}}}[{RATE}])"
                        f" / rate(mfr_checkpoint_save_seconds_count{{{SEL}}}[{RATE}]))",
                        "mean save",
                    ),
                    (
                        f"max(rate(mfr_checkpoint_stall_seconds_sum{{{SEL}}}[{RATE}])"
                        f" / rate(mfr_checkpoint_stall_seconds_count{{{SEL}}}[{RATE}]))",
                        "mean loop stall",
                    ),
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Checkpoint size and failures",
                "Size of the last committed checkpoint; failed saves",
                "bytes",
                [
                    (f"max(mfr_checkpoint_bytes{{{SEL}}})", "size"),
                    (f"sum(increase(mfr_checkpoint_failures_total{{{SEL}}}[{RATE}]))", "failures"),
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Bad samples",
                "Training samples skipped as unreadable or mislabelled, per second",
                "none",
                [
                    (f"sum by (rank) (rate(mfr_bad_samples_total{{{SEL}}}[{RATE}]))", "rank {{rank}}"),
                ],
                width=8,
            )
        )
        .with_row(db.Row("Evaluation"))
        .with_panel(
            _series(
                "Held-out TPR @ FPR",
                "Verification on held-out identities, by protocol and target FPR",
                "percentunit",
                [
                    (f"max by (protocol, fpr) (mfr_eval_tpr{{{SEL}}})", "{{protocol}} @ {{fpr}}"),
                ],
                width=24,
            )
        )
    )


def dashboard_json() -> str:
    """The dashboard as the chart stores it (stable key order, one trailing newline)."""
    model = build().build()
    return json.dumps(json.loads(json.dumps(model, cls=JSONEncoder)), indent=2, sort_keys=True) + "\n"


def panel_queries(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target of a dashboard's JSON."""
    found = []
    for panel in data.get("panels", []):
        found += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
        found += panel_queries(panel)  # the panels of a collapsed row
    return found
