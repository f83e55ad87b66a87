"""The offline verification suite behind ``mfrctl eval``: every set embedded once, scored, one report.

Every input is read and checked before the model is loaded, so a mistake
costs no embedding time.  ``.bin`` sets are embedded in memory and get
insightface's k-fold accuracy; pair lists and galleries are embedded into
fp16 shards under ``EvalRequest.embeddings`` (``DIR/<set>/unmasked`` and
``masked``; reused when written before with the same model and settings) and
scored, like sets embedded before (``--embedded``), by the caller's scorer:
``mfrctl eval`` runs ``mfr.trainer.score`` in its own process or on local
ranks.  Bad input is a ConfigError, a write that fails a StorageError.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import ConfigError
from .data.binsets import read_bin
from .data.sources import BadSample, open_dataset
from .evaluate import Embedder, evaluate_pairs, read_pairs
from .features import Features
from .rocplot import plot_roc
from .saved_models import load_backbone
from .score import PAIRS_FILE, embedding_folders
from .storage import StorageError, open_file
from .verification import DEFAULT_FPRS

# (set name, embeddings URL, split, about how many pairs) -> the set's report entry
ScoreFn = Callable[[str, str, int, int], dict[str, Any]]
# (set name, images) -> a context that yields advance(images embedded)
EmbedProgress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how; the settings hold for every set."""

    model: str | None  # a checkpoint step, a checkpoint root or an exported state dict; None: --embedded only
    bins: tuple[str, ...] = ()  # insightface .bin verification sets
    galleries: tuple[str, ...] = ()  # data sets compared all-vs-all (or probes with the gallery, ``split``)
    pairs: tuple[tuple[str, str], ...] = ()  # (data set, pair list on it)
    embedded: tuple[str, ...] = ()  # embeddings written before, scored without a model
    embeddings: str | None = None  # where sets are embedded; None: a temporary folder removed afterwards
    roc: str | None = None  # the ROC plot (PNG) goes here
    fprs: tuple[float, ...] = DEFAULT_FPRS
    flip: bool = True  # embed each crop plus its mirror image
    masks: bool = True  # also the masked protocols: image i wears the mask of (mask_seed, i)
    mask_seed: int = 0
    folds: int = 10  # folds of the .bin accuracy
    max_images: int | None = None  # score a seeded sample of this many images of each gallery
    split: int = 0  # galleries: each identity's first ``split`` images are its gallery; 0: all-vs-all
    batch_size: int = 64
    device: str = "auto"  # auto (cuda when available), cpu or cuda


