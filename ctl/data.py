"""``mfrctl data``: pack image folders or RecordIO into tar shards, and inspect any data set.

Both read local paths or s3:// URLs (credentials from the AWS_* environment, endpoint
from AWS_ENDPOINT_URL).  They need the ``train`` extra (numpy, Pillow, torch); the
imports happen inside the commands, so the rest of mfrctl works without it.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Annotated, Any

import typer

from .console import Output, OutputOpt, err, fail, print_columns, print_data

data_app = typer.Typer(
    help="Pack and inspect training data (image folders, RecordIO, tar shards).", no_args_is_help=True
)


def _need_train_extra() -> None:
    missing = [m for m in ("numpy", "PIL", "torch", "fsspec") if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(f"mfrctl data needs {', '.join(missing)}: pip install 'mfr[train]'")


def _open_dataset(uri: str):
    """``sources.open_dataset``: the kind and the data set at ``uri``; a bad URI is one line, exit 2."""
    from mfr.trainer.config import ConfigError
    from mfr.trainer.data.sources import open_dataset

    try:
        return open_dataset(uri)
    except ConfigError as e:
        raise fail(str(e)) from None


def _class_names(kind: str, dataset, labels: list[int]) -> list[str]:
    if kind in ("folder", "shards"):
        return list(dataset.classes)
    return [str(i) for i in range(max(dataset.num_identities, max(labels, default=-1) + 1))]


@data_app.command("pack")
def pack(
    src: Annotated[str, typer.Argument(help="Image folder (one sub-folder per identity) or RecordIO .rec/folder.")],
    dst: Annotated[str, typer.Argument(help="Folder or s3:// prefix for the shards and index.json.")],
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per shard.")] = 10000,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Shards written in parallel.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the global shuffle before sharding.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every skipped sample and why.")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Convert an image folder or a RecordIO pair into WebDataset tar shards plus index.json.

    Every image is decoded while it is packed: one that does not decode, is larger than a face crop
    needs, or (in a folder) resolves outside the folder is skipped and counted (-v lists them).
    """
    _need_train_extra()
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mfr.trainer.credentials import redact
    from mfr.trainer.data import shards
    from mfr.trainer.data.sources import BadSample, decode
    from mfr.trainer.storage import open_url

    kind, dataset = _open_dataset(src)
    if kind == "shards":
        raise fail(f"{src} already holds shards (index.json)")
    try:
        fs, root = open_url(dst, what="the shard folder")
        root = root.rstrip("/")
        if fs.exists(f"{root}/{shards.INDEX}"):
            raise fail(f"{dst}/{shards.INDEX} exists: pack into an empty folder")
        fs.makedirs(root, exist_ok=True)
    except typer.Exit:
        raise
    except Exception as e:
        raise fail(f"{dst}: cannot write ({type(e).__name__}: {str(e)[:200]})") from None

    order = np.random.default_rng(seed).permutation(len(dataset)).tolist()
    groups = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
    lock, bad = threading.Lock(), []

    def write(n: int, ids: list[int], advance) -> tuple[int, list[int]]:
        samples, labels = [], []
        for j, i in enumerate(ids):
            try:
                data, label = dataset.read(i)
                decode(data, dataset.key(i))  # the check only: shards keep the original bytes
            except BadSample as e:
                with lock:
                    bad.append(str(e))
            else:
                suffix = dataset.paths[i].rsplit(".", 1)[-1].lower() if kind == "folder" else "jpg"
                samples.append((f"{n * shard_size + j:010d}", label, data, suffix))
                labels.append(label)
            advance()
        tar, offsets, count = shards.write_shard(samples)
        name = shards.shard_name(n)
        fs.pipe_file(f"{root}/{name}", tar)
        fs.pipe_file(f"{root}/{shards.offsets_name(name)}", offsets)
        return count, labels

    columns = (TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    results: dict[int, tuple[int, list[int]]] = {}
    try:
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("pack", total=len(order))

            def advance() -> None:
                bar.advance(task)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(write, n, ids, advance): n for n, ids in enumerate(groups)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
    except Exception as e:
        raise fail(f"packing {src} into {dst} failed: {type(e).__name__}: {str(e)[:300]}", code=1) from None

    all_labels = [label for n in sorted(results) for label in results[n][1]]
    classes = _class_names(kind, dataset, all_labels)
    counts = np.bincount(np.array(all_labels, dtype=np.int64), minlength=len(classes)).tolist()
    index = {
        "format": shards.FORMAT,
        "source": redact(src),
        "seed": seed,
        "images": len(all_labels),
        "classes": classes,
        "counts": counts,
        "shards": [{"name": shards.shard_name(n), "count": results[n][0]} for n in sorted(results)],
    }
    fs.pipe_file(f"{root}/{shards.INDEX}", json.dumps(index).encode())
    summary = {
        "source": src,
        "destination": dst,
        "images": len(all_labels),
        "classes": len(classes),
        "shards": len(groups),
        "bad_samples_skipped": len(bad),
    }
    for line in sorted(bad) if verbose else ():
        err.print(f"skipped bad sample {line}", highlight=False, soft_wrap=True)
    if bad and not verbose:
        err.print(f"mfr: skipped {len(bad)} bad samples (-v lists them)", highlight=False)
    if output != Output.table:
        print_data(summary, output)
    else:
        print_columns(["FIELD", "VALUE"], [[k, str(v)] for k, v in summary.items()])


def _histogram(counts: list[int]) -> list[dict[str, Any]]:
    """Class sizes in power-of-two buckets: 1, 2-3, 4-7, ..."""
    buckets: dict[int, int] = {}
    for c in counts:
        buckets[max(0, c.bit_length() - 1)] = buckets.get(max(0, c.bit_length() - 1), 0) + 1
    rows = []
    for b in sorted(buckets):
        low, high = 1 << b, (1 << (b + 1)) - 1
        rows.append({"images": str(low) if low == high else f"{low}-{high}", "classes": buckets[b]})
    return rows


def _class_counts(kind: str, dataset) -> list[int]:
    import numpy as np

    if kind == "shards":
        return [int(c) for c in dataset.set.index["counts"]]
    if kind == "folder":
        return np.bincount(dataset.labels, minlength=dataset.num_identities).tolist()
    labels = []
    for i in range(len(dataset)):
        try:
            labels.append(dataset.read(i)[1])
        except Exception:
            continue
    return np.bincount(np.array(labels, dtype=np.int64)).tolist() if labels else []


def _grid(dataset, path: str, n: int, seed: int) -> int:
    """PNG: ``n`` samples, plain on the first row and masked on the second."""
    import numpy as np
    from PIL import Image

    from mfr.trainer.data.masks import apply_mask
    from mfr.trainer.data.sources import BadSample
    from mfr.trainer.storage import open_url

    picks = np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).astype(int).tolist()
    images = []
    for i in picks:
        try:
            images.append(dataset.load(i)[0])
        except BadSample:
            continue
    if not images:
        raise fail("no readable samples for the grid")
    rng = np.random.default_rng(seed)
    rows = [np.concatenate(images, axis=1), np.concatenate([apply_mask(im, rng) for im in images], axis=1)]
    fs, target = open_url(path, what="--grid")
    with fs.open(target, "wb") as f:
        Image.fromarray(np.concatenate(rows, axis=0)).save(f, "PNG")
    return len(images)


