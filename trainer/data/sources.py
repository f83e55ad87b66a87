"""Real face datasets by fsspec URL (local path or s3://): image folders, MXNet RecordIO, tar shards.

All are indexable: the loader's ``GlobalOrderSampler`` shards them across ranks and
DataLoader workers and resumes them at an exact global position.  Each sample is
decoded, resized to 112x112 if needed and augmented (``augment.Augment``: a mask
with probability ``mask_prob``, a mirror half the time, normalised to [-1, 1]).
The file formats are ``recordio`` and ``shards``; this module turns them into samples.

A sample that cannot be used (corrupt or truncated JPEG, an image of more pixels
than a face crop needs, truncated record, label missing or outside
``[0, num_classes)``, a folder's file that resolves outside the folder) is logged
with its key and replaced by the next good sample in index order, so every rank still yields full batches and the
collectives of a step pair up.  The loader counts the replacements
(``mfr_bad_samples_total``) and aborts past ``data.max_bad_fraction``.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError
from ..progress import log
from ..storage import ProcessFS, open_url
from . import recordio
from .augment import Augment
from .synthetic import SIZE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_REPLACEMENTS = 64  # consecutive bad samples before giving up on a batch slot
# An aligned crop is 112x112; even a loose, high-resolution face crop stays far below this.  Larger images
# (a 164 KB PNG can announce 169 megapixels) are bad samples, refused before any pixel is decoded.
MAX_PIXELS = 2048 * 2048
UNLIMITED = sys.maxsize  # no head.num_classes bound: a data set read outside training


class BadSample(ValueError):
    """One sample that cannot be used; the message names the problem."""


def decode(data: bytes, key: str) -> np.ndarray:
    """uint8 112x112x3 RGB from encoded image bytes; BadSample if it does not decode or is larger than
    ``MAX_PIXELS`` (checked from the header, before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadSample(
                        f"{key}: {img.width} x {img.height} pixels, more than a face crop needs "
                        f"(at most {MAX_PIXELS:,}); not decoded"
                    )
                img.draft("RGB", (SIZE, SIZE))  # JPEG: decode at reduced scale when the image is larger
                img = img.convert("RGB")
                if img.size != (SIZE, SIZE):
                    img = img.resize((SIZE, SIZE), Image.BILINEAR)
                return np.asarray(img)
    except BadSample:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise BadSample(f"{key}: cannot decode image ({type(err).__name__}: {err})") from None


class IndexedFaces(Dataset):
    """Base for indexable sources; items are ``epoch * len + index`` (see ``EpochIndexSampler``).

    ``__getitem__`` returns ``(image, label, bad)`` where ``bad`` counts the samples
    skipped to fill this slot.
    """

    num_images: int
    num_identities: int

    def __init__(self, url: str, options: dict[str, Any] | None, num_classes: int, augment: Augment):
        self.url, self.options, self.num_classes, self.augment = url, options or {}, num_classes, augment
        self._files = ProcessFS(url, options, "data.uri")

    @property
    def fs(self):
        return self._files.fs

    def __len__(self) -> int:
        return self.num_images

    def key(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> tuple[bytes, int]:
        """Encoded image bytes and the label; BadSample when unusable."""
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded uint8 image and label of one sample (no augmentation); BadSample when unusable."""
        data, label = self.read(index)
        if not 0 <= label < self.num_classes:
            raise BadSample(f"{self.key(index)}: label {label} outside [0, {self.num_classes})")
        return decode(data, self.key(index)), label

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        epoch, index = divmod(int(item), self.num_images)
        for bad in range(MAX_REPLACEMENTS):
            i = (index + bad) % self.num_images
            try:
                image, label = self.load(i)
            except BadSample as err:
                log.warning("data: skipping bad sample %s", err)
                continue
            return self.augment(image, epoch, index), label, bad
        raise ConfigError(
            f"{self.url}: {MAX_REPLACEMENTS} bad samples in a row from index {index} on; is the data readable?"
        )


class FolderFaces(IndexedFaces):
    """One sub-folder per identity (sorted names are labels 0, 1, ...), images inside at any depth.

    A local file that resolves outside the folder (a link to ``~/.aws/credentials`` named ``x.jpg``) is a
    bad sample: its bytes are never read.
    """

    def __init__(self, url: str, options: dict[str, Any] | None, num_classes: int, augment: Augment):
        super().__init__(url, options, num_classes, augment)
        fs, root = open_url(url, options, what="data.uri")
        root = root.rstrip("/")
        try:
            if not fs.isdir(root):
                raise ConfigError(f"data.uri {url}: no such folder")
            files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"data.uri {url}: cannot list ({type(err).__name__}: {err})") from None
        self.root = root
        self.real_root = os.path.realpath(root) if "file" in _protocols(fs) else None  # links exist locally
        self.paths = [p[len(root) + 1 :] for p in files if "/" in p[len(root) + 1 :]]
        if not self.paths:
            raise ConfigError(f"data.uri {url}: no images in identity sub-folders ({', '.join(IMAGE_EXTENSIONS)})")
        self.classes = sorted({p.split("/", 1)[0] for p in self.paths})
        self.num_images, self.num_identities = len(self.paths), len(self.classes)
        if self.num_identities > num_classes:
            raise ConfigError(
                f"data.uri {url}: {self.num_identities} identity folders but head.num_classes is {num_classes}"
            )
        label_of = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([label_of[p.split("/", 1)[0]] for p in self.paths], dtype=np.int64)

    def key(self, index: int) -> str:
        return f"{self.url.rstrip('/')}/{self.paths[index]}"

    def read(self, index: int) -> tuple[bytes, int]:
        path = f"{self.root}/{self.paths[index]}"
        if self.real_root is not None:
            path = os.path.realpath(path)  # and read what was checked, not the link
            if os.path.commonpath([path, self.real_root]) != self.real_root:
                raise BadSample(f"{self.key(index)}: a link to {path}, outside {self.real_root}; not read")
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise BadSample(f"{self.key(index)}: file vanished") from None
        return data, int(self.labels[index])


class RecordFaces(IndexedFaces):
    """``train.rec`` + ``train.idx`` (insightface layout, or plain records each with its label)."""

    def __init__(self, url: str, options: dict[str, Any] | None, num_classes: int, augment: Augment):
        rec_url = url if url.endswith(".rec") else url.rstrip("/") + "/train.rec"
        super().__init__(rec_url, options, num_classes, augment)
        idx_url = rec_url[: -len(".rec")] + ".idx"
        fs, rec = open_url(rec_url, options, what="data.uri")
        idx = rec[: -len(".rec")] + ".idx"
        try:
            if not fs.isfile(rec):
                raise ConfigError(f"{rec_url}: no such RecordIO file")
            if not fs.isfile(idx):
                raise ConfigError(f"{idx_url}: no such index (a .rec needs its .idx next to it)")
            size = fs.size(rec)
            index = recordio.RecordIndex(fs.cat_file(idx).decode(), size, idx_url, rec_url)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
        except Exception as err:
            raise ConfigError(f"{rec_url}: cannot read ({type(err).__name__}: {err})") from None
        self.rec_path, self.size = rec, size
        try:
            recordio.unframe(fs.cat_file(rec, start=index.last[0], end=size))
            start0, end0 = index.header_span()
            header0, _ = recordio.unpack(recordio.unframe(fs.cat_file(rec, start=start0, end=end0)))
        except recordio.RecordError as err:
            raise ConfigError(f"{idx_url} does not match {rec_url}: {err}") from None
        self.keys, self.num_identities = index.images(header0)
        if self.num_identities > num_classes:
            raise ConfigError(
                f"{rec_url}: {self.num_identities} identities in the header record but head.num_classes is "
                f"{num_classes}"
            )
        self.starts, self.ends = index.lookup(self.keys)
        self.num_images = len(self.keys)

    def key(self, index: int) -> str:
        return f"{self.url}#{int(self.keys[index])}"

    def read(self, index: int) -> tuple[bytes, int]:
        start, end = int(self.starts[index]), int(self.ends[index])
        if start < 0:
            raise BadSample(f"{self.key(index)}: key missing from the .idx")
        try:
            data = self.fs.cat_file(self.rec_path, start=start, end=end)
            header, payload = recordio.unpack(recordio.unframe(data))
        except recordio.RecordError as err:
            raise BadSample(f"{self.key(index)}: {err}") from None
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        if not np.isfinite(label) or label != int(label):
            raise BadSample(f"{self.key(index)}: malformed label {label}")
        return payload, int(label)


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def build(cfg, num_classes: int) -> IndexedFaces:
    """The dataset for ``data.source`` folder, recordio or shards."""
    if not cfg.uri:
        raise ConfigError(f"data.source {cfg.source} needs data.uri")
    augment = Augment(cfg.mask_prob, cfg.flip, cfg.seed)
    if cfg.source == "folder":
        return FolderFaces(cfg.uri, cfg.storage_options, num_classes, augment)
    if cfg.source == "recordio":
        return RecordFaces(cfg.uri, cfg.storage_options, num_classes, augment)
    if cfg.source == "shards":
        return ShardFaces(cfg.uri, cfg.storage_options, num_classes, augment, cfg.shard_chunk, cfg.seed)
    raise ConfigError(f"unknown data.source {cfg.source}")


def open_dataset(uri: str) -> tuple[str, IndexedFaces]:
    """The data set at ``uri`` and its kind (``data.source``), told by what is there: tar shards (index.json),
    RecordIO (a .rec, or a folder holding train.rec), else an image folder.

    Unaugmented and without a class bound: a data set to pack, inspect or evaluate (``load`` decodes).
    """
    from .shards import INDEX

    fs, root = open_url(uri, what="data")
    root = root.rstrip("/")
    if uri.endswith(".rec") or fs.isfile(f"{root}/train.rec"):
        return "recordio", RecordFaces(uri, None, UNLIMITED, None)
    if fs.isfile(f"{root}/{INDEX}"):
        return "shards", ShardFaces(uri, None, UNLIMITED, None)
    if not fs.exists(root):
        raise ConfigError(f"{uri}: no such file or folder")
    return "folder", FolderFaces(uri, None, UNLIMITED, None)


class ShardFaces(IndexedFaces):
    """A shard set from ``mfrctl data pack``, read span by span in the order of ``spans.SpanOrder``.

    ``layout`` (set by the loader) is who reads the epochs; ``resumed`` is ``(epoch, layout)`` when a
    checkpoint's epoch was drawn for another layout.  They only steer the reads: which samples a batch
    holds comes from the sampler's items, so a stale layout costs speed, never correctness.
    """

    def __init__(
        self,
        url: str,
        options: dict[str, Any] | None,
        num_classes: int,
        augment: Augment,
        span: int = 1024,
        seed: int = 0,
    ):
        from .shards import ShardSet
        from .spans import SpanReader

        super().__init__(url, options, num_classes, augment)
        self.set = ShardSet(url, options)
        self.classes = self.set.classes
        self.num_images, self.num_identities = self.set.num_images, len(self.classes)
        if self.num_identities > num_classes:
            raise ConfigError(
                f"{self.set.url}/index.json: {self.num_identities} classes but head.num_classes is {num_classes}"
            )
        self.span, self.seed = min(span, self.num_images), seed
        self.layout, self.resumed = None, None
        self.reader = SpanReader(self.set.read_range)
        self._orders: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_orders": OrderedDict()}

    def order(self, epoch: int):
        """Epoch ``epoch``'s ``SpanOrder``, as the sampler draws it."""
        from .spans import SpanOrder

        if epoch not in self._orders:
            layout = self.resumed[1] if self.resumed and self.resumed[0] == epoch else self.layout
            self._orders[epoch] = SpanOrder(self.num_images, self.span, self.seed, epoch, layout)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def key(self, index: int) -> str:
        return self.set.key(index)

    def _sample(self, index: int, parts: dict[str, bytes]) -> tuple[bytes, int]:
        from .shards import IMAGE_SUFFIXES

        image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
        if image is None:
            raise BadSample(f"{self.key(index)}: no image member")
        try:
            label = int(parts["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            raise BadSample(f"{self.key(index)}: missing or malformed .cls label") from None
        return image, label

    def read(self, index: int) -> tuple[bytes, int]:
        shard, i = self.set.locate(index)
        try:
            ((_, parts),) = self.set.read_run(shard, i, i + 1)
        except ValueError as err:  # torn tar data, or more than one key in a sample's bytes
            raise BadSample(f"{self.key(index)}: {err}") from None
        return self._sample(index, parts)

    def _fetch(self, epoch: int, ids: np.ndarray) -> dict[int, tuple[str, dict[str, bytes]]]:
        """The batch's samples by id, from whole spans.  When the epoch is laid out for the readers as they
        are now, the reader's next span is requested in the background; in an epoch resumed from another
        layout a batch uses only part of each span it touches (the spans are read again later)."""
        fetched: dict[int, tuple[str, dict[str, bytes]]] = {}
        for sid in np.unique(ids // self.span).tolist():
            fetched.update(self.reader.get(sid * self.span, min((sid + 1) * self.span, self.num_images)))
        order = None if self.layout is None else self.order(epoch)  # None: read outside training's loader
        if order is not None and order.layout == self.layout:
            last = int(order.stream_indices(ids).max())
            after = (last // self.span + 1) * self.span  # the stream index where the next span starts
            if after < order.part_end(last):
                nxt = order.span_at(after // self.span)
                self.reader.prefetch(nxt * self.span, min((nxt + 1) * self.span, self.num_images))
        return fetched

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, int, int]]:
        out: list[tuple[torch.Tensor, int, int] | None] = [None] * len(items)
        epoch = int(items[0]) // self.num_images
        ids = np.asarray(items, dtype=np.int64) % self.num_images
        try:
            fetched = self._fetch(epoch, ids)
        except Exception:  # e.g. an offsets file missing: fall back to one read per sample, which names it
            fetched = {}
        for n, sample in enumerate(ids.tolist()):
            if sample not in fetched:
                continue
            try:
                data, label = self._sample(sample, fetched[sample][1])
                if not 0 <= label < self.num_classes:
                    raise BadSample(f"{self.key(sample)}: label {label} outside [0, {self.num_classes})")
                image = decode(data, self.key(sample))
            except BadSample:
                continue  # replaced below, and logged there
            out[n] = (self.augment(image, epoch, sample), label, 0)
        for n, item in enumerate(items):
            if out[n] is None:
                out[n] = self[item]
        return out  # type: ignore[return-value]
