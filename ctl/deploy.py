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

from .chart import ChartError, Rendered, file_values, flag_values, merge, render, set_values
from .console import fail


class Format(str, Enum):
    yaml = "yaml"
    json = "json"


NameOpt = Annotated[str, typer.Option("--name", help="The run: its PyTorchJob's name (pods are <name>-worker-<i>).")]
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
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Set a chart value, as helm --set: --set gang.enabled=true, --set train.run.steps=500."),
]
ValuesOpt = Annotated[
    Optional[list[Path]], typer.Option("--values", "-f", help="A values YAML file, as helm -f (repeatable).")
]


def render_run(
    name: str,
    namespace: str,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    nproc_per_node: int | None = None,
    elastic: str | None = None,
    image: str | None = None,
    config: Path | None = None,
    sets: list[str] | None = None,
    files: list[Path] | None = None,
) -> Rendered:
    """Chart defaults < -f files < flags < --set, as helm layers -f under --set."""
    try:
        values: dict = {}
        for path in files or []:
            values = merge(values, file_values(path))
        flags = flag_values(
            nodes=nodes, gpus_per_node=gpus_per_node, nproc_per_node=nproc_per_node,
            elastic=elastic, image=image, config=config,
        )
        values = merge(values, flags)
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
    set_: SetOpt = None,
    values: ValuesOpt = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="Output format.")] = Format.yaml,
) -> None:
    """Print a run's Kubernetes objects (PyTorchJob, ConfigMap, ...) from the Helm chart; no cluster needed."""
    rendered = render_run(
        name, namespace, nodes=nodes, gpus_per_node=gpus_per_node, nproc_per_node=nproc_per_node,
        elastic=elastic, image=image, config=config, sets=set_, files=values,
    )
    if output == Format.json:
        print(json.dumps(rendered.to_list(), indent=2))
    else:
        print(rendered.to_yaml(), end="")


def add_commands(app: typer.Typer) -> None:
    """Register the Kubernetes commands on mfrctl."""
    app.command("render")(render_cmd)
