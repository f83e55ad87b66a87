"""``mfrctl distill extract``: precompute a teacher's embeddings for offline distillation.

Needs the ``train`` extra (torch); the imports happen inside the command.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated

import typer

from mfr.trainer.config import ConfigError, load_config

from .console import Output, OutputOpt, err, fail, print_data

distill_app = typer.Typer(help="Feature distillation from a larger teacher.", no_args_is_help=True)


@distill_app.command("extract")
def extract(
    teacher: Annotated[
        str, typer.Option(help="Teacher checkpoint: a committed .../step-<N>, or a checkpoint root (its newest).")
    ],
    out: Annotated[str, typer.Option(help="Folder or s3:// prefix for the feature shards and index.json.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TrainConfig of the student run: its data, and distill.teacher's architecture."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting, e.g. --set distill.teacher.backbone=r100.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per teacher forward.")] = 256,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes.")] = 2,
    shard_rows: Annotated[int, typer.Option(min=1, help="Embeddings per .npy shard.")] = 65536,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    output: OutputOpt = Output.table,
) -> None:
    """Embed every training sample once with the teacher, in the data's sample-index order.

    The samples are taken unaugmented (no mask, no mirror).  Writes fp16 .npy shards of
    embeddings and int32 labels plus index.json (count, embedding size, data, teacher step);
    train with distill.mode=offline and distill.features=OUT.  Exit 2 on a usage error
    (e.g. a checkpoint that does not match distill.teacher), 1 when storage fails.
    """
    if importlib.util.find_spec("torch") is None:
        raise fail("mfrctl distill extract runs the teacher, which needs torch: pip install 'mfr[train]'")
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mfr.trainer.distill import extract as run_extract
    from mfr.trainer.storage import StorageError

    try:
        cfg = load_config(config, [*(set_ or []), f"distill.teacher.checkpoint={json.dumps(teacher)}"])
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
        use = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        bar = Progress(
            TextColumn("extracting"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        task = bar.add_task("extract", total=None)

        def on_batch(done: int, total: int) -> None:
            bar.start()  # at the first batch: a bad teacher or output is reported without a bar
            bar.update(task, completed=done, total=total)

        try:
            index = run_extract(cfg, out, batch_size, workers, shard_rows, use, on_batch=on_batch)
        finally:
            bar.stop()
    except ConfigError as e:
        raise fail(str(e)) from None
    except StorageError as e:
        raise fail(str(e), code=2 if e.permanent else 1) from None
    except OSError as e:
        raise fail(f"{out}: cannot write ({type(e).__name__}: {str(e)[:200]})", code=1) from None
    summary = {k: index[k] for k in ("count", "embedding_size", "data", "teacher")} | {
        "shards": len(index["shards"]),
        "out": out,
    }
    if output != Output.table:
        print_data(summary, output)
        return
    err.print(
        f"wrote {index['count']} teacher embeddings ({index['embedding_size']}-d, {len(index['shards'])} shard(s)) "
        f"of step {index['teacher']['step']} to {out}",
        highlight=False,
    )
