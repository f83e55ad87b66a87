"""mfrctl: train, deploy and inspect masked-face-recognition runs."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml

from mfr.trainer.config import ConfigError, TrainConfig, load_config

from .chart import ChartError, parse_elastic
from .ckpt import ckpt_app
from .console import Output, OutputOpt, err, fail, out, print_data
from .data import data_app
from .deploy import add_commands as add_kubernetes_commands
from .distill import distill_app
from .evaluate import evaluate
from .export import export
from .launcher import LOOPBACK, LaunchError, LocalJob, RunningJob, check_port_free, free_port
from .plan import plan
from .progress import EventTail, TrainProgress, results_table

app = typer.Typer(
    name="mfrctl",
    help="Train masked-face-recognition models: locally, or as a Kubeflow PyTorchJob.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate and show training configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(data_app, name="data")
app.command("plan")(plan)
app.command("export")(export)
app.add_typer(distill_app, name="distill")
app.command("eval")(evaluate)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TrainConfig YAML; default: the built-in synthetic demo.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting, e.g. --set head.sample_rate=0.1 (repeatable)."),
]


def _load(config: Path | None, overrides: list[str] | None) -> TrainConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise fail(f"config: {e}") from None


def _parse_elastic(value: str | None, nodes: int) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_elastic(value, nodes)
    except ChartError as e:
        raise fail(str(e)) from None


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None, output: OutputOpt = Output.yaml) -> None:
    """Validate a config and print it with every default filled in."""
    cfg = _load(config, set_)
    print_data(cfg.model_dump(mode="json"), Output.json if output == Output.json else Output.yaml)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    nodes: Annotated[int, typer.Option(min=1, help="Emulated pods, one torchrun agent each.")] = 1,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="Training processes per pod.")] = 1,
    elastic: Annotated[
        str | None, typer.Option(metavar="MIN:MAX", help="Elastic job: c10d rendezvous, nodes may come and go.")
    ] = None,
    master_port: Annotated[int, typer.Option(min=0, max=65535, help="Rendezvous port; 0 picks a free one.")] = 0,
    output_dir: Annotated[
        Path | None, typer.Option(help="Run directory (logs, events, results); overrides run.output_dir.")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over, ignoring checkpoints already in the run's checkpoint.uri.")
    ] = False,
    backoff_limit: Annotated[
        int,
        typer.Option(
            min=0,
            help="Pod failures with a retryable exit code (>= 128) that are restarted, "
            "as the operator's runPolicy.backoffLimit; 0 fails the job on the first.",
        ),
    ] = 6,
    api: Annotated[
        str,
        typer.Option(
            metavar="pytorchjob|trainjob",
            help="Whose environment contract the pods get: the v1 operator's PyTorchJob "
            "(MASTER_ADDR, RANK, WORLD_SIZE, PET_*) or Kubeflow Trainer v2's TrainJob (PET_* only).",
        ),
    ] = "pytorchjob",
    output: OutputOpt = Output.table,
) -> None:
    """Train on this machine as an N-node job, with the pods' exact environment.

    Each emulated node is a torchrun agent that sees what the Kubeflow operator
    gives a pod, so this runs the real multi-node code path; the operator's
    restart policy is played too: a pod that exits 128 or more (killed, lost
    peer, preempted) is restarted and resumes from the newest committed
    checkpoint, up to --backoff-limit times.  Like a pod, the run resumes from
    checkpoints already in its checkpoint.uri (by default
    <output-dir>/checkpoints) unless --fresh is given.  Exit code 0 when
    training finished, 2 for a usage or config error, 1 when training failed.
    """
    elastic_range = _parse_elastic(elastic, nodes)
    if api not in ("pytorchjob", "trainjob"):
        raise fail(f"--api {api!r}: pytorchjob or trainjob")
    if api == "trainjob" and elastic_range:
        raise fail(
            "--api trainjob --elastic: elastic training runs as a PyTorchJob (Kubeflow Trainer v2.2 removed "
            "ElasticPolicy); drop one"
        )
    overrides = list(set_ or [])
    if fresh:
        overrides.append("checkpoint.resume=never")
    if output_dir is not None:
        overrides.append(f"run.output_dir={json.dumps(str(output_dir))}")  # a JSON string is YAML too
    cfg = _load(config, overrides)
    if "address" not in cfg.metrics.model_fields_set:  # emulated pods share this machine: keep them off the network
        cfg = _load(config, [*overrides, f"metrics.address={LOOPBACK}"])
    if importlib.util.find_spec("torch") is None:
        raise fail("mfrctl train runs the trainer, which needs torch: pip install 'mfr[train]'")
    try:
        if master_port:
            check_port_free(master_port)
    except LaunchError as e:
        raise fail(str(e)) from None

    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    job = LocalJob(
        nodes=nodes,
        nproc_per_node=nproc_per_node,
        config_path=config_path,
        run_dir=run_dir,
        master_port=master_port or free_port(),
        elastic=elastic_range,
        run_id=run_dir.resolve().name,
        metrics_port=cfg.metrics.port if cfg.metrics.enabled else None,
        backoff_limit=backoff_limit,
        api=api,
    )
    mode = f"elastic {elastic_range[0]}:{elastic_range[1]}" if elastic_range else "static"
    err.print(
        f"mfr: {nodes} node(s) x {nproc_per_node} process(es), {mode}; logs in {run_dir}/node-*.log",
        highlight=False,
    )
    for node, local, url in job.metrics_endpoints(cfg.metrics.address):
        rank = "" if elastic_range else f" (rank {node * nproc_per_node + local})"
        err.print(f"mfr: metrics of node {node} process {local}{rank}: {url}", highlight=False)
    code, events, running = _run(job, cfg.run.steps)
    if code != 0:
        error = events.error()
        if error is not None and error["kind"] == "config":
            raise fail(f"config: {error['message']}")
        if error is None:
            err.print(running.log_tail(), highlight=False, markup=False)
        raise fail(error["message"] if error else f"training failed: {running.failure_message()}", code=1)
    _print_results(events, running, output)


def _run(job: LocalJob, steps: int) -> tuple[int, EventTail, RunningJob]:
    """Run the job to its end, following its events; nothing outlives this.

    Returns the job's exit code, the events, and the job (its pod failures and logs).
    """
    events = EventTail(job.events_path)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    running = RunningJob.start(job, say=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))
    try:
        with TrainProgress(err, steps) as progress:
            while (code := running.finished()) is None:
                progress.update_all(events.read())
                time.sleep(0.2)
            progress.update_all(events.read())
        return code, events, running
    except KeyboardInterrupt:
        err.print("mfr: interrupted, stopping every node", highlight=False)
        raise typer.Exit(130) from None
    finally:
        running.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_results(events: EventTail, running: RunningJob, output: Output) -> None:
    restarted = [str(f) for f in running.failures]
    if output == Output.table:
        if restarted:
            err.print(f"mfr: {running.restarts} pod restart(s): {'; '.join(restarted)}", highlight=False)
        out.print(results_table(events.evals))
        return
    print_data(
        {
            "steps": events.last_step,
            "restarts": running.restarts,
            "pod_failures": [{"pod": f.pod, "node": f.node, "exit_code": f.code} for f in running.failures],
            "resumed_at": [e["step"] for e in events.resumes],
            "eval": {stage: ev["results"] for stage, ev in events.evals.items()},
        },
        output,
    )


add_kubernetes_commands(app)  # render, submit, status, logs, delete, list

if __name__ == "__main__":
    sys.exit(app())
