"""``mfrctl eval``: verification of a trained backbone on .bin sets, pair lists and galleries.

Needs the ``train`` extra (torch, numpy, Pillow, matplotlib); everything heavy
is imported inside the command, so the rest of mfrctl works without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from .console import Output, OutputOpt, err, fail, out, print_data

def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A committed checkpoint step-<N> directory, a checkpoint root (its newest committed step), "
            "or an exported backbone state dict (.pt, torch.save); local or s3://.",
        ),
    ],
    bins: Annotated[
        Optional[list[str]],
        typer.Option("--bin", metavar="URL", help="insightface verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, ...); repeatable."),
    ] = None,
    galleries: Annotated[
        Optional[list[str]],
        typer.Option(
            "--gallery",
            metavar="DATA",
            help="Data set (image folder, RecordIO or shards) whose images are all compared with each other; "
            "repeatable.",
        ),
    ] = None,
    pairs: Annotated[
        Optional[list[str]],
        typer.Option(
            "--pairs",
            metavar="DATA=LIST",
            help="A data set and a pair list on it: lines 'A B' or 'A B 0|1', A and B sample indices (or paths "
            "in a folder); without the 0|1 column identities decide; repeatable.",
        ),
    ] = None,
    fprs: Annotated[
        Optional[list[float]], typer.Option("--fpr", metavar="FPR", help="Target FPR (repeatable); default 1e-1 .. 1e-6.")
    ] = None,
    flip: Annotated[bool, typer.Option(help="Embed each crop plus its mirror image (insightface's evaluation).")] = True,
    masks: Annotated[
        bool,
        typer.Option(help="Also the masked-unmasked and masked-masked protocols (a mask drawn on each image)."),
    ] = True,
    mask_seed: Annotated[int, typer.Option(min=0, help="Seed of the masks: image i wears the mask of (seed, i).")] = 0,
    folds: Annotated[int, typer.Option(min=2, help="Folds of the .bin accuracy (threshold from the others).")] = 10,
    max_images: Annotated[
        int,
        typer.Option(
            min=2,
            help="A larger gallery is subsampled (seeded by --mask-seed): pairs and memory grow as n^2 "
            "(3000 images: 4.5M same-condition pairs, ~1 GB).",
        ),
    ] = 3000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    report: Annotated[Optional[str], typer.Option(help="Write the JSON report here (local or s3://).")] = None,
    roc: Annotated[Optional[str], typer.Option(help="Write the ROC plot (PNG) here (local or s3://).")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Verify a backbone: TPR@FPR per masked/unmasked protocol, and insightface's k-fold accuracy on .bin sets.

    An FPR is reported only where the set has enough impostor pairs to resolve
    it (at least 1/FPR); others show n/a.  -o json|yaml prints the report
    without its ROC curves (--report writes them too).  Exit 2 for a bad
    input (a .bin in the wrong format, a missing model), 1 when storage fails.
    """
    missing = [m for m in ("torch", "numpy", "PIL", "fsspec", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(f"mfrctl eval needs {', '.join(missing)}: pip install 'mfr[train]'")
    if not (bins or galleries or pairs):
        raise fail("nothing to evaluate: give --bin, --gallery or --pairs")
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
    from mfr.trainer.storage import StorageError
    from mfr.trainer.verification import DEFAULT_FPRS

    try:
        data = _evaluate(model, bins or [], galleries or [], pair_sets, tuple(fprs or DEFAULT_FPRS), flip, masks, mask_seed, folds,
                         max_images, batch_size, device, roc)
    except ConfigError as e:
        raise fail(str(e)) from None
    except StorageError as e:
        raise fail(str(e), code=1) from None
    if report:
        _write(report, json.dumps(data, indent=1).encode())
        err.print(f"mfr: report written to {report}", highlight=False)
    for entry in data["sets"]:
        for protocol in entry["protocols"]:
            protocol.pop("roc")
    if output == Output.table:
        out.print(results_table(data))
    else:
        print_data(data, output)


def _evaluate(
    model_url: str, bins: list[str], galleries: list[str], pairs: list[tuple[str, str]], fprs: tuple[float, ...],
    flip: bool, masks: bool, mask_seed: int, folds: int, max_images: int, batch_size: int, device_name: str,
    roc: str | None,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from mfr.trainer.data.binsets import read_bin
    from mfr.trainer.data.sources import BadSample
    from mfr.trainer.evaluate import Embedder, evaluate_gallery, evaluate_pairs, load_backbone, plot_roc, read_pairs

    from .data import open_dataset

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_name == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA device here")
    # Every input is read and checked before the model: a mistake costs no embedding time.
    binsets = [read_bin(url) for url in bins]
    for binset in binsets:
        if binset.num_pairs < folds:
            raise fail(f"{binset.url}: {binset.num_pairs} pairs cannot make {folds} folds (--folds)")
    pair_lists = []
    for data_url, list_url in pairs:
        _, dataset = open_dataset(data_url)
        pair_lists.append((data_url, list_url, dataset, *read_pairs(list_url, dataset)))
    gallery_sets = [(url, open_dataset(url)[1]) for url in galleries]
    backbone, model_info = load_backbone(model_url)
    embedder = Embedder(backbone, torch.device(device_name), batch_size, flip)

    def embed(what: str, count: int, load):
        try:
            with _progress(what, count) as advance:
                return embedder.embed(count, load, masks, mask_seed, advance)
        except BadSample as e:
            raise fail(f"unreadable image: {e}") from None

    results = []
    for binset in binsets:
        unmasked, masked = embed(binset.name, len(binset.images), binset.image)
        results.append(evaluate_pairs(binset.name, "bin", binset.url, unmasked, masked, binset.first, binset.second,
                                      binset.issame, fprs, folds))
    for data_url, list_url, dataset, first, second, same in pair_lists:
        used = np.unique(np.concatenate([first, second]))
        labels = np.empty(len(used), dtype=np.int64)
        unmasked, masked = embed(list_url, len(used), _loader(dataset, used, labels))
        a, b = np.searchsorted(used, first), np.searchsorted(used, second)
        same = labels[a] == labels[b] if same is None else same
        name = list_url.rstrip("/").rsplit("/", 1)[-1]
        results.append(_checked(list_url, evaluate_pairs, name, "pairs", f"{data_url}={list_url}", unmasked, masked,
                                a, b, same, fprs, 0))
    for url, dataset in gallery_sets:
        used = np.arange(len(dataset))
        if len(used) > max_images:
            used = np.sort(np.random.default_rng(mask_seed).choice(len(used), max_images, replace=False))
            err.print(f"mfr: {url}: {len(dataset)} images, evaluating a seeded sample of {max_images} (--max-images)",
                      highlight=False)
        labels = np.empty(len(used), dtype=np.int64)
        unmasked, masked = embed(url, len(used), _loader(dataset, used, labels))
        name = url.rstrip("/").rsplit("/", 1)[-1]
        results.append(_checked(url, evaluate_gallery, name, url, unmasked, masked, labels, fprs))

    data = {
        "model": model_info,
        "flip": flip,
        "masks": masks,
        "mask_seed": mask_seed,
        "fprs": list(fprs),
        "sets": [r.to_dict() for r in results],
        "roc_plot": roc,
    }
    if roc:
        plot_roc(results, lambda png: _write(roc, png))
        err.print(f"mfr: ROC plot written to {roc}", highlight=False)
    return data


def _loader(dataset, indices, labels):
    """``load(i)``: the decoded image of sample ``indices[i]``, recording its label in ``labels[i]``."""

    def load(i: int):
        image, labels[i] = dataset.load(int(indices[i]))
        return image

    return load


def _checked(source: str, evaluate, *args):
    """A set without genuine or impostor pairs is a data mistake: one line naming it, exit 2."""
    try:
        return evaluate(*args)
    except ValueError as e:
        raise fail(f"{source}: {e}") from None


@contextlib.contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr; yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"embedding {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("embed", total=total)
        yield lambda n: bar.advance(task, n)


def _write(url: str, payload: bytes) -> None:
    from mfr.trainer.storage import open_file

    try:
        with open_file(url, "wb") as f:
            f.write(payload)
    except Exception as e:
        raise fail(f"{url}: cannot write ({type(e).__name__}: {str(e)[:200]})", code=1) from None


def results_table(data: dict[str, Any]) -> Table:
    """Rows: set x protocol; columns: pairs, k-fold accuracy where computed, TPR at each resolvable FPR."""
    from mfr.trainer.verification import format_fpr

    fprs = data["fprs"]
    rows = [(entry, protocol) for entry in data["sets"] for protocol in entry["protocols"]]
    shown = [i for i in range(len(fprs)) if any(p["points"][i]["supported"] for _, p in rows)]
    with_accuracy = any("accuracy" in p for _, p in rows)
    model = data["model"]
    title = f"TPR @ FPR of {model['url']}" + (f" (step {model['step']})" if model["step"] is not None else "")
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
