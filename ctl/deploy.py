"""mfrctl render | submit | status | logs | delete | list: runs on Kubernetes.

``render`` needs no cluster; the others talk to one through ctl/kube.py.
Usage mistakes are found before anything is sent (one line, exit code 2);
cluster-side failures are one line too, exit code 1.
"""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mfr.trainer.config import ConfigError, merge

from .chart import ChartError, Rendered, check_namespace, file_values, flag_values, render, set_values
from .console import Output, OutputOpt, err, fail, print_columns, print_data
from .doctor import api_checks, gpu_check, namespace_check, pod_security_check, preflight, report, storage_check
from .kube import FINAL_STATES, MONITORING_API, SUCCEEDED, TRAINER_API, first_pod


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
    node = "node"  # a TrainJob's


class Api(str, Enum):
    auto = "auto"
    pytorchjob = "pytorchjob"
    trainjob = "trainjob"


NameOpt = Annotated[
    str, typer.Option("--name", help="The run: its job's name (pods are <name>-worker-<i>, <name>-node-0-<i>).")
]
NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace; default: the kubeconfig context's, else default.")
]
NodesOpt = Annotated[int | None, typer.Option(help="Pods: static = 1 Master + N-1 Workers; elastic default = MAX.")]
GpusOpt = Annotated[int | None, typer.Option(help="nvidia.com/gpu per pod (0 = CPU).")]
NprocOpt = Annotated[int | None, typer.Option(help="Training processes per pod; default: one per GPU, 1 on CPU.")]
ElasticOpt = Annotated[
    str | None, typer.Option(metavar="MIN:MAX", help="Elastic job: Workers only, c10d rendezvous, MIN..MAX pods.")
]
ImageOpt = Annotated[str | None, typer.Option(help="Trainer image, e.g. registry.example.com/mfr-trainer:0.1.0.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TrainConfig YAML for the run; default: the chart's (the demo)."),
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        metavar="URI",
        help="Checkpoint storage every pod reaches: s3://bucket/prefix (credentials from --set "
        "s3.existingSecret=NAME), any remote fsspec URL, or a path on --workspace-claim.  A job of several "
        "pods needs it, or the trial store that demo runs get (values trialStore).",
    ),
]
QueueOpt = Annotated[
    str | None,
    typer.Option(
        "--queue",
        metavar="NAME",
        help="Kueue LocalQueue: the job waits, suspended, until Kueue admits it against the queue's quota.",
    ),
]
ClaimOpt = Annotated[
    str | None,
    typer.Option(
        "--workspace-claim",
        metavar="NAME",
        help="A ReadWriteMany PersistentVolumeClaim mounted at /workspace in every pod; checkpoints go there.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Set a chart value (YAML): --set gang.enabled=true, --set train.optim.lr=0.01."),
]
ValuesOpt = Annotated[
    list[Path] | None, typer.Option("--values", "-f", help="A values YAML file, as helm -f (repeatable).")
]
KubeconfigOpt = Annotated[
    str | None, typer.Option(help="Kubeconfig file; default: $KUBECONFIG, else ~/.kube/config, else in-cluster.")
]
ContextOpt = Annotated[str | None, typer.Option(help="Kubeconfig context; default: its current context.")]
RunArg = Annotated[str, typer.Argument(help="The run (its PyTorchJob's or TrainJob's name).")]


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
    except (ChartError, ConfigError) as e:  # ConfigError: a map merged over a set value
        raise fail(str(e)) from None


