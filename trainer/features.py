"""Precomputed embeddings on any fsspec URL: fp16 ``.npy`` shards, int32 labels and ``index.json``.

One format for every embedding mfr stores: a teacher's features for offline
distillation (``mfrctl distill extract``) and the embedded images that
``mfrctl eval`` scores at scale.  Shard ``k`` holds rows
``[k * shard_rows, ...)`` as ``embeddings-<k>.npy`` (float16, rows x D) and
``labels-<k>.npy`` (int32).  ``index.json`` is written last and names every
shard with the byte offset where its data starts, so one row is one ranged
read; a folder without it is an unfinished write and is never read.  Arrays
are read without pickle, and every shard is checked against the index.

Torch-free: the scorer reads embeddings with numpy alone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from .config import ConfigError
from .storage import open_url

# The name distillation gave the format when it was its only user; kept so earlier extractions stay readable.
FORMAT = "mfr-teacher-features/1"
INDEX = "index.json"


def open_features(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(filesystem, root)`` of a folder of embedding shards."""
    fs, root = open_url(uri, storage_options, what="embeddings")
    return fs, root.rstrip("/")


def _npy(array: np.ndarray) -> tuple[bytes, int]:
    """The ``.npy`` bytes of ``array`` and where its data starts (rows are then ranged reads)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    return data, len(data) - array.nbytes


class FeatureWriter:
    """Writes embeddings in row order as fp16 ``.npy`` shards plus labels.

    ``index.json`` is written last by ``close``: a folder without it is an unfinished
    write and is never read.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, embedding_size: int, shard_rows: int):
        self.uri, self.embedding_size, self.shard_rows = uri.rstrip("/"), embedding_size, shard_rows
        self.fs, self.root = open_features(uri, storage_options)
        if self.fs.exists(f"{self.root}/{INDEX}"):
            raise ConfigError(f"{uri} already holds embeddings ({INDEX}); choose another folder or remove them")
        self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0

    def add(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        self.pending.append((embeddings.astype(np.float16), labels.astype(np.int32)))
        self.pending_rows += len(labels)
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        embeddings = np.concatenate([e for e, _ in self.pending])
        labels = np.concatenate([lab for _, lab in self.pending])
        n = len(self.shards)
        entry: dict[str, Any] = {"rows": rows}
        for kind, array in (("embeddings", embeddings[:rows]), ("labels", labels[:rows])):
            name = f"{kind}-{n:06d}.npy"
            data, offset = _npy(np.ascontiguousarray(array))
            self.fs.pipe_file(f"{self.root}/{name}", data)
            entry[kind] = {"name": name, "offset": offset}
        self.shards.append(entry)
        self.pending = [(embeddings[rows:], labels[rows:])] if rows < len(labels) else []
        self.pending_rows -= rows

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        index = {
            "format": FORMAT,
            "count": sum(s["rows"] for s in self.shards),
            "embedding_size": self.embedding_size,
            "dtype": "float16",
            "shard_rows": self.shard_rows,
            "shards": self.shards,
            **meta,
        }
        self.fs.pipe_file(f"{self.root}/{INDEX}", json.dumps(index, indent=1).encode())
        return index


class Features:
    """Reads an embedding folder: rows by index (two ranged reads each, batched), or shard by shard.

    ``name`` says what the URL is in error messages (``distill.features``, ``embeddings``).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, name: str = "embeddings"):
        self.uri, self.name = uri, name
        self.fs, self.root = open_features(uri, storage_options)
        try:
            index = json.loads(self.fs.cat_file(f"{self.root}/{INDEX}"))
        except FileNotFoundError:
            raise ConfigError(f"{name} {uri} has no {INDEX}: not written by mfr, or not finished") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{name} {uri}/{INDEX} is not JSON") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise ConfigError(f"{name} {uri}/{INDEX} is not {FORMAT} (format {found!r})")
        self.index = index
        self.count, self.embedding_size, self.shard_rows = index["count"], index["embedding_size"], index["shard_rows"]
        self._row_bytes = {"embeddings": 2 * self.embedding_size, "labels": 4}

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fp16 embeddings, int32 labels) of rows ``indices``, in that order."""
        shard, row = np.divmod(np.asarray(indices, dtype=np.int64), self.shard_rows)
        paths, starts, ends = [], [], []
        for kind, size in self._row_bytes.items():
            for s, r in zip(shard.tolist(), row.tolist()):
                entry = self.index["shards"][s][kind]
                start = entry["offset"] + r * size
                paths.append(f"{self.root}/{entry['name']}")
                starts.append(start)
                ends.append(start + size)
        blobs = self.fs.cat_ranges(paths, starts, ends)
        n = len(indices)
        embeddings = np.frombuffer(b"".join(blobs[:n]), dtype=np.float16).reshape(n, self.embedding_size)
        return embeddings, np.frombuffer(b"".join(blobs[n:]), dtype=np.int32)

    def shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every shard in row order, whole: ``(fp16 embeddings (rows, D), int32 labels (rows,))``."""
        for k in range(len(self.index["shards"])):
            yield self._load(k, "embeddings"), self._load(k, "labels")

    def labels(self) -> np.ndarray:
        """Every row's label (int32), reading the label files only."""
        shards = range(len(self.index["shards"]))
        return np.concatenate([self._load(k, "labels") for k in shards]) if shards else np.empty(0, np.int32)

    def _load(self, k: int, kind: str) -> np.ndarray:
        """Shard ``k``'s ``embeddings`` or ``labels`` array, checked against the index."""
        entry = self.index["shards"][k]
        dtype, shape = {
            "embeddings": (np.float16, (entry["rows"], self.embedding_size)),
            "labels": (np.int32, (entry["rows"],)),
        }[kind]
        name = entry[kind]["name"]
        try:
            array = np.load(io.BytesIO(self.fs.cat_file(f"{self.root}/{name}")), allow_pickle=False)
        except FileNotFoundError:
            raise ConfigError(f"{self.name} {self.uri}/{name}: missing (shard {k} of {INDEX})") from None
        except ValueError as err:
            raise ConfigError(f"{self.name} {self.uri}/{name}: not a .npy array ({str(err)[:120]})") from None
        if array.dtype != dtype or array.shape != shape:
            raise ConfigError(
                f"{self.name} {self.uri}/{name}: {array.dtype} {array.shape}, {INDEX} says {np.dtype(dtype)} {shape}"
            )
        return array
