"""mfrctl render | submit | status | logs | delete | list: runs on Kubernetes.

``render`` needs no cluster; the others talk to one through ctl/kube.py.
Usage mistakes are found before anything is sent (one line, exit code 2);
cluster-side failures are one line too, exit code 1.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .chart import ChartError, Rendered, check_namespace, file_values, flag_values, merge, render, set_values
from .console import Output, OutputOpt, err, fail, print_columns, print_data


class Format(str, Enum):
    yaml = "yaml"
    json = "json"


class DryRun(str, Enum):
    none = "none"
    client = "client"
    server = "server"


class Replica(str, Enum):
    master = "master"
    worker = "worker"


NameOpt = Annotated[str, typer.Option("--name", help="The run: its PyTorchJob's name (pods are <name>-worker-<i>).")]
NamespaceOpt = Annotated[
    Optional[str], typer.Option("--namespace", "-n", help="Namespace; default: the kubeconfig context's, else default.")
]
NodesOpt = Annotated[
    Optional[int], typer.Option(help="Pods: static = 1 Master + N-1 Workers; elastic default = MAX.")
]
GpusOpt = Annotated[Optional[int], typer.Option(help="nvidia.com/gpu per pod (0 = CPU).")]
NprocOpt = Annotated[Optional[int], typer.Option(help="Training processes per pod; default: one per GPU, 1 on CPU.")]
ElasticOpt = Annotated[
    Optional[str], typer.Option(metavar="MIN:MAX", help="Elastic job: Workers only, c10d rendezvous, MIN..MAX pods.")
]
ImageOpt = Annotated[Optional[str], typer.Option(help="Trainer image, e.g. registry.example.com/mfr-trainer:0.1.0.")]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="TrainConfig YAML for the run; default: the chart's (the demo).")
]
CheckpointOpt = Annotated[
    Optional[str],
    typer.Option(
        "--checkpoint", metavar="URI",
        help="Checkpoint storage every pod reaches: s3://bucket/prefix (credentials from --set s3.existingSecret=NAME), "
             "any remote fsspec URL, or a path on --workspace-claim.  A job of several pods needs it, or the trial "
             "store that demo runs get (values trialStore).",
    ),
]
QueueOpt = Annotated[
    Optional[str],
    typer.Option("--queue", metavar="NAME",
                 help="Kueue LocalQueue: the job waits, suspended, until Kueue admits it against the queue's quota."),
]
ClaimOpt = Annotated[
    Optional[str],
    typer.Option("--workspace-claim", metavar="NAME",
                 help="A ReadWriteMany PersistentVolumeClaim mounted at /workspace in every pod; checkpoints go there."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Set a chart value (YAML): --set gang.enabled=true, --set train.optim.lr=0.01."),
]
ValuesOpt = Annotated[
    Optional[list[Path]], typer.Option("--values", "-f", help="A values YAML file, as helm -f (repeatable).")
]
KubeconfigOpt = Annotated[
    Optional[str], typer.Option(help="Kubeconfig file; default: $KUBECONFIG, else ~/.kube/config, else in-cluster.")
]
ContextOpt = Annotated[Optional[str], typer.Option(help="Kubeconfig context; default: its current context.")]
RunArg = Annotated[str, typer.Argument(help="The run (its PyTorchJob's name).")]


def render_run(
    name: str, namespace: str, *, sets: list[str] | None = None, files: list[Path] | None = None, **flags
) -> Rendered:
    """Chart defaults < -f files < flags (see chart.flag_values) < --set, as helm layers -f under --set."""
    try:
        values: dict = {}
        for path in files or []:
            values = merge(values, file_values(path))
        values = merge(values, flag_values(**flags))
        for expression in sets or []:
            values = merge(values, set_values(expression))
        return render(values, name=name, namespace=namespace)
    except ChartError as e:
        raise fail(str(e)) from None


def render_cmd(
    name: NameOpt = "mfr",
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Namespace the objects are meant for.")] = "default",
    nodes: NodesOpt = None,
    gpus_per_node: GpusOpt = None,
    nproc_per_node: NprocOpt = None,
    elastic: ElasticOpt = None,
    image: ImageOpt = None,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    workspace_claim: ClaimOpt = None,
    queue: QueueOpt = None,
    set_: SetOpt = None,
    values: ValuesOpt = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="Output format.")] = Format.yaml,
) -> None:
    """Print a run's Kubernetes objects (PyTorchJob, ConfigMap, ...) from the Helm chart; no cluster needed."""
    rendered = render_run(
        name, namespace, nodes=nodes, gpus_per_node=gpus_per_node, nproc_per_node=nproc_per_node,
        elastic=elastic, image=image, config=config, checkpoint=checkpoint, workspace_claim=workspace_claim,
        queue=queue, sets=set_, files=values,
    )
    if output == Format.json:
        print(json.dumps(rendered.to_list(), indent=2))
    else:
        print(rendered.to_yaml(), end="")


