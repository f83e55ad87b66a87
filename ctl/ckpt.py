"""``mfrctl ckpt``: list, inspect and export a run's checkpoints, on any fsspec URL.

Listing and inspecting read only the commit markers (no torch needed);
exporting reads the tensors and needs the ``train`` extra.
"""

from __future__ import annotations

import datetime
import importlib.util
from typing import Annotated, Any, Optional

import typer
from mfr.trainer.storage import CheckpointInfo, Storage, StorageError, open_file

from .console import Output, OutputOpt, err, fail, print_columns, print_data

ckpt_app = typer.Typer(help="List, inspect and export checkpoints (local paths or s3://).", no_args_is_help=True)

UriArg = Annotated[str, typer.Argument(metavar="URI", help="A run's checkpoint.uri, e.g. s3://bucket/runs/r1/checkpoints.")]


def _storage(uri: str) -> Storage:
    try:
        return Storage(uri)
    except StorageError as e:
        raise fail(str(e)) from None


def _list(storage: Storage) -> list[CheckpointInfo]:
    try:
        return storage.checkpoints()
    except StorageError as e:
        raise fail(str(e), code=1) from None


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _summary(info: CheckpointInfo) -> dict[str, Any]:
    data = info.to_dict()
    data.pop("config")
    return data


@ckpt_app.command("ls")
def ckpt_ls(uri: UriArg, output: OutputOpt = Output.table) -> None:
    """List checkpoints: step, time, size, world size, committed or not.

    Only committed checkpoints are ever loaded; an uncommitted one is an
    interrupted save (or one being written now).
    """
    found = _list(_storage(uri))
    if output != Output.table:
        print_data([_summary(c) for c in found], output)
        return
    if not found:
        err.print(f"no checkpoints under {uri}", highlight=False)
        return
    newest = max((c.step for c in found if c.committed), default=None)
    rows = [
        [
            c.name, str(c.step), "yes (newest)" if c.step == newest else ("yes" if c.committed else "no"),
            _when(c.time), str(c.world_size or "-"), _size(c.bytes),
        ]
        for c in found
    ]
    print_columns(["NAME", "STEP", "COMMITTED", "TIME (UTC)", "WORLD SIZE", "SIZE"], rows)


def _resolve(uri: str, step: int | None) -> CheckpointInfo:
    """A step directory URI, or a root plus --step, or the root's newest committed checkpoint."""
    root, _, name = uri.rstrip("/").rpartition("/")
    if step is None and name.startswith("step-") and root:
        found = [c for c in _list(_storage(root)) if c.name == name]
        if not found:
            raise fail(f"no checkpoint {name} under {root}")
        return found[0]
    found = _list(_storage(uri))
    if step is not None:
        chosen = [c for c in found if c.step == step]
        if not chosen:
            raise fail(f"no checkpoint of step {step} under {uri} (mfrctl ckpt ls {uri})")
        return chosen[0]
    committed = [c for c in found if c.committed]
    if not committed:
        raise fail(f"no committed checkpoint under {uri} (mfrctl ckpt ls {uri})")
    return committed[-1]


StepOpt = Annotated[Optional[int], typer.Option(help="Which step (default: the newest committed one).")]


@ckpt_app.command("inspect")
def ckpt_inspect(uri: UriArg, step: StepOpt = None, output: OutputOpt = Output.yaml) -> None:
    """Show one checkpoint: its record and the training config it was written with."""
    info = _resolve(uri, step)
    data = info.to_dict()
    if importlib.util.find_spec("torch") is not None:
        from mfr.trainer.export import tensor_shapes

        try:
            data["tensors"] = tensor_shapes(info.url)
        except Exception as e:  # a corrupt or half-written directory: show what there is
            data["tensors"] = f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    print_data(data, Output.json if output == Output.json else Output.yaml)


@ckpt_app.command("export")
def ckpt_export(
    uri: UriArg,
    out_file: Annotated[str, typer.Option("--out", help="Output file, local or s3:// (torch.save format).")],
    step: StepOpt = None,
    head: Annotated[bool, typer.Option("--head", help="Also export the full head (num_classes x embedding).")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Export the backbone as one plain state dict for inference (``--head``: the head too).

    Without --head the file is exactly ``backbone.state_dict()``; with it,
    ``{"backbone": ..., "head": {"weight": ...}}``, the head's rows merged from
    every rank's shard.
    """
    if importlib.util.find_spec("torch") is None:
        raise fail("mfrctl ckpt export reads the tensors, which needs torch: pip install 'mfr[train]'")
    info = _resolve(uri, step)
    if not info.committed:
        raise fail(f"{info.url} is not committed (an interrupted save); export a committed step (mfrctl ckpt ls)")
    from mfr.trainer.export import export_checkpoint

    try:
        summary = export_checkpoint(info, out_file, with_head=head, open_output=open_file)
    except StorageError as e:
        raise fail(str(e), code=1) from None
    if output != Output.table:
        print_data(summary, output)
        return
    model = summary["model"]
    err.print(
        f"exported step {info.step} of {info.url} to {out_file}: {summary['tensors']} tensors, "
        f"{_size(summary['bytes'])}; load with build_backbone({model['backbone']!r}, "
        f"layers={model['layers']}, width={model['width']}, embedding_size={model['embedding_size']})",
        highlight=False,
    )