def render_cmd(
    name: NameOpt = "mfr",
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Namespace the objects are meant for; default: default.")
    ] = None,
    nodes: NodesOpt = None,
    gpus_per_node: GpusOpt = None,
    nproc_per_node: NprocOpt = None,
    elastic: ElasticOpt = None,
    image: ImageOpt = None,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    workspace_claim: ClaimOpt = None,
    queue: QueueOpt = None,
    api: Annotated[
        Api | None,
        typer.Option(
            help="pytorchjob (the default here: no cluster to ask) or trainjob (Kubeflow Trainer v2, static runs only)."
        ),
    ] = None,
    set_: SetOpt = None,
    values: ValuesOpt = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="Output format.")] = Format.yaml,
) -> None:
    """Print a run's Kubernetes objects (PyTorchJob or TrainJob, ConfigMap, ...) from the Helm chart; no cluster
    needed."""
    if api == Api.auto:
        raise fail("--api auto asks the cluster which API it serves: render has no cluster; use pytorchjob or trainjob")
    rendered = render_run(
        name,
        namespace or "default",
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        nproc_per_node=nproc_per_node,
        elastic=elastic,
        image=image,
        config=config,
        checkpoint=checkpoint,
        workspace_claim=workspace_claim,
        queue=queue,
        api=api.value if api else None,
        sets=set_,
        files=values,
    )
    if namespace is None and any(o["kind"] in ("PodMonitor", "PrometheusRule") for o in rendered.objects):
        raise fail(
            "--namespace: the alerts and the dashboard select the run's series as job <namespace>/"
            + name
            + ", so the objects must be rendered for the namespace they will be applied in: pass -n"
        )
    if api is None:
        _say(f"rendered a {rendered.job['kind']} (the default; --api trainjob renders a Kubeflow Trainer v2 TrainJob)")
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
        cluster = connect(kubeconfig, context, namespace)
    except ClusterError as e:
        raise fail(str(e), code=e.code) from None
    cluster.warn = _say
    return cluster


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
    api: Annotated[
        Api,
        typer.Option(
            help="auto: a TrainJob (Kubeflow Trainer v2) for a static run where the cluster serves it, "
            "else a PyTorchJob (elastic runs always)."
        ),
    ] = Api.auto,
    set_: SetOpt = None,
    values: ValuesOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    dry_run: Annotated[
        DryRun, typer.Option(help="client: only render and check; server: the API server validates, stores nothing.")
    ] = DryRun.none,
    monitoring: Annotated[
        bool | None,
        typer.Option(
            "--monitoring/--no-monitoring",
            help="A PodMonitor and a PrometheusRule for the run (prometheus-operator, e.g. "
            "kube-prometheus-stack); default: when the cluster serves monitoring.coreos.com/v1.",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to finish; exit 0 if it succeeded.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", help="Stream rank 0's log until the job ends (implies --wait).")
    ] = False,
    timeout: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="With --wait/--follow: give up after this long (30s, 5m, 2h30m), exit 1 with the job's state.",
        ),
    ] = None,
) -> None:
    """Render the chart and create the run on the cluster: its PyTorchJob, ConfigMap, NetworkPolicy, ...

    Every object carries app.kubernetes.io/instance=<name> and is owned by the
    job, so mfrctl delete (or the job's deletion, or its TTL) removes them
    together.  Exit code 0 when created (with --wait: when the job succeeded),
    2 for a usage or config error (nothing is sent), 1 otherwise.
    """
    deadline = None if timeout is None else time.monotonic() + _duration(timeout)
    cluster = _connect(kubeconfig, context, namespace)  # reads the kubeconfig, sends nothing

    def rendered_with(monitoring: bool | None, kind: Api) -> Rendered:
        return render_run(
            name,
            cluster.namespace,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            nproc_per_node=nproc_per_node,
            elastic=elastic,
            image=image,
            config=config,
            checkpoint=checkpoint,
            workspace_claim=workspace_claim,
            queue=queue,
            monitoring=monitoring,
            api=kind.value,
            sets=set_,
            files=values,
        )

    rendered = rendered_with(monitoring, Api.pytorchjob if api == Api.auto else api)  # every usage mistake, unsent
    if api == Api.auto and "elasticPolicy" not in rendered.job["spec"] and _cluster_call(cluster.serves, TRAINER_API):
        rendered = rendered_with(monitoring, Api.trainjob)
    queued = bool(rendered.job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name"))
    failed = [c for c in _cluster_call(preflight, cluster, rendered.job, queue=queued) if c.status == "fail"]
    if failed:
        raise fail(f"{failed[0].detail}: {failed[0].fix}", code=1)
    if monitoring is None and not _mentions_monitoring(set_, values) and _cluster_call(cluster.serves, MONITORING_API):
        rendered = rendered_with(True, Api(rendered.job["kind"].lower()))
        _say(
            "the cluster serves the prometheus-operator's API: the run gets a PodMonitor and a PrometheusRule "
            "(--no-monitoring leaves them out)"
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
        _cluster_call(cluster.wait_for_start, job, deadline=deadline)
        for pod in _cluster_call(cluster.pods, rendered.job, *first_pod(rendered.job)):
            _cluster_call(cluster.follow_log, pod, lambda line: print(line, flush=True))
    state = _cluster_call(cluster.wait, job, lambda state, message: _say(f"{job} {state}", message), deadline=deadline)
    if state not in FINAL_STATES:
        raise fail(f"timed out after {timeout}: {job} is {state} (mfrctl status {job} -n {cluster.namespace})", code=1)
    if state not in SUCCEEDED:
        raise typer.Exit(1)


def _duration(text: str, flag: str = "--timeout") -> float:
    """Seconds in a kubectl-style duration: 90s, 5m, 2h30m, 1.5h."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise fail(f"{flag} {text!r}: expected a duration like 90s, 30m or 2h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _mentions_monitoring(sets: list[str] | None, files: list[Path] | None) -> bool:
    """Did the user choose the monitoring values (then mfrctl does not choose for them)?"""
    return any(s.startswith("monitoring.") for s in sets or []) or any(
        "monitoring" in file_values(path) for path in files or []
    )


def _say(what: str, detail: str = "") -> None:
    err.print(f"mfr: {what}" + (f": {detail}" if detail else ""), highlight=False, markup=False, soft_wrap=True)


def status_cmd(
    name: RunArg,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show a run's state and its pods; -o yaml|json prints the job itself, as kubectl get does."""
    from .kube import job_summary, pod_summary

    cluster = _connect(kubeconfig, context, namespace)
    job = _cluster_call(cluster.get_job, name)
    if output != Output.table:
        print_data(job, output)
        return
    summary = job_summary(job)
    pods = [pod_summary(p) for p in _cluster_call(cluster.pods, job)]
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


def describe_cmd(
    name: RunArg,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Explain a run: its conditions, restarts, each pod's node, phase, exit code and reason, and recent events."""
    from .kube import age, job_summary, pod_summary

    cluster = _connect(kubeconfig, context, namespace)
    job = _cluster_call(cluster.get_job, name)
    summary = job_summary(job)
    pods = [pod_summary(p) for p in _cluster_call(cluster.pods, job)]
    events = _cluster_call(cluster.events, [name, *(p["name"] for p in pods)])
    conditions = (job.get("status") or {}).get("conditions") or []
    restarts = sum(1 for c in conditions if c.get("type") == "Restarting") + sum(p["restarts"] for p in pods)
    report = {
        "job": summary,
        "conditions": conditions,
        "restarts": restarts,
        "pods": pods,
        "events": [
            {
                "object": f"{e['involvedObject'].get('kind', '').lower()}/{e['involvedObject'].get('name')}",
                "type": e.get("type", ""),
                "reason": e.get("reason", ""),
                "message": e.get("message", ""),
                "count": e.get("count", 1),
                "last": e.get("lastTimestamp") or e.get("eventTime") or "",
            }
            for e in events[-20:]
        ],
    }
    if output != Output.table:
        print_data(report, output)
        return
    print(
        f"Name:       {name}\nNamespace:  {summary['namespace']}\nState:      {summary['state']}"
        f"\nMode:       {summary['mode']}\nRestarts:   {restarts}"
    )
    print("Conditions:")
    print_columns(
        ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"],
        [
            [
                c.get("type", ""),
                c.get("status", ""),
                c.get("reason", ""),
                age(c.get("lastTransitionTime", "")),
                c.get("message", ""),
            ]
            for c in conditions
        ]
        or [["-", "", "", "", ""]],
    )
    print("Pods:")
    print_columns(
        ["POD", "REPLICA", "NODE", "PHASE", "RESTARTS", "EXIT CODE", "REASON"],
        [
            [
                p["name"],
                p["replica"],
                p["node"],
                p["phase"],
                str(p["restarts"]),
                "" if p["exit_code"] is None else str(p["exit_code"]),
                p["reason"],
            ]
            for p in pods
        ]
        or [["(none yet)", "", "", "", "", "", ""]],
    )
    print("Events:")
    print_columns(
        ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
        [[age(e["last"]), e["type"], e["reason"], e["object"], e["message"]] for e in report["events"]]
        or [["-", "", "", "", "no recent events"]],
    )


def logs_cmd(
    name: RunArg,
    replica: Annotated[Replica | None, typer.Option(help="Replica type; default: rank 0's pod.")] = None,
    index: Annotated[
        int | None, typer.Option(min=0, help="Replica index (with --replica); default: all of that type.")
    ] = None,
    all_pods: Annotated[bool, typer.Option("--all-pods", help="Every pod of the run, each line prefixed.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the logs until the pods end.")] = False,
    tail: Annotated[int | None, typer.Option(min=0, help="Only the last N lines of each pod.")] = None,
    since: Annotated[str | None, typer.Option(metavar="DURATION", help="Only lines newer than this (5m, 1h).")] = None,
    previous: Annotated[
        bool, typer.Option("--previous", "-p", help="The log of the pod's previous run (before a container restart).")
    ] = False,
    pod_running_timeout: Annotated[
        str, typer.Option(metavar="DURATION", help="With -f: how long to wait for Pending pods to start.")
    ] = "5m",
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the trainer's log of a run's pods; with several pods each line says its pod."""
    import threading

    from .kube import replica_counts, replica_of

    if index is not None and replica is None:
        raise fail("--index needs --replica master|worker|node")
    if all_pods and replica is not None:
        raise fail("--all-pods and --replica choose pods differently: give one")
    if follow and previous:
        raise fail("--previous shows a log that has ended: it cannot be followed")
    since_s = None if since is None else int(_duration(since, "--since"))
    wait_s = _duration(pod_running_timeout, "--pod-running-timeout")
    cluster = _connect(kubeconfig, context, namespace)
    job = _cluster_call(cluster.get_job, name)
    if all_pods:
        chosen, index = None, None
    elif replica is None:
        chosen, index = first_pod(job)
    else:
        chosen = replica.value
        count = replica_counts(job).get(chosen)
        if count is None:
            raise fail(f"{job['kind']} {name} has no {chosen} replicas", code=1)
        if index is not None and index >= count:
            raise fail(f"{job['kind']} {name} has no {chosen} {index}: its {chosen}s are 0..{count - 1}", code=1)
    deadline = time.monotonic() + wait_s
    while True:
        pods = _cluster_call(cluster.pods, job, chosen, index)
        started = [p for p in pods if (p.get("status") or {}).get("phase") not in (None, "Pending")]
        if not follow or (pods and len(started) == len(pods)) or time.monotonic() >= deadline:
            break
        time.sleep(2)
    if not started:
        why = "its pods have not started" if not pods else f"{len(pods)} pod(s) still Pending"
        raise fail(f"no logs of {name} yet: {why} (mfrctl describe {name} -n {cluster.namespace})", code=1)
    prefixed = len(pods) > 1 or all_pods

    def prefix(pod: dict) -> str:
        return f"[{'-'.join(map(str, replica_of(pod)))}] " if prefixed else ""

    if not follow:
        for pod in started:
            text = _cluster_call(cluster.pod_log, pod, tail=tail, since=since_s, previous=previous)
            for line in text.splitlines():
                print(prefix(pod) + line)
        return
    lock = threading.Lock()

    def stream(pod: dict) -> None:
        def emit(line: str) -> None:
            with lock:
                print(prefix(pod) + line, flush=True)

        _cluster_call(cluster.follow_log, pod, emit, tail=tail, since=since_s)

    threads = [threading.Thread(target=stream, args=(pod,), daemon=True) for pod in started]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def delete_cmd(
    name: RunArg,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Delete a run: its job (its controller removes the pods) and every object labelled as the run's."""
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
    """List the runs (PyTorchJobs and TrainJobs of this chart); -o yaml|json prints them as a kubectl List."""
    from .kube import age, job_summary

    cluster = _connect(kubeconfig, context, namespace)
    jobs = _cluster_call(cluster.list_jobs, all_namespaces=all_namespaces)
    if output != Output.table:
        print_data({"apiVersion": "v1", "kind": "List", "items": jobs}, output)
        return
    runs = [job_summary(job) for job in jobs]
    if not runs:
        _say(f"no runs in {'any namespace' if all_namespaces else 'namespace ' + cluster.namespace}")
        return
    print_columns(
        ["NAMESPACE", "NAME", "STATE", "MODE", "PODS", "AGE"],
        [
            [r["namespace"], r["name"], r["state"], r["mode"], str(sum(r["replicas"].values())), age(r["created"])]
            for r in runs
        ],
    )


def doctor_cmd(
    nodes: Annotated[int | None, typer.Option(min=1, help="Pods the run will have.")] = None,
    gpus_per_node: GpusOpt = None,
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", metavar="URI", help="Probe this checkpoint URI (write, read, delete)."),
    ] = None,
    secret: Annotated[
        str | None, typer.Option(metavar="NAME", help="The run's S3 Secret, whose keys the probe uses.")
    ] = None,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Check that a run can start here: the operator's APIs, Kueue and monitoring, GPU nodes, checkpoint
    storage with the run's Secret, the namespace and its Pod Security level.  Exit 0 when it can start, 1 if not."""
    cluster = _connect(kubeconfig, context, namespace)
    # the run's pods, as the chart would render them, for the Pod Security check (storage: the named one, or a stand-in)
    sets = ([f"s3.existingSecret={secret}"] if secret else []) if checkpoint else ["trialStore.enabled=true"]
    rendered = render_run(
        "mfr", cluster.namespace, nodes=nodes, gpus_per_node=gpus_per_node, checkpoint=checkpoint, sets=sets
    )
    checks = [_cluster_call(namespace_check, cluster)]
    if checks[0].status != "fail":
        checks += _cluster_call(api_checks, cluster)
        if nodes and gpus_per_node:
            checks.append(_cluster_call(gpu_check, cluster, nodes, gpus_per_node))
        checks.append(_cluster_call(pod_security_check, cluster, rendered.objects))
        if checkpoint:
            checks.append(_cluster_call(storage_check, cluster, checkpoint, secret))
    if output != Output.table:
        print_data(report(checks), output)
    else:
        print_columns(["CHECK", "STATUS", "DETAIL", "FIX"], [[c.name, c.status, c.detail, c.fix] for c in checks])
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


dashboard_app = typer.Typer(
    help="The Grafana dashboard shared by every run: install it once per cluster (or namespace).",
    no_args_is_help=True,
)


def _dashboard(namespace: str, annotations: list[str] | None) -> dict:
    """The chart's dashboard ConfigMap, for ``namespace``."""
    notes = {}
    for item in annotations or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--annotation {item!r}: expected KEY=VALUE, e.g. grafana_folder=ML")
        notes[key] = value
    values = {
        "nodes": 1,
        "trialStore": {"enabled": False},
        "resources": {"requests": {"cpu": "1"}},
        "monitoring": {"dashboard": {"enabled": True, "namespace": namespace, "annotations": notes}},
    }
    try:
        objects = render(values, name="mfr", namespace=namespace).objects
    except ChartError as e:
        raise fail(str(e)) from None
    return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard"))


@dashboard_app.command("install")
def dashboard_install(
    namespace: NamespaceOpt = None,
    annotation: Annotated[
        list[str] | None, typer.Option(help="Annotation KEY=VALUE, e.g. grafana_folder=ML (repeatable).")
    ] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    dry_run: Annotated[DryRun, typer.Option(help="client: print it; server: the API server checks it.")] = DryRun.none,
) -> None:
    """Create or update the dashboard ConfigMap (mfr-training-dashboard) for Grafana's sidecar.

    It carries grafana_dashboard: "1" and no run's labels: deleting a run never
    removes it.  Put it where the sidecar looks (kube-prometheus-stack: its own
    namespace, unless the sidecar searches all).
    """
    cluster = _connect(kubeconfig, context, namespace)
    board = _dashboard(cluster.namespace, annotation)
    if dry_run == DryRun.client:
        print(Rendered([board], [""], "").to_yaml(), end="")
        return
    _cluster_call(cluster.apply, board, dry_run=dry_run == DryRun.server)
    print(
        f"configmap/{board['metadata']['name']} configured in namespace {cluster.namespace}"
        + (" (server dry run)" if dry_run == DryRun.server else "")
    )


@dashboard_app.command("uninstall")
def dashboard_uninstall(
    namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None, context: ContextOpt = None
) -> None:
    """Delete the shared dashboard ConfigMap (every run's panels go with it)."""
    cluster = _connect(kubeconfig, context, namespace)
    board = _dashboard(cluster.namespace, None)
    if not _cluster_call(cluster.delete_object, board):
        raise fail(f"no dashboard {board['metadata']['name']} in namespace {cluster.namespace}", code=1)
    print(f"configmap/{board['metadata']['name']} deleted")


def add_commands(app: typer.Typer) -> None:
    """Register the Kubernetes commands on mfrctl."""
    app.command("render")(render_cmd)
    app.command("submit")(submit_cmd)
    app.command("status")(status_cmd)
    app.command("describe")(describe_cmd)
    app.command("doctor")(doctor_cmd)
    app.command("logs")(logs_cmd)
    app.command("delete")(delete_cmd)
    app.command("list")(list_cmd)
    app.add_typer(dashboard_app, name="dashboard")
