"""``mfrctl ckpt``: list and inspect a run's checkpoints, on any fsspec URL.

Listing reads only the commit markers (no torch needed); inspecting adds
the tensor shapes when torch is installed.  Exports are ``mfrctl export``.
"""

from __future__ import annotations

import datetime
import importlib.util
from typing import Annotated, Any

import typer

from mfr.trainer.config import ConfigError
from mfr.trainer.storage import CheckpointInfo, Storage, StorageError, find_checkpoint

from .console import Output, OutputOpt, err, fail, print_columns, print_data

ckpt_app = typer.Typer(help="List and inspect checkpoints (local paths or s3://).", no_args_is_help=True)

UriArg = Annotated[
    str, typer.Argument(metavar="URI", help="A run's checkpoint.uri, e.g. s3://bucket/runs/r1/checkpoints.")
]


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


def _exists(storage: Storage) -> bool:
    try:
        return storage.exists()
    except StorageError as e:
        raise fail(str(e), code=1) from None


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def human_size(n: int | None) -> str:
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
    storage = _storage(uri)
    found = _list(storage)
    if not found and not _exists(storage):
        raise fail(f"{uri}: no such folder (or prefix)")
    if output != Output.table:
        print_data([_summary(c) for c in found], output)
        return
    if not found:
        err.print(f"no checkpoints under {uri}", highlight=False, soft_wrap=True)
        return
    newest = max((c.step for c in found if c.committed), default=None)
    rows = [
        [
            c.name,
            str(c.step),
            "yes (newest)" if c.step == newest else ("yes" if c.committed else "no"),
            _when(c.time),
            str(c.world_size or "-"),
            human_size(c.bytes),
        ]
        for c in found
    ]
    print_columns(["NAME", "STEP", "COMMITTED", "TIME (UTC)", "WORLD SIZE", "SIZE"], rows)


def resolve_checkpoint(uri: str, step: int | None, committed: bool = True) -> CheckpointInfo:
    """``storage.find_checkpoint`` with its mistakes as one line (exit 2) and storage failures as exit 1."""
    try:
        return find_checkpoint(uri, step, committed=committed)
    except ConfigError as e:
        raise fail(str(e)) from None
    except StorageError as e:
        raise fail(str(e), code=1) from None


StepOpt = Annotated[int | None, typer.Option(help="Which step (default: the newest committed one).")]


@ckpt_app.command("inspect")
def ckpt_inspect(uri: UriArg, step: StepOpt = None, output: OutputOpt = Output.yaml) -> None:
    """Show one checkpoint: its record and the training config it was written with."""
    info = resolve_checkpoint(uri, step, committed=False)
    data = info.to_dict()
    if importlib.util.find_spec("torch") is not None:
        from mfr.trainer.checkpoint_reader import CheckpointRefused, tensor_shapes

        try:
            data["tensors"] = tensor_shapes(info.url)
        except CheckpointRefused as e:  # code or impossible shapes in the metadata: nothing is shown from it
            raise fail(str(e)) from None
        except Exception as e:  # a corrupt or half-written directory: show what there is
            data["tensors"] = f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    print_data(data, Output.json if output == Output.json else Output.yaml)