def _connect(kubeconfig: str | None, context: str | None, namespace: str | None):
    from .kube import ClusterError, connect

    if namespace is not None:
        try:
            check_namespace(namespace)
        except ChartError as e:
            raise fail(str(e)) from None
    try:
        return connect(kubeconfig, context, namespace)
    except ClusterError as e:
        raise fail(str(e), code=e.code) from None


def _cluster_call(call, *args, **kwargs):
    """Run a cluster operation; its failure is one line, exit code 1."""
    from .kube import ClusterError

    try:
        return call(*args, **kwargs)
    except ClusterError as e:
        raise fail(str(e), code=e.code) from None


def submit_cmd(
    name: NameOpt = "mfr",
    namespace: NamespaceOpt = None,
    nodes: NodesOpt = None,
    gpus_per_node: GpusOpt = None,
    nproc_per_node: NprocOpt = None,
    elastic: ElasticOpt = None,
    image: ImageOpt = None,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    workspace_claim: ClaimOpt = None,
    queue: QueueOpt = None,
    set_: SetOpt = None,
    values: ValuesOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    dry_run: Annotated[
        DryRun, typer.Option(help="client: only render and check; server: the API server validates, stores nothing.")
    ] = DryRun.none,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish; exit 0 if it succeeded.")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Stream rank 0's log until the job ends (implies --wait).")] = False,
) -> None:
    """Render the chart and create the run on the cluster, as a PyTorchJob and its ConfigMap.

    Every object carries app.kubernetes.io/instance=<name>, so mfrctl delete
    removes them together.  Exit code 0 when created (with --wait: when the job
    succeeded), 2 for a usage or config error (nothing is sent), 1 otherwise.
    """
    cluster = _connect(kubeconfig, context, namespace)  # reads the kubeconfig, sends nothing
    rendered = render_run(
        name, cluster.namespace, nodes=nodes, gpus_per_node=gpus_per_node, nproc_per_node=nproc_per_node,
        elastic=elastic, image=image, config=config, checkpoint=checkpoint, workspace_claim=workspace_claim,
        queue=queue, sets=set_, files=values,
    )
    if dry_run == DryRun.client:
        for obj in rendered.objects:
            print(f"{obj['kind'].lower()}/{obj['metadata']['name']} created (dry run)")
        return
    created = _cluster_call(cluster.create_run, rendered.objects, dry_run=dry_run == DryRun.server)
    suffix = " (server dry run)" if dry_run == DryRun.server else ""
    for ref in created:
        print(f"{ref} created{suffix}")
    if dry_run == DryRun.server:
        return
    if not (wait or follow):
        err.print(rendered.notes.strip(), highlight=False, markup=False, soft_wrap=True)
        return
    job = rendered.job["metadata"]["name"]
    if follow:
        _cluster_call(cluster.wait_for_start, job)
        _cluster_call(cluster.logs, job, replica=None, index=None, follow=True)
    state = _cluster_call(cluster.wait, job, lambda state, message: _say(f"{job} {state}", message))
    if state != "Succeeded":
        raise typer.Exit(1)


