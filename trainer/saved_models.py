"""Backbones rebuilt from what a run saved: a committed checkpoint or an exported state dict.

Export, evaluation, ``mfrctl eval`` and the distillation teacher all read a backbone
outside training; they build it here, so a tensor that does not fit the architecture
is the same one line everywhere (which tensor, its shape there, its shape here), not a
page of ``load_state_dict`` errors.  The tensors themselves come through
``checkpoint_reader`` (nothing unpickled beyond its allow-list) or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from .checkpoint_reader import load_tensors
from .config import STAGE_WIDTHS, ConfigError
from .models import IResNet, build_backbone
from .storage import CheckpointInfo, find_checkpoint, open_url


def _shape(t: torch.Tensor) -> str:
    return " x ".join(str(n) for n in t.shape) or "scalar"


def first_mismatch(
    state: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "", here: str = "the architecture"
) -> str | None:
    """The first tensor of ``state`` that ``model`` (``here``) does not hold with that shape, in words; None if
    all fit."""
    saved = {k: _shape(v) for k, v in state.items()}
    for name, tensor in model.state_dict().items():
        if saved.get(name) != _shape(tensor):
            return f"{prefix}{name} is {saved.get(name, 'missing')} there, {_shape(tensor)} in {here}"
    extra = [name for name in saved if name not in model.state_dict()]
    return f"{prefix}{extra[0]} ({saved[extra[0]]}) there is not in {here}" if extra else None


def checkpoint_backbone(info: CheckpointInfo, state: dict[str, torch.Tensor]) -> IResNet:
    """The eval-mode backbone that ``info``'s training config describes, holding ``state``."""
    model_cfg = (info.config or {}).get("model")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{info.url}: its commit record has no model config to build the backbone from")
    try:
        model = build_backbone(
            model_cfg["backbone"],
            layers=model_cfg.get("layers"),
            width=model_cfg.get("width"),
            embedding_size=model_cfg["embedding_size"],
        )
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{info.url}: its model config cannot build a backbone ({err})") from None
    problem = first_mismatch(state, model)
    if problem:
        raise ConfigError(f"{info.url}: the backbone tensors do not match the run's model config: {problem}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def backbone_from_state(state: dict[str, torch.Tensor], source: str) -> IResNet:
    """An eval-mode iResNet holding a plain state dict, its architecture read off the tensors.

    An exported state dict carries no config: the blocks per stage come from
    the keys, the width from the last (widest) stage, the embedding size from
    the head.
    """
    try:
        blocks = {tuple(int(n) for n in m.groups()) for k in state if (m := re.match(r"stages\.(\d+)\.(\d+)\.", k))}
        layers = [1 + max((b for s, b in blocks if s == stage), default=-1) for stage in range(len(STAGE_WIDTHS))]
        width = state["head.0.weight"].shape[0] / STAGE_WIDTHS[-1]  # the widest stage pins it closest
        backbone = build_backbone("custom", layers=layers, width=width, embedding_size=state["head.3.weight"].shape[0])
    except (KeyError, ValueError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{source}: not an iResNet backbone state dict ({reason[:200]})") from None
    problem = first_mismatch(state, backbone)
    if problem:
        raise ConfigError(f"{source}: not an iResNet backbone state dict ({problem})")
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()


def load_backbone(url: str) -> tuple[IResNet, dict[str, Any]]:
    """The backbone at ``url`` and what it is.

    ``url`` is a committed ``step-<N>`` directory, a checkpoint root (its
    newest committed step), or an exported torch state dict (``.pt``; with or
    without ``--head``); local or ``s3://``.
    """
    fs, path = open_url(url, what="the model")
    if fs.isfile(path):
        try:
            loaded = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(
                f"{url}: not a torch.save file ({type(err).__name__}); pass a checkpoint or an "
                "exported backbone state dict (.pt)"
            ) from None
        if isinstance(loaded, dict) and isinstance(loaded.get("backbone"), dict):
            loaded = loaded["backbone"]  # an export with --head
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ConfigError(f"{url}: holds a {type(loaded).__name__}, not a backbone state dict")
        return backbone_from_state(loaded, url), {"url": url, "kind": "exported", "step": None}

    info = find_checkpoint(url)
    backbone = checkpoint_backbone(info, load_tensors(info.url, ("backbone",))["backbone"])
    return backbone, {"url": info.url, "kind": "checkpoint", "step": info.step}