@data_app.command("inspect")
def inspect(
    uri: Annotated[str, typer.Argument(metavar="URI", help="Image folder, RecordIO .rec/folder, or shard folder.")],
    grid: Annotated[str | None, typer.Option("--grid", help="Write a PNG of samples with and without masks.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Samples in the grid.")] = 8,
    output: OutputOpt = Output.table,
) -> None:
    """Classes, images, shards, the class-size histogram; optionally a PNG grid of samples."""
    _need_train_extra()
    kind, dataset = _open_dataset(uri)
    counts = _class_counts(kind, dataset)
    info: dict[str, Any] = {
        "uri": uri,
        "format": kind,
        "classes": len(counts),
        "images": len(dataset),
        "shards": len(dataset.set.names) if kind == "shards" else None,
        "class_sizes": {"min": min(counts, default=0), "max": max(counts, default=0)},
        "histogram": _histogram(counts),
    }
    if grid:
        info["grid"] = {"path": grid, "samples": _grid(dataset, grid, samples, 0)}
    if output != Output.table:
        print_data(info, output)
        return
    rows = [[k, str(v)] for k, v in info.items() if k not in ("histogram", "class_sizes", "grid") and v is not None]
    rows.append(["class sizes", f"{info['class_sizes']['min']}..{info['class_sizes']['max']}"])
    if grid:
        rows.append(["grid", f"{grid} ({info['grid']['samples']} samples, masked below)"])
    print_columns(["FIELD", "VALUE"], rows)
    print()
    print_columns(["IMAGES/CLASS", "CLASSES"], [[r["images"], str(r["classes"])] for r in _histogram(counts)])
