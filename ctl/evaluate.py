"""``mfrctl eval``: verification of a trained backbone on .bin sets, pair lists and galleries, at any scale.

Needs the ``train`` extra (torch, numpy, Pillow, matplotlib); everything heavy
is imported inside the command, so the rest of mfrctl works without it.
Galleries and pair lists are embedded once into fp16 shards (``--embeddings``)
and scored from them by ``mfr.trainer.score`` (``scoring``): exact TPR@FPR in
bounded memory, on ``--nproc`` local ranks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from .console import Output, OutputOpt, err, fail, out, print_data

# Below this many pairs one rank in this process beats starting ranks (a few seconds each).
RANKS_FROM_PAIRS = 100_000_000


def evaluate(
    model: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[MODEL]",
            help="A committed checkpoint step-<N> directory, a checkpoint root (its newest committed step), "
            "or an exported backbone state dict (.pt, torch.save); local or s3://.  Not needed for --embedded.",
        ),
    ] = None,
    bins: Annotated[
        Optional[list[str]],
        typer.Option(
            "--bin", metavar="URL",
            help="insightface verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, ...); repeatable.",
        ),
    ] = None,
    galleries: Annotated[
        Optional[list[str]],
        typer.Option(
            "--gallery",
            metavar="DATA",
            help="Data set (image folder, RecordIO or shards) whose images are all compared with each other "
            "(or probes with the gallery, --split); any size; repeatable.",
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
    embedded: Annotated[
        Optional[list[str]],
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
            min=0, metavar="G",
            help="Galleries: each identity's first G images are its gallery, the others probes, and every probe is "
            "compared with every gallery image; 0: all-vs-all.",
        ),
    ] = 0,
    fprs: Annotated[
        Optional[list[float]],
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
        Optional[int],
        typer.Option(
            min=2, help="Score a seeded sample (--mask-seed) of this many images of each gallery; default all."
        ),
    ] = None,
    embeddings: Annotated[
        Optional[str],
        typer.Option(
            metavar="DIR",
            help="Keep the embeddings here (DIR/<set>/unmasked and masked: fp16 shards, local or s3://): a later "
            "run with the same model and settings scores them without embedding again, and so can "
            "python -m mfr.trainer.score on a cluster.  Default: a temporary folder.",
        ),
    ] = None,
    nproc: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Scoring processes (gloo ranks, one BLAS thread each); results are identical for any count.  "
            f"Default: 1 below {RANKS_FROM_PAIRS:,} pairs, else the CPU cores.",
        ),
    ] = None,
    max_kept: Annotated[
        Optional[int],
        typer.Option(min=1, help="Impostor scores kept per protocol (default 16,777,216: 64 MB); FPRs beyond are "
                     "bracketed from a sample (galleries only)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    report: Annotated[Optional[str], typer.Option(help="Write the JSON report here (local or s3://).")] = None,
    roc: Annotated[Optional[str], typer.Option(help="Write the ROC plot (PNG) here (local or s3://).")] = None,
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
    from mfr.trainer.storage import StorageError
    from mfr.trainer.verification import DEFAULT_FPRS

    settings = _Settings(tuple(fprs or DEFAULT_FPRS), flip, masks, mask_seed, folds, max_images, split, nproc,
                         max_kept, batch_size, device)
    try:
        with _embeddings_root(embeddings) as root:
            data = _evaluate(model, bins or [], galleries or [], pair_sets, embedded or [], root, settings, roc)
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


class _Settings:
    """The command's settings that every set shares."""

    def __init__(self, fprs: tuple[float, ...], flip: bool, masks: bool, mask_seed: int, folds: int,
                 max_images: int | None, split: int, nproc: int | None, max_kept: int | None, batch_size: int,
                 device: str):
        self.fprs, self.flip, self.masks, self.mask_seed, self.folds = fprs, flip, masks, mask_seed, folds
        self.max_images, self.split, self.nproc, self.max_kept = max_images, split, nproc, max_kept
        self.batch_size, self.device = batch_size, device


