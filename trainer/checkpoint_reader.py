"""Reading checkpoints without running code from them: the one path every reader takes.

A checkpoint directory is data from a bucket that others may be able to
write.  torch.distributed.checkpoint trusts it: its reader unpickles
``.metadata`` with plain ``pickle.load`` and its load planners rebuild
non-tensor entries with ``torch.load(weights_only=False)``; either runs
whatever the file asks for.  Here:

- ``.metadata`` is unpickled with an allow-list: DCP's metadata classes,
  ``torch.Size``, dtypes, layouts and paths.  Any other class is refused
  before it is imported; the result is then checked (tensor shapes, chunks
  inside their tensor, storage entries that are plain file names in the
  checkpoint directory), so a small file cannot make a reader allocate
  more than the checkpoint's files hold;
- non-tensor ("bytes") entries are never read: mfr saves only tensors
  (``Trainer.state_dict``), and a bytes entry under a key being
  loaded refuses the checkpoint.  (Tensor entries are read by DCP with
  ``torch.load(weights_only=True)``, torch's own allow-list.)

Resume (``checkpoint``), ``mfrctl ckpt inspect``, ``mfrctl export``,
``mfrctl eval`` and the distillation teacher all read through this module.
A refusal is a ``CheckpointRefused``: one line naming the file, exit 2.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import PosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from .config import ConfigError
from .storage import Storage, StorageError, fsspec_options

METADATA = ".metadata"
# The top-level entries of a checkpoint, as ``Trainer.state_dict`` writes them; readers load by these names.
BACKBONE, HEAD, OPTIM, PROGRESS, SCALER, DISTILL, RNG = (
    "backbone",
    "head",
    "optim",
    "progress",
    "scaler",
    "distill",
    "rng",
)
# Every class a torch 2.13 dcp.save writes into .metadata (dense, ShardedTensor and DTensor entries alike).
_ALLOWED_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> torch.strided etc.
    ("pathlib", "PosixPath"): PosixPath,  # StorageMeta.checkpoint_id of a local save
}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a file in the checkpoint directory, nothing else


class CheckpointRefused(ConfigError):
    """The checkpoint holds something mfr does not read (code, pickled objects, impossible shapes)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_CLASSES.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a checkpoint metadata class")


def _check_size(size: Any, what: str) -> None:
    if not isinstance(size, torch.Size) or any(not isinstance(n, int) or n < 0 for n in size):
        raise ValueError(f"{what} has the shape {size!r}")


def _check_entries(md: Metadata) -> None:
    """Raise TypeError/ValueError where ``md`` is not what dcp.save writes: shapes, chunks, storage entries."""
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise TypeError(f"it holds a {type(md).__name__}, not checkpoint metadata")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise TypeError("it has no storage table")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, filesystem._StorageInfo):
            raise TypeError("its storage table holds foreign entries")
        path, offset, length = info.relative_path, info.offset, info.length
        if not isinstance(path, str) or not _FILE_NAME.match(path) or ".." in path:
            raise ValueError(f"entry {index.fqn} points at {path!r}, not a file of the checkpoint directory")
        if not all(isinstance(n, int) and n >= 0 for n in (offset, length)):
            raise ValueError(f"entry {index.fqn} has the byte range {offset!r}+{length!r}")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"entry {index.fqn} is stored through transforms {info.transform_descriptors!r}")
    planner_data = md.planner_data if md.planner_data is not None else {}
    if not isinstance(planner_data, dict) or any(
        not isinstance(path, (tuple, list)) or not all(isinstance(p, (str, int)) for p in path)
        for path in planner_data.values()
    ):
        raise ValueError("its key table holds foreign entries")
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise TypeError(f"it has the key {fqn!r}")
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.properties, TensorProperties):
            raise TypeError(f"entry {fqn} is a {type(entry).__name__}")
        if not isinstance(entry.properties.dtype, torch.dtype):
            raise TypeError(f"entry {fqn} has the dtype {entry.properties.dtype!r}")
        _check_size(entry.size, f"entry {fqn}")
        if not isinstance(entry.chunks, list):
            raise TypeError(f"entry {fqn} has no chunk list")
        covered = 0
        for i, chunk in enumerate(entry.chunks):
            if not isinstance(chunk, ChunkStorageMetadata):
                raise TypeError(f"entry {fqn} has a foreign chunk")
            _check_size(chunk.offsets, f"entry {fqn}")
            _check_size(chunk.sizes, f"entry {fqn}")
            if (
                len(chunk.offsets) != len(entry.size)
                or len(chunk.sizes) != len(entry.size)
                or any(o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size))
            ):
                raise ValueError(f"entry {fqn} has a chunk outside its {tuple(entry.size)} tensor")
            stored = storage.get(MetadataIndex(fqn, chunk.offsets, i))
            if stored is None or stored.length < math.prod(chunk.sizes) * entry.properties.dtype.itemsize:
                raise ValueError(f"entry {fqn} has a chunk of {tuple(chunk.sizes)} without the bytes to hold it")
            covered += math.prod(chunk.sizes)
        if covered < math.prod(entry.size):
            raise ValueError(f"entry {fqn}'s chunks do not cover its {tuple(entry.size)} tensor")


