"""``mfrctl eval``: verification of a trained backbone on .bin sets, pair lists and galleries, at any scale.

The suite itself is ``mfr.trainer.evalsuite``: galleries and pair lists are
embedded once into fp16 shards (``--embeddings``) and scored from them.  This
module is the command around it: the arguments, the scorer (``scoring``:
``mfr.trainer.score`` here or on ``--nproc`` local ranks), the progress bars,
the table and the exit codes.  Needs the ``train`` extra (torch, numpy,
Pillow, matplotlib), imported inside the command, so the rest of mfrctl works
without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from .console import Output, OutputOpt, err, fail, out, print_data

# Below this many pairs one rank in this process beats starting ranks (a few seconds each).
RANKS_FROM_PAIRS = 100_000_000


def evaluate(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODEL]",
            help="A committed checkpoint step-<N> directory, a checkpoint root (its newest committed step), "
            "or an exported backbone state dict (.pt, torch.save); local or s3://.  Not needed for --embedded.",
        ),
    ] = None,
    bins: Annotated[
        list[str] | None,
        typer.Option(
            "--bin",
            metavar="URL",
            help="insightface verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, ...); repeatable.",
        ),
    ] = None,
    galleries: Annotated[
        list[str] | None,
        typer.Option(
            "--gallery",
            metavar="DATA",
            help="Data set (image folder, RecordIO or shards) whose images are all compared with each other "
            "(or probes with the gallery, --split); any size; repeatable.",
        ),
    ] = None,
    pairs: Annotated[
        list[str] | None,
        typer.Option(
            "--pairs",
            metavar="DATA=LIST",
            help="A data set and a pair list on it: lines 'A B' or 'A B 0|1', A and B sample indices (or paths "
            "in a folder); without the 0|1 column identities decide; repeatable.",
        ),
    ] = None,
    embedded: Annotated[
        list[str] | None,
        typer.Option(
            "--embedded",
            metavar="URL",
            help="Embeddings already written (a set folder of --embeddings, or one folder of fp16 shards): "
            "scored without a model, as its pair list when it holds one (pairs.npy), else as a gallery; repeatable.",
        ),
    ] = None,
    split: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="G",
            help="Galleries: each identity's first G images are its gallery, the others probes, and every probe is "
            "compared with every gallery image; 0: all-vs-all.",
        ),
    ] = 0,
    fprs: Annotated[
        list[float] | None,
        typer.Option("--fpr", metavar="FPR", help="Target FPR (repeatable); default 1e-1 .. 1e-6."),
    ] = None,
    flip: Annotated[
        bool, typer.Option(help="Embed each crop plus its mirror image (insightface's evaluation).")
    ] = True,
    masks: Annotated[
        bool,
        typer.Option(help="Also the masked-unmasked and masked-masked protocols (a mask drawn on each image)."),
    ] = True,
    mask_seed: Annotated[int, typer.Option(min=0, help="Seed of the masks: image i wears the mask of (seed, i).")] = 0,
    folds: Annotated[int, typer.Option(min=2, help="Folds of the .bin accuracy (threshold from the others).")] = 10,
    max_images: Annotated[
        int | None,
        typer.Option(
            min=2, help="Score a seeded sample (--mask-seed) of this many images of each gallery; default all."
        ),
    ] = None,
    embeddings: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="Keep the embeddings here (DIR/<set>/unmasked and masked: fp16 shards, local or s3://): a later "
            "run with the same model and settings scores them without embedding again, and so can "
            "python -m mfr.trainer.score on a cluster.  Default: a temporary folder.",
        ),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Scoring processes (gloo ranks, one BLAS thread each); results are identical for any count.  "
            f"Default: 1 below {RANKS_FROM_PAIRS:,} pairs, else the CPU cores.",
        ),
    ] = None,
    max_kept: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Impostor scores kept per protocol (default 16,777,216: 64 MB); FPRs beyond are "
            "bracketed from a sample (galleries only).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    report: Annotated[str | None, typer.Option(help="Write the JSON report here (local or s3://).")] = None,
    roc: Annotated[str | None, typer.Option(help="Write the ROC plot (PNG) here (local or s3://).")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Verify a backbone: TPR@FPR per masked/unmasked protocol, and insightface's k-fold accuracy on .bin sets.

    Galleries and pair lists are embedded into fp16 shards, then every pair is
    scored tile by tile (exact at every FPR, in bounded memory, on --nproc
    ranks).  An FPR is reported only where the set has enough impostor pairs
    to resolve it (at least 1/FPR); others show n/a.  -o json|yaml prints the
    report without its ROC curves (--report writes them too).  Exit 2 for a
    bad input (a .bin in the wrong format, a missing model), 1 when storage
    or scoring fails.
    """
    missing = [m for m in ("torch", "numpy", "PIL", "fsspec", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(f"mfrctl eval needs {', '.join(missing)}: pip install 'mfr[train]'")
    if not (bins or galleries or pairs or embedded):
        raise fail("nothing to evaluate: give --bin, --gallery, --pairs or --embedded")
    if model is None and (bins or galleries or pairs):
        raise fail("--bin, --gallery and --pairs embed images: give the MODEL")
    if any(not 0 < f < 1 for f in fprs or ()):
        raise fail(f"--fpr must be in (0, 1), got {[f for f in fprs if not 0 < f < 1]}")
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device must be auto, cpu or cuda, got {device!r}")
    pair_sets = []
    for value in pairs or ():
        data_url, _, list_url = value.partition("=")
        if not data_url or not list_url:
            raise fail(f"--pairs takes DATA=LIST (a data set and a pair list on it), got {value!r}")
        pair_sets.append((data_url, list_url))

    from mfr.trainer.config import ConfigError
    from mfr.trainer.evalsuite import EvalRequest, run, write_output
    from mfr.trainer.storage import StorageError
    from mfr.trainer.verification import DEFAULT_FPRS

    request = EvalRequest(
        model=model,
        bins=tuple(bins or ()),
        galleries=tuple(galleries or ()),
        pairs=tuple(pair_sets),
        embedded=tuple(embedded or ()),
        embeddings=embeddings,
        roc=roc,
        fprs=tuple(fprs or DEFAULT_FPRS),
        flip=flip,
        masks=masks,
        mask_seed=mask_seed,
        folds=folds,
        max_images=max_images,
        split=split,
        batch_size=batch_size,
        device=device,
    )
    score = functools.partial(_score, fprs=request.fprs, nproc=nproc, max_kept=max_kept)
    try:
        data = run(request, score, _progress, lambda line: err.print(f"mfr: {line}", highlight=False))
        if report:
            write_output(report, json.dumps(data, indent=1).encode())
            err.print(f"mfr: report written to {report}", highlight=False)
    except ConfigError as e:
        raise fail(str(e)) from None
    except StorageError as e:
        raise fail(str(e), code=1) from None
    for entry in data["sets"]:
        for protocol in entry["protocols"]:
            protocol.pop("roc")
    if output == Output.table:
        out.print(results_table(data))
    else:
        print_data(data, output)


def _score(
    name: str,
    url: str,
    split: int,
    pairs_hint: int,
    *,
    fprs: tuple[float, ...],
    nproc: int | None,
    max_kept: int | None,
) -> dict[str, Any]:
    """Score one embedded set here or on local ranks, with a progress bar; its report entry."""
    from .scoring import ScoringFailed, score_in_process, score_with_ranks

    nproc = nproc or (len(os.sched_getaffinity(0)) if pairs_hint >= RANKS_FROM_PAIRS else 1)
    try:
        with _scoring_progress(name) as progress:
            if nproc == 1:
                entry = score_in_process(url, name, fprs, split, max_kept, progress)
            else:
                with tempfile.TemporaryDirectory(prefix="mfr-score-") as work:
                    entry = score_with_ranks(url, name, fprs, split, max_kept, nproc, Path(work), progress)
    except ScoringFailed as e:
        raise fail(f"{name}: {e}", code=e.code) from None
    scoring = entry["scoring"]
    err.print(
        f"mfr: {name}: {scoring['pairs']:,} pairs scored in {scoring['seconds']:.1f} s "
        f"({scoring['pairs_per_second']:,.0f} pairs/s, {scoring['world_size']} rank(s))",
        highlight=False,
    )
    return entry


@contextlib.contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr; yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"embedding {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("embed", total=total)
        yield lambda n: bar.advance(task, n)


class _PairsPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} pairs/s" if task.speed else "- pairs/s")


@contextlib.contextmanager
def _scoring_progress(name: str) -> Iterator[Callable[[str, int, int], None]]:
    """A transient bar per protocol (pairs, pairs/s, ETA), started at the first report; yields ``progress``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("scoring {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} pairs"),
        _PairsPerSecond(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def progress(protocol: str, done: int, total: int) -> None:
        if protocol not in tasks:
            bar.start()  # only now: ranks are started before the bar's refresh thread exists
            tasks[protocol] = bar.add_task(f"{name} {protocol}", total=total)
        bar.update(tasks[protocol], completed=done, total=total)

    try:
        yield progress
    finally:
        bar.stop()


def results_table(data: dict[str, Any]) -> Table:
    """Rows: set x protocol; columns: pairs, k-fold accuracy where computed, TPR at each resolvable FPR."""
    from mfr.trainer.verification import format_fpr

    fprs = data["fprs"]
    rows = [(entry, protocol) for entry in data["sets"] for protocol in entry["protocols"]]
    shown = [i for i in range(len(fprs)) if any(p["points"][i]["supported"] for _, p in rows)]
    with_accuracy = any("accuracy" in p for _, p in rows)
    model = data["model"]
    step = f" (step {model['step']})" if model is not None and model["step"] is not None else ""
    title = f"TPR @ FPR of {'embeddings' if model is None else model['url']}{step}"
    caption = "n/a: too few impostor pairs to resolve that FPR"
    if with_accuracy:
        caption += "; accuracy: k-fold mean ± std (insightface)"
    table = Table(title=title, caption=caption)
    for name in ("set", "protocol", "genuine/impostor"):
        table.add_column(name)
    if with_accuracy:
        table.add_column("accuracy", justify="right")
    for i in shown:
        table.add_column(format_fpr(fprs[i]), justify="right")
    for entry, protocol in rows:
        cells = [entry["name"], protocol["protocol"], f"{protocol['n_genuine']:,}/{protocol['n_impostor']:,}"]
        if with_accuracy:
            accuracy = protocol.get("accuracy")
            cells.append(f"{accuracy['mean']:.4f}±{accuracy['std']:.4f}" if accuracy else "")
        points = protocol["points"]
        cells += ["n/a" if points[i]["tpr"] is None else f"{points[i]['tpr']:.4f}" for i in shown]
        table.add_row(*cells)
    return table