@contextlib.contextmanager
def _embeddings_root(url: str | None) -> Iterator[str]:
    """``--embeddings``, or a temporary folder removed afterwards."""
    if url is not None:
        yield url.rstrip("/")
        return
    with tempfile.TemporaryDirectory(prefix="mfr-eval-") as tmp:
        yield tmp


def _evaluate(
    model_url: str | None, bins: list[str], galleries: list[str], pairs: list[tuple[str, str]], embedded: list[str],
    root: str, settings: _Settings, roc: str | None,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from mfr.trainer.data.binsets import read_bin
    from mfr.trainer.data.sources import BadSample, open_dataset
    from mfr.trainer.evaluate import Embedder, evaluate_pairs, load_backbone, read_pairs
    from mfr.trainer.features import Features
    from mfr.trainer.rocplot import plot_roc
    from mfr.trainer.score import embedding_folders

    device_name = settings.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_name == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA device here")
    # Every input is read and checked before the model: a mistake costs no embedding time.
    binsets = [read_bin(url) for url in bins]
    for binset in binsets:
        if binset.num_pairs < settings.folds:
            raise fail(f"{binset.url}: {binset.num_pairs} pairs cannot make {settings.folds} folds (--folds)")
    pair_lists = []
    for data_url, list_url in pairs:
        _, dataset = open_dataset(data_url)
        pair_lists.append((data_url, list_url, dataset, *read_pairs(list_url, dataset)))
    gallery_sets = [(url, open_dataset(url)[1]) for url in galleries]
    embedded_sizes = [Features(embedding_folders(url)[0]).count for url in embedded]
    names = _Names()
    model_info: dict[str, Any] | None = None
    embedder = None
    if model_url is not None:
        backbone, model_info = load_backbone(model_url)
        embedder = Embedder(backbone, torch.device(device_name), settings.batch_size, settings.flip)

    def embed_set(name: str, meta: dict[str, Any], count: int, load) -> str:
        """The set's embeddings under ``root``: reused when written before with the same settings."""
        url = f"{root}/{name}"
        meta = {**meta, "model": model_info, "flip": settings.flip, "masks": settings.masks,
                "mask_seed": settings.mask_seed, "images": int(count)}
        if _written_with(url, meta):
            err.print(f"mfr: {name}: reusing the embeddings in {url}", highlight=False)
            return url
        try:
            with _progress(name, count) as advance:
                embedder.embed_to_shards(count, load, settings.masks, settings.mask_seed, url, meta, advance)
        except BadSample as e:
            raise fail(f"unreadable image: {e}") from None
        return url

    results = []
    for binset in binsets:
        unmasked, masked = embedder.embed(len(binset.images), binset.image, settings.masks, settings.mask_seed)
        results.append(evaluate_pairs(binset.name, "bin", binset.url, unmasked, masked, binset.first, binset.second,
                                      binset.issame, settings.fprs, settings.folds).to_dict())
    to_score: list[tuple[str, str, int, int]] = []  # name, embeddings, split, pairs
    for data_url, list_url, dataset, first, second, same in pair_lists:
        used = np.unique(np.concatenate([first, second]))
        name = names.take(list_url.rstrip("/").rsplit("/", 1)[-1])
        url = embed_set(name, {"kind": "pairs", "data": f"{data_url}={list_url}"}, len(used),
                        _loader(dataset, used))
        rows = [np.searchsorted(used, first), np.searchsorted(used, second)]
        if same is not None:
            rows.append(same.astype(np.int64))
        _write_pairs(f"{url}/pairs.npy", np.stack(rows, axis=1))
        to_score.append((name, url, 0, len(first)))
    for url, dataset in gallery_sets:
        used = np.arange(len(dataset))
        if settings.max_images is not None and len(used) > settings.max_images:
            used = np.sort(np.random.default_rng(settings.mask_seed).choice(len(used), settings.max_images,
                                                                            replace=False))
            err.print(f"mfr: {url}: {len(dataset)} images, evaluating a seeded sample of {len(used)} (--max-images)",
                      highlight=False)
        name = names.take(url.rstrip("/").rsplit("/", 1)[-1])
        meta = {"kind": "gallery", "data": url, "max_images": settings.max_images}
        to_score.append((name, embed_set(name, meta, len(used), _loader(dataset, used)), settings.split,
                         _pairs_hint(len(used))))
    for url, size in zip(embedded, embedded_sizes):
        to_score.append((names.take(url.rstrip("/").rsplit("/", 1)[-1]), url, settings.split, _pairs_hint(size)))
    for name, url, split, hint in to_score:
        results.append(_score(name, url, split, hint, settings))

    data = {
        "model": model_info,
        "flip": settings.flip,
        "masks": settings.masks,
        "mask_seed": settings.mask_seed,
        "fprs": list(settings.fprs),
        "split": settings.split,
        "sets": results,
        "roc_plot": roc,
    }
    if roc:
        plot_roc(results, lambda png: _write(roc, png))
        err.print(f"mfr: ROC plot written to {roc}", highlight=False)
    return data


def _pairs_hint(images: int) -> int:
    """About how many pairs a set of ``images`` has (all-vs-all, one protocol): picks the rank count."""
    return images * (images - 1) // 2


def _score(name: str, url: str, split: int, pairs_hint: int, settings: _Settings) -> dict[str, Any]:
    """Score one embedded set here or on local ranks, with a progress bar; its report entry."""
    from .scoring import ScoringFailed, score_in_process, score_with_ranks

    nproc = settings.nproc or (len(os.sched_getaffinity(0)) if pairs_hint >= RANKS_FROM_PAIRS else 1)
    try:
        with _scoring_progress(name) as progress:
            if nproc == 1:
                entry = score_in_process(url, name, settings.fprs, split, settings.max_kept, progress)
            else:
                with tempfile.TemporaryDirectory(prefix="mfr-score-") as work:
                    entry = score_with_ranks(url, name, settings.fprs, split, settings.max_kept, nproc, Path(work),
                                             progress)
    except ScoringFailed as e:
        raise fail(f"{name}: {e}", code=e.code) from None
    scoring = entry["scoring"]
    err.print(f"mfr: {name}: {scoring['pairs']:,} pairs scored in {scoring['seconds']:.1f} s "
              f"({scoring['pairs_per_second']:,.0f} pairs/s, {scoring['world_size']} rank(s))", highlight=False)
    return entry


def _written_with(url: str, meta: dict[str, Any]) -> bool:
    """Does ``url`` hold finished embeddings of exactly these settings?  Other ones there are a mistake (exit 2)."""
    from mfr.trainer.config import ConfigError
    from mfr.trainer.features import Features

    try:
        written = Features(f"{url}/unmasked").index.get("eval", {})
    except ConfigError:
        return False
    written = {k: v for k, v in written.items() if k != "condition"}
    wanted = json.loads(json.dumps(meta))  # as index.json holds it
    if written == wanted:
        return True
    differ = ", ".join(f"{k} {written.get(k)!r} there" for k in wanted if written.get(k) != wanted[k])
    raise fail(f"{url} holds other embeddings ({differ}); choose another --embeddings folder or remove it")


class _Names:
    """Set names as folder names: the last part of a URL, made unique."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def take(self, name: str) -> str:
        unique, n = name, 1
        while unique in self.taken:
            n += 1
            unique = f"{name}-{n}"
        self.taken.add(unique)
        return unique


def _loader(dataset, indices):
    """``load(i)``: the decoded image and the label of sample ``indices[i]``."""

    def load(i: int):
        return dataset.load(int(indices[i]))

    return load


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

    bar = Progress(TextColumn("scoring {task.description}"), BarColumn(),
                   TextColumn("{task.completed:,.0f}/{task.total:,.0f} pairs"), _PairsPerSecond(),
                   TimeRemainingColumn(), console=err, transient=True)
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


def _write(url: str, payload: bytes) -> None:
    from mfr.trainer.storage import open_file

    try:
        with open_file(url, "wb") as f:
            f.write(payload)
    except Exception as e:
        raise fail(f"{url}: cannot write ({type(e).__name__}: {str(e)[:200]})", code=1) from None


def _write_pairs(url: str, pairs) -> None:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, pairs)
    _write(url, buffer.getvalue())


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
