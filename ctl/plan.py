"""``mfrctl plan``: will a training configuration fit the GPUs, and what to switch on if not.

The arithmetic is ctl/memory_model.py's; this is the command: a TrainConfig
in (a file, ``--set`` overrides and the flags that stand for its settings,
validated by TrainConfig's own rules), a table or JSON/YAML out, and an exit
status a script can test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from mfr.trainer.config import BACKBONE_DEPTHS, ConfigError, TrainConfig, apply_overrides, read_yaml, validate_config

from .console import Output, OutputOpt, fail, print_data
from .memory_model import Plan, PlanError, PlanSpec, format_bytes, parse_memory, plan_memory, suggest

# --- the command ---------------------------------------------------------------------------------

FITS, DOES_NOT_FIT = 0, 3
# The flags that stand for a TrainConfig setting: --batch 64 is --set data.batch_size=64.
CONFIG_FLAGS = {
    "classes": "head.num_classes",
    "embedding": "model.embedding_size",
    "backbone": "model.backbone",
    "layers": "model.layers",
    "width": "model.width",
    "batch": "data.batch_size",
    "sample_rate": "head.sample_rate",
    "precision": "run.amp",
    "zero": "optim.zero",
    "activation_checkpointing": "model.activation_checkpointing",
    "checkpoint_every": "model.checkpoint_every",
    "micro_batches": "optim.micro_batches",
    "optimizer": "optim.name",
}


def _config(path: Path | None, sets: list[str], flags: dict[str, Any]) -> TrainConfig:
    """The TrainConfig planned: the file (else TrainConfig's defaults, not the demo's), then --set, then ``flags``."""
    if "layers" in flags:
        flags = {"backbone": "custom", **flags}
    elif "backbone" in flags:
        flags = {**flags, "layers": None}  # a named backbone replaces the file's custom layers
    overrides = [*sets, *(f"{CONFIG_FLAGS[name]}={json.dumps(value)}" for name, value in flags.items())]
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    head = data.get("head", {})
    if isinstance(head, dict) and "num_classes" not in head:
        raise PlanError("give --classes (or --config with head.num_classes)")
    return validate_config(data)


def _flag_names(message: str, flags: dict[str, Any]) -> str:
    """A config error in the words the user typed: ``--batch (6) must be divisible by --micro-batches (4)``."""
    for name in flags:
        message = re.sub(rf"(?<![\w.]){re.escape(CONFIG_FLAGS[name])}(?!\w)", "--" + name.replace("_", "-"), message)
    return message


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").strip("[]").split(",")]
    except ValueError:
        raise PlanError(f"--layers {text!r}: expected 4 stage depths, e.g. 3,25,88,3") from None


def _table(result: Plan) -> None:
    from rich.table import Table

    from .console import out

    spec = result.spec
    arch = spec.architecture()
    name = spec.backbone if spec.layers is None else f"custom {list(arch.layers)}"
    table = Table(
        title=f"Per-GPU memory at the peak ({result.peak_moment}): {spec.nodes} x {spec.gpus_per_node} GPUs, "
        f"{name}, batch {spec.batch}/GPU",
        caption=f"head shard: {result.classes_per_gpu:,} of {spec.classes:,} classes per GPU"
        + (f", {result.sampled_classes:,} sampled per step" if result.sampled_classes < result.classes_per_gpu else ""),
    )
    for column, justify in (("part", "left"), ("item", "left"), ("memory", "right"), ("what", "left")):
        table.add_column(column, justify=justify)
    for item in result.items:
        table.add_row(item.part, item.name, format_bytes(item.bytes), item.detail)
    table.add_section()
    table.add_row("", "[bold]peak[/]", f"[bold]{format_bytes(result.peak)}[/]", "")
    table.add_row("", "reserve", format_bytes(spec.reserve), "CUDA context, NCCL and cuDNN workspaces (--reserve)")
    table.add_row("", "GPU memory", format_bytes(spec.gpu_memory), "")
    verdict = "[green]fits[/]" if result.fits else "[red]does not fit[/]"
    table.add_row("", "headroom", format_bytes(result.headroom), verdict)
    out.print(table)
    if result.suggestions:
        hints = Table(title="What to switch on (each checked with the planner)")
        for column in ("set", "peak", "fits"):
            hints.add_column(column)
        for hint in result.suggestions:
            change = " ".join(f"{k}={v}" for k, v in hint["set"].items())
            hints.add_row(change, format_bytes(hint["peak_bytes"]), "yes" if hint["fits"] else "no")
        out.print(hints)


def plan(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Start from this TrainConfig YAML; flags override it.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting, e.g. --set head.sample_rate=0.1 (repeatable); flags win."),
    ] = None,
    nodes: Annotated[int, typer.Option(help="Nodes (pods).")] = 1,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node.")] = 1,
    gpu_memory: Annotated[
        str, typer.Option(help="Memory of one GPU: 80GiB, 80Gi (binary) or 32GB (decimal).")
    ] = "80GiB",
    reserve: Annotated[
        str, typer.Option(help="Per-GPU memory not available to tensors (CUDA context, NCCL, cuDNN).")
    ] = "1.5GiB",
    classes: Annotated[int | None, typer.Option(help="Identities (head.num_classes).")] = None,
    embedding: Annotated[int | None, typer.Option(help="Embedding size (model.embedding_size).")] = None,
    backbone: Annotated[
        str | None, typer.Option(help=f"iResNet: {', '.join(BACKBONE_DEPTHS)} or custom (with --layers).")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Stage depths of a custom backbone, e.g. 3,25,88,3.")] = None,
    width: Annotated[float | None, typer.Option(help="Channel multiplier (model.width).")] = None,
    batch: Annotated[int | None, typer.Option(help="Samples per GPU and step (data.batch_size).")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="Partial FC class sampling (head.sample_rate).")] = None,
    precision: Annotated[str | None, typer.Option(help="none, bf16 or fp16 (run.amp).")] = None,
    zero: Annotated[int | None, typer.Option(help="0, 2 or 3 (optim.zero).")] = None,
    activation_checkpointing: Annotated[
        str | None, typer.Option(help="none, stage or block (model.activation_checkpointing).")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Blocks per recomputed segment (block).")] = None,
    micro_batches: Annotated[int | None, typer.Option(help="Micro-batches per step (optim.micro_batches).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adamw (optim.name).")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Predict the peak memory per GPU of a training configuration, and whether it fits.

    Itemises the backbone (parameters, gradients, optimizer state,
    activations) and this GPU's head shard (weights, gradient, momentum,
    logits and softmax buffers, all-gathered embeddings).  When it does not
    fit, lists switches that lower the peak, each checked with the planner.
    The configuration is a TrainConfig, validated as mfrctl train does:
    --config FILE (else TrainConfig's defaults), then --set key=value, then
    the flags below that stand for its settings.

    Exit status: 0 it fits, 3 it does not fit, 2 impossible input; so a
    script can run `mfrctl plan ... -o json >/dev/null && submit`.
    """
    given = {
        "classes": classes,
        "embedding": embedding,
        "backbone": backbone,
        "width": width,
        "batch": batch,
        "sample_rate": sample_rate,
        "precision": precision,
        "zero": zero,
        "activation_checkpointing": activation_checkpointing,
        "checkpoint_every": checkpoint_every,
        "micro_batches": micro_batches,
        "optimizer": optimizer,
        "layers": layers,
    }
    flags = {name: value for name, value in given.items() if value is not None}
    try:
        if layers is not None:
            flags["layers"] = _parse_layers(layers)
        spec = PlanSpec.from_config(
            _config(config, set_ or [], flags),
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            gpu_memory=parse_memory(gpu_memory),
            reserve=_parse_reserve(reserve),
        )
        result = plan_memory(spec)
    except (PlanError, ConfigError) as e:
        raise fail(_flag_names(str(e), flags)) from None
    if not result.fits:
        result.suggestions = suggest(spec)
    if output == Output.table:
        _table(result)
    else:
        print_data(result.to_dict(), output)
    raise typer.Exit(FITS if result.fits else DOES_NOT_FIT)


def _parse_reserve(text: str) -> int:
    if text.strip() in ("0", "0B"):
        return 0
    try:
        return parse_memory(text)
    except PlanError:
        raise PlanError(f"--reserve {text!r}: expected a size with a unit, e.g. 1.5GiB, or 0") from None