@contextlib.contextmanager
def _no_progress(name: str, count: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def run(
    request: EvalRequest,
    score: ScoreFn,
    progress: EmbedProgress = _no_progress,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """The report of ``request``: its model and settings, and one entry per set (with ROC curves).

    ``score`` scores one embedded set; ``progress`` shows embedding; ``log`` gets the lines worth telling.
    """
    device_name = request.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    binsets = [read_bin(url) for url in request.bins]
    for binset in binsets:
        if binset.num_pairs < request.folds:
            raise ConfigError(f"{binset.url}: {binset.num_pairs} pairs cannot make {request.folds} folds (--folds)")
    pair_lists = []
    for data_url, list_url in request.pairs:
        _, dataset = open_dataset(data_url)
        pair_lists.append((data_url, list_url, dataset, *read_pairs(list_url, dataset)))
    gallery_sets = [(url, open_dataset(url)[1]) for url in request.galleries]
    embedded_sizes = [Features(embedding_folders(url)[0]).count for url in request.embedded]
    model_info: dict[str, Any] | None = None
    embedder = None
    if request.model is not None:
        backbone, model_info = load_backbone(request.model)
        embedder = Embedder(backbone, torch.device(device_name), request.batch_size, request.flip)

    with _embeddings_root(request.embeddings) as root:

        def embed_set(name: str, meta: dict[str, Any], count: int, load) -> str:
            """The set's embeddings under ``root``: reused when written before with the same settings."""
            url = f"{root}/{name}"
            meta = {
                **meta,
                "model": model_info,
                "flip": request.flip,
                "masks": request.masks,
                "mask_seed": request.mask_seed,
                "images": int(count),
            }
            if _written_with(url, meta):
                log(f"{name}: reusing the embeddings in {url}")
                return url
            try:
                with progress(name, count) as advance:
                    embedder.embed_to_shards(count, load, request.masks, request.mask_seed, url, meta, advance)
            except BadSample as e:
                raise ConfigError(f"unreadable image: {e}") from None
            return url

        results = []
        for binset in binsets:
            unmasked, masked = embedder.embed(len(binset.images), binset.image, request.masks, request.mask_seed)
            results.append(
                evaluate_pairs(
                    binset.name,
                    "bin",
                    binset.url,
                    unmasked,
                    masked,
                    binset.first,
                    binset.second,
                    binset.issame,
                    request.fprs,
                    request.folds,
                ).to_dict()
            )
        names = _Names()
        to_score: list[tuple[str, str, int, int]] = []  # name, embeddings, split, pairs
        for data_url, list_url, dataset, first, second, same in pair_lists:
            used = np.unique(np.concatenate([first, second]))
            name = names.take(list_url.rstrip("/").rsplit("/", 1)[-1])
            url = embed_set(
                name, {"kind": "pairs", "data": f"{data_url}={list_url}"}, len(used), _loader(dataset, used)
            )
            rows = [np.searchsorted(used, first), np.searchsorted(used, second)]
            if same is not None:
                rows.append(same.astype(np.int64))
            _write_pairs(f"{url}/{PAIRS_FILE}", np.stack(rows, axis=1))
            to_score.append((name, url, 0, len(first)))
        for url, dataset in gallery_sets:
            used = np.arange(len(dataset))
            if request.max_images is not None and len(used) > request.max_images:
                used = np.sort(
                    np.random.default_rng(request.mask_seed).choice(len(used), request.max_images, replace=False)
                )
                log(f"{url}: {len(dataset)} images, evaluating a seeded sample of {len(used)} (--max-images)")
            name = names.take(url.rstrip("/").rsplit("/", 1)[-1])
            meta = {"kind": "gallery", "data": url, "max_images": request.max_images}
            to_score.append(
                (name, embed_set(name, meta, len(used), _loader(dataset, used)), request.split, _pairs_hint(len(used)))
            )
        for url, size in zip(request.embedded, embedded_sizes):
            to_score.append((names.take(url.rstrip("/").rsplit("/", 1)[-1]), url, request.split, _pairs_hint(size)))
        for name, url, split, hint in to_score:
            results.append(score(name, url, split, hint))

    data = {
        "model": model_info,
        "flip": request.flip,
        "masks": request.masks,
        "mask_seed": request.mask_seed,
        "fprs": list(request.fprs),
        "split": request.split,
        "sets": results,
        "roc_plot": request.roc,
    }
    if request.roc:
        plot_roc(results, lambda png: write_output(request.roc, png))
        log(f"ROC plot written to {request.roc}")
    return data


def write_output(url: str, payload: bytes) -> None:
    """Write one whole file (local or s3://); StorageError naming the URL when it cannot be written."""
    try:
        with open_file(url, "wb") as f:
            f.write(payload)
    except Exception as e:
        raise StorageError(f"{url}: cannot write ({type(e).__name__}: {str(e)[:200]})") from None


@contextlib.contextmanager
def _embeddings_root(url: str | None) -> Iterator[str]:
    """``url``, or a temporary folder removed afterwards."""
    if url is not None:
        yield url.rstrip("/")
        return
    with tempfile.TemporaryDirectory(prefix="mfr-eval-") as tmp:
        yield tmp


def _pairs_hint(images: int) -> int:
    """About how many pairs a set of ``images`` has (all-vs-all, one protocol): the scorer picks its ranks by it."""
    return images * (images - 1) // 2


def _written_with(url: str, meta: dict[str, Any]) -> bool:
    """Does ``url`` hold finished embeddings of exactly these settings?  Other ones there are a ConfigError."""
    try:
        written = Features(f"{url}/unmasked").index.get("eval", {})
    except ConfigError:
        return False
    written = {k: v for k, v in written.items() if k != "condition"}
    wanted = json.loads(json.dumps(meta))  # as index.json holds it
    if written == wanted:
        return True
    differ = ", ".join(f"{k} {written.get(k)!r} there" for k in wanted if written.get(k) != wanted[k])
    raise ConfigError(f"{url} holds other embeddings ({differ}); choose another --embeddings folder or remove it")


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


def _write_pairs(url: str, pairs: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, pairs)
    write_output(url, buffer.getvalue())