def _say(what: str, detail: str = "") -> None:
    err.print(f"mfr: {what}" + (f": {detail}" if detail else ""), highlight=False, markup=False, soft_wrap=True)


def status_cmd(
    name: RunArg,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show a run's state and its pods."""
    from .kube import job_summary, replica_of

    cluster = _connect(kubeconfig, context, namespace)
    summary = job_summary(_cluster_call(cluster.get_job, name))
    pods = [
        {
            "name": p.metadata.name,
            "replica": "-".join(map(str, replica_of(p))),
            "phase": p.status.phase if p.status else "",
            "restarts": sum(c.restart_count for c in (p.status.container_statuses or [])) if p.status else 0,
            "node": p.spec.node_name or "" if p.spec else "",
        }
        for p in _cluster_call(cluster.pods, name)
    ]
    if output != Output.table:
        print_data({"job": summary, "pods": pods}, output)
        return
    replicas = ", ".join(f"{kind} x{count}" for kind, count in summary["replicas"].items())
    per_pod = f"{summary['nprocPerNode']} process(es) per pod"
    print(f"{summary['name']}: {summary['state']} ({summary['mode']}; {replicas}; {per_pod})")
    if summary["message"]:
        print(f"  {summary['message']}")
    if pods:
        rows = [[p["name"], p["replica"], p["phase"], str(p["restarts"]), p["node"]] for p in pods]
        print_columns(["POD", "REPLICA", "PHASE", "RESTARTS", "NODE"], rows)
    else:
        print("no pods yet")


def logs_cmd(
    name: RunArg,
    replica: Annotated[Optional[Replica], typer.Option(help="Replica type; default: rank 0's pod.")] = None,
    index: Annotated[Optional[int], typer.Option(min=0, help="Replica index (with --replica); default: all of that type.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the logs until the pods end.")] = False,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the trainer's log of a run's pods (container pytorch)."""
    if index is not None and replica is None:
        raise fail("--index needs --replica master|worker")
    cluster = _connect(kubeconfig, context, namespace)
    logs = _cluster_call(
        cluster.logs, name, replica=replica.value if replica else None, index=index, follow=follow
    )
    if follow:
        return
    if not logs:
        _say(f"no logs yet: the pods of {name} have not started (mfrctl status {name})")
    for pod, text in logs.items():
        if len(logs) > 1:
            print(f"==> {pod} <==")
        print(text, end="" if text.endswith("\n") else "\n")


def delete_cmd(
    name: RunArg,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Delete a run: its PyTorchJob (the operator removes the pods and Services) and its ConfigMap."""
    cluster = _connect(kubeconfig, context, namespace)
    for ref in _cluster_call(cluster.delete_run, name):
        print(f"{ref} deleted")


def list_cmd(
    namespace: NamespaceOpt = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Runs of every namespace.")] = False,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List the runs (PyTorchJobs rendered by this chart) of a namespace."""
    from .kube import age, job_summary

    cluster = _connect(kubeconfig, context, namespace)
    runs = [job_summary(job) for job in _cluster_call(cluster.list_jobs, all_namespaces=all_namespaces)]
    if output != Output.table:
        print_data(runs, output)
        return
    if not runs:
        _say(f"no runs in {'any namespace' if all_namespaces else 'namespace ' + cluster.namespace}")
        return
    print_columns(
        ["NAMESPACE", "NAME", "STATE", "MODE", "PODS", "AGE"],
        [[r["namespace"], r["name"], r["state"], r["mode"], str(sum(r["replicas"].values())), age(r["created"])] for r in runs],
    )


def add_commands(app: typer.Typer) -> None:
    """Register the Kubernetes commands on mfrctl."""
    app.command("render")(render_cmd)
    app.command("submit")(submit_cmd)
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
    app.command("delete")(delete_cmd)
    app.command("list")(list_cmd)
