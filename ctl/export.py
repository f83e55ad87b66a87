"""``mfrctl export``: a committed checkpoint's backbone as a file to ship (ONNX) or to load in torch.

The one place exports are made.  Needs the ``train`` extra, and for ONNX the
``export`` extra (onnx, onnxruntime, onnxscript); imported inside the command.
"""

from __future__ import annotations

import importlib.util
import os
from enum import Enum
from typing import Annotated

import typer

from mfr.trainer.config import ConfigError

from .ckpt import StepOpt, human_size, resolve_checkpoint
from .console import Output, OutputOpt, err, fail, print_data


class Format(str, Enum):
    onnx = "onnx"
    torch = "torch"


def _check_writable(out: str) -> None:
    """A local output must be a file in an existing, writable directory; said before minutes of work."""
    if "://" in out and not out.startswith("file://"):
        return  # remote: the write itself reports
    path = os.path.abspath(out.removeprefix("file://"))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise fail(f"--out {out} is a directory; name the file to write, e.g. {os.path.join(out, 'backbone.onnx')}")
    if not os.path.isdir(folder):
        raise fail(f"--out {out}: the directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise fail(f"--out {out}: the directory {folder} is not writable")


def export(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="A run's checkpoint.uri (its newest committed step) or one step-<N> directory; local or s3://.",
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Output file, local or s3://.")],
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format",
            help="onnx: BatchNorm-folded, verified with onnxruntime, to ship; torch: the plain backbone "
            "state dict (torch.save). Default: torch when --out ends in .pt or .pth, else onnx.",
        ),
    ] = None,
    step: StepOpt = None,
    head: Annotated[
        bool,
        typer.Option(
            "--head", help="--format torch only: also the head (num_classes x embedding, merged from every rank)."
        ),
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Export a committed checkpoint's backbone: ONNX to ship, or torch.

    ONNX: the exporter's default opset (20 with torch 2.13), dynamic batch
    axis; input "images", float32 N x 3 x 112 x 112, RGB normalised as
    (pixel / 255 - 0.5) / 0.5; output "embeddings", N x D.  Every BatchNorm
    after a conv, and the head's into its Linear, is folded.  Before it is
    written, onnxruntime is checked against the torch model on random and on
    synthetic-face inputs: a max |difference| over 1e-4 exits 1, writing
    nothing.  torch: exactly backbone.state_dict(), or with --head
    {"backbone": ..., "head": {"weight": ...}}.  Exit 2 for bad input (no
    such or uncommitted checkpoint, unwritable --out).
    """
    fmt = fmt or (Format.torch if out.lower().endswith((".pt", ".pth")) else Format.onnx)
    needed = ("torch",) if fmt == Format.torch else ("torch", "onnx", "onnxruntime", "onnxscript")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        extras = "train" if fmt == Format.torch else "train,export"
        raise fail(f"mfrctl export --format {fmt.value} needs {', '.join(missing)}: pip install 'mfr[{extras}]'")
    if head and fmt != Format.torch:
        raise fail("--head needs --format torch: the ONNX model is the backbone alone (the head only trains)")
    _check_writable(out)
    info = resolve_checkpoint(source, step)

    from mfr.trainer.export import ExportMismatch, export_checkpoint
    from mfr.trainer.storage import StorageError, open_file

    try:
        summary = export_checkpoint(info, out, fmt.value, with_head=head, open_output=open_file)
    except ConfigError as e:
        raise fail(str(e)) from None
    except (ExportMismatch, StorageError) as e:
        raise fail(str(e), code=1) from None
    if output != Output.table:
        print_data(summary, output)
        return
    model = summary["model"]
    built = (
        f"build_backbone({model['backbone']!r}, layers={model['layers']}, width={model['width']}, "
        f"embedding_size={model['embedding_size']})"
    )
    if fmt == Format.torch:
        detail = f"{summary['tensors']} tensors; load with {built}"
    else:
        diffs = ", ".join(f"{d:.1e} on {name}" for name, d in summary["max_abs_diff"].items())
        detail = f"opset {summary['opset']}, {built} with BatchNorm folded; onnxruntime vs torch: max |diff| {diffs}"
    err.print(
        f"exported step {info.step} of {info.url} to {out} ({fmt.value}, {human_size(summary['bytes'])}): {detail}",
        highlight=False,
        soft_wrap=True,
    )
