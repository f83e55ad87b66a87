"""Read a committed checkpoint in one process: tensor shapes, and plain exports.

The head's per-rank blocks are merged into one ``num_classes x D`` matrix
by DCP itself (from the saved offsets), so an export never depends on the
world size the checkpoint was written with.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from .storage import CheckpointInfo, Storage

def _reader(url: str) -> FsspecReader:
    root, _, _ = url.rstrip("/").rpartition("/")
    return FsspecReader(url, **Storage(root).options)

def tensor_shapes(url: str) -> dict[str, str]:
    """Every tensor in the checkpoint and its global shape, e.g. ``"256 x 128"`` (head rows merged)."""
    metadata = _reader(url).read_metadata()
    return {
        fqn: " x ".join(str(n) for n in md.size) or "scalar"
        for fqn, md in sorted(metadata.state_dict_metadata.items())
        if isinstance(md, TensorStorageMetadata)
    }

def load_tensors(url: str, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The nested state under the given top-level keys, as full tensors."""
    state: dict[str, Any] = {}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        # the private loader fills ``state`` itself; dcp.load would fill a copy
        _load_state_dict(
            state, storage_reader=_reader(url), planner=_EmptyStateDictLoadPlanner(keys=set(prefixes)), no_dist=True
        )
    return state

def export_checkpoint(
    info: CheckpointInfo, out_url: str, with_head: bool, open_output: Callable[..., Any]
) -> dict[str, Any]:
    """Write the backbone (and the head) as a torch.save file; returns a summary."""
    keys = ("backbone", "head") if with_head else ("backbone",)
    state = load_tensors(info.url, keys)
    backbone = state["backbone"]
    payload = {"backbone": backbone, "head": {"weight": state["head"]["weight"]}} if with_head else backbone
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with open_output(out_url, "wb") as f:
        f.write(buffer.getvalue())
    model = (info.config or {}).get("model", {})
    return {
        "step": info.step,
        "source": info.url,
        "output": out_url,
        "tensors": len(backbone) + int(with_head),
        "bytes": buffer.getbuffer().nbytes,
        "model": {k: model.get(k) for k in ("backbone", "layers", "width", "embedding_size")},
        "head_shape": list(state["head"]["weight"].shape) if with_head else None,
    }