def parse_metadata(data: bytes, where: str) -> Metadata:
    """The checkpoint metadata in ``data`` (the bytes of ``where``), unpickled with the allow-list and checked."""
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
        _check_entries(md)
    except Exception as err:  # pickle raises many types for foreign bytes; our checks Type/ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointRefused(
            f"{where}: refused, nothing loaded: {reason} (mfr reads only the metadata torch.distributed.checkpoint "
            "writes; was this directory written by mfr?)"
        ) from None
    return md


def refuse_pickled(md: Metadata, keys: Callable[[str], bool], where: str, hint: str = "") -> None:
    """Refuse the checkpoint if an entry that would be loaded (``keys(fqn)``) is a pickled object."""
    pickled = sorted(
        fqn for fqn, entry in md.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata) and keys(fqn)
    )
    if pickled:
        more = f" and {len(pickled) - 3} more" if len(pickled) > 3 else ""
        raise CheckpointRefused(
            f"{where}: refused, nothing loaded: {', '.join(pickled[:3])}{more} hold pickled objects, which mfr never "
            f"unpickles (its checkpoints hold tensors only){hint}"
        )


class SafeReader(FsspecReader):
    """DCP's fsspec reader, with ``.metadata`` read once, through ``parse_metadata``, when it is made.

    Construction raises ``CheckpointRefused`` (bad content) or ``StorageError`` (unreadable, after
    retries), before any collective starts; DCP then gets the checked metadata.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        super().__init__(self.url, **fsspec_options(self.url, storage_options))
        where = f"{self.url}/{METADATA}"
        self.storage = Storage(self.url, storage_options)
        data = self.storage.read_bytes(METADATA)
        if data is None:
            raise StorageError(f"{where}: no such file (an incomplete checkpoint)", permanent=True)
        self.metadata = parse_metadata(data, where)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = self.metadata
        if md.storage_meta is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def file_sizes(self) -> dict[str, int]:
        """Bytes of each data file the metadata points at."""
        names = {info.relative_path for info in self.metadata.storage_data.values()}
        fs = self.storage.fs
        return {
            name: int(self.storage.retry(f"sizing {name}", lambda n=name: fs.size(self.storage.path(n))))
            for name in names
        }


class _NoBytes:
    """Load planners that never unpickle an entry (``refuse_pickled`` already stopped such a load)."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointRefused(f"{read_item.dest_index.fqn}: a pickled object; mfr never unpickles checkpoint entries")


class SafeLoadPlanner(_NoBytes, DefaultLoadPlanner):
    """``dcp.load``'s default planner, without its ``torch.load(weights_only=False)``."""


class _SafeEmptyPlanner(_NoBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds the requested part of the state from the metadata, tensors only."""


def _included(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda fqn: any(fqn == p or fqn.startswith(p + ".") for p in prefixes)


def flat_keys(state: dict[str, Any]) -> set[str]:
    """The keys DCP stores ``state``'s entries under (nested dicts joined with dots)."""
    return set(flatten_state_dict(state)[0])


def tensor_shapes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Every entry of the checkpoint and its global shape, e.g. ``"256 x 128"`` (head rows merged);
    pickled entries are listed as such and never read."""
    md = SafeReader(url, storage_options).metadata
    return {
        fqn: (" x ".join(str(n) for n in entry.size) or "scalar")
        if isinstance(entry, TensorStorageMetadata)
        else "pickled object (never loaded)"
        for fqn, entry in sorted(md.state_dict_metadata.items())
    }


def load_tensors(url: str, prefixes: tuple[str, ...], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The nested state under the given top-level keys, as full tensors, in this process."""
    reader = SafeReader(url, storage_options)
    where = f"{reader.url}/{METADATA}"
    wanted = _included(prefixes)
    refuse_pickled(reader.metadata, wanted, where)
    # The planner allocates every wanted tensor whole: only what the checkpoint's files can hold.
    sizes = reader.file_sizes()
    for index, info in reader.metadata.storage_data.items():
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointRefused(
                f"{where}: refused, nothing loaded: entry {index.fqn} lies past the end of {info.relative_path}"
            )
    wanted_bytes = sum(
        math.prod(e.size) * e.properties.dtype.itemsize
        for fqn, e in reader.metadata.state_dict_metadata.items()
        if wanted(fqn) and isinstance(e, TensorStorageMetadata)
    )
    if wanted_bytes > sum(sizes.values()):
        raise CheckpointRefused(
            f"{where}: refused, nothing loaded: its tensors would take {wanted_bytes} bytes, "
            f"its files hold {sum(sizes.values())}"
        )
    state: dict[str, Any] = {}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        # the private loader fills ``state`` itself; dcp.load would fill a copy
        _load_state_dict(state, storage_reader=reader, planner=_SafeEmptyPlanner(keys=set(prefixes)), no_dist=True)
    return state
