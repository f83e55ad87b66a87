"""Read a committed checkpoint in one process, and export its backbone.

Two export formats: ONNX, the one to ship (BatchNorm folded, verified
against torch with onnxruntime before anything is written), and a plain
torch state dict, to fine-tune or evaluate in torch.

The head's per-rank blocks are merged into one ``num_classes x D`` matrix
by DCP itself (from the saved offsets), so an export never depends on the
world size the checkpoint was written with.

Folding is exact only where a BatchNorm *follows* a linear map: every
conv -> BN (and the shortcut's conv1x1 -> BN), the head's Linear -> BatchNorm1d,
and the head's BatchNorm2d, which reaches the Linear through Flatten alone.
The BatchNorm at each block's input is left as it is (an ONNX
BatchNormalization node, one per-channel multiply-add): it precedes a
zero-padded conv3x3, and folding it forward would add its shift at the
border pixels too, where the padding's zeros never received it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .checkpoint_reader import load_tensors
from .config import INPUT_SIZE, ConfigError
from .models import IResNet
from .saved_models import checkpoint_backbone
from .storage import CheckpointInfo

ONNX_INPUT, ONNX_OUTPUT = "images", "embeddings"
NORMALISATION = "RGB, (pixel / 255 - 0.5) / 0.5, i.e. [-1, 1]"  # as trainer.data.synthetic.to_tensor
MAX_ABS_DIFF = 1e-4  # onnxruntime vs torch, per embedding value
PROTOBUF_LIMIT = 2**31 - 2**24  # an ONNX file is one protobuf message; the graph needs room too


class ExportMismatch(RuntimeError):
    """The ONNX model's embeddings differ from torch's by more than ``MAX_ABS_DIFF``."""


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``x * scale + shift`` per channel, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} keeps no running statistics: eval mode uses batch statistics, nothing to fold")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    return scale, shift


def _fold_output(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """``bn(layer(x))`` as one layer with a bias: output channel ``c`` scaled and shifted."""
    scale, shift = _batchnorm_affine(bn)
    weight = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(shift)
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter((weight * scale.view(-1, *[1] * (weight.dim() - 1))).to(layer.weight.dtype))
    folded.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))
    return folded


def _fold_input(bn: nn.BatchNorm2d, linear: nn.Linear) -> nn.Linear:
    """``linear(flatten(bn(x)))`` as one Linear: Flatten keeps channel-major order, so channel ``c``
    owns ``in_features / C`` consecutive columns."""
    scale, shift = _batchnorm_affine(bn)
    per_channel = linear.in_features // scale.numel()
    scale, shift = scale.repeat_interleave(per_channel), shift.repeat_interleave(per_channel)
    weight = linear.weight.detach().double()
    bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(linear.out_features).double()
    folded = copy.deepcopy(linear)
    folded.weight = nn.Parameter((weight * scale).to(linear.weight.dtype))
    folded.bias = nn.Parameter((bias + weight @ shift).to(linear.weight.dtype))
    return folded


def _fold_sequential(seq: nn.Sequential) -> None:
    """Fold, in place, every BatchNorm of ``seq`` that exactly can be; folded BNs and Dropout become Identity."""
    layers = list(seq)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Dropout):
            layers[i] = nn.Identity()  # eval mode: the identity already
    for i in range(len(layers) - 1):
        layer, after = layers[i], layers[i + 1]
        if (isinstance(after, nn.BatchNorm2d) and isinstance(layer, nn.Conv2d)) or (
            isinstance(after, nn.BatchNorm1d) and isinstance(layer, nn.Linear)
        ):
            layers[i], layers[i + 1] = _fold_output(layer, after), nn.Identity()
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.BatchNorm2d):
            continue
        rest = layers[i + 1 :]
        between = next((j for j, m in enumerate(rest) if not isinstance(m, (nn.Identity, nn.Flatten))), len(rest))
        linear = rest[between] if between < len(rest) else None
        reaches = isinstance(linear, nn.Linear) and linear.in_features % layer.num_features == 0
        if reaches and any(isinstance(m, nn.Flatten) for m in rest[:between]):
            layers[i], layers[i + 1 + between] = nn.Identity(), _fold_input(layer, linear)
    for i, layer in enumerate(layers):
        seq[i] = layer


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with its BatchNorms folded where that is exact (see the module doc).

    Works on the ``nn.Sequential`` runs of any iResNet; the original is untouched.
    """
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in list(folded.modules()):
            if isinstance(module, nn.Sequential):
                _fold_sequential(module)
    return folded.requires_grad_(False)


def verification_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """What the export is checked on: uniform noise over the input range, and synthetic faces with and
    without masks.  Batch sizes differ from the export's example, which checks the dynamic batch axis."""
    from .data.synthetic import SyntheticFaces, to_tensor

    noise = torch.rand(3, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    faces = SyntheticFaces(num_identities=2, images_per_identity=2, seed=seed)
    photos = [faces.render(i, s, masked) for i in range(2) for s in range(2) for masked in (False, True)]
    return {"random": noise, "synthetic faces": torch.stack([to_tensor(p) for p in photos])}


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the named loggers (the exporter logs progress and missing torchvision ops as warnings)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: nn.Module, metadata: dict[str, str]) -> bytes:
    """``model`` (eval mode) as a serialized ONNX model with a dynamic batch axis; ``metadata`` and
    the opset go into its metadata_props.

    torch 2.13's ``torch.onnx.export`` uses the torch.export-based ("dynamo") exporter by default,
    which needs onnxscript, at its default opset (20): the one its translations are written for."""
    import onnx

    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)  # batch 2: torch.export specialises a batch of 1
    with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._dynamo"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (example,),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    onnx.helper.set_model_props(proto, {**metadata, "opset": str(opset)})
    return proto.SerializeToString()


def onnx_metadata(onnx_model: bytes) -> dict[str, str]:
    """The metadata_props of a serialized ONNX model."""
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(onnx_model).metadata_props}


def onnx_max_abs_diff(onnx_model: bytes, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per input set, the largest ``|onnxruntime - torch|`` over all embedding values."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    diffs = {}
    with torch.no_grad():
        for name, images in inputs.items():
            expected = model.eval()(images).double()
            got = torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0]).double()
            if got.shape != expected.shape:
                raise ExportMismatch(
                    f"onnxruntime gives {tuple(got.shape)} embeddings on {name}, torch {tuple(expected.shape)}"
                )
            diffs[name] = float((got - expected).abs().max())
    return diffs


def _onnx_export(info: CheckpointInfo, backbone: IResNet) -> tuple[bytes, dict[str, Any]]:
    """The folded backbone as verified ONNX bytes, and what was checked."""
    weight_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    if weight_bytes >= PROTOBUF_LIMIT:
        raise ConfigError(
            f"{info.url}: {weight_bytes / 2**30:.1f} GiB of weights, over the 2 GiB an ONNX file can hold "
            "(external-data export is not supported); export --format torch"
        )
    model_cfg = info.config["model"]
    metadata = {
        "embedding_size": str(backbone.embedding_size),
        "input": f"{ONNX_INPUT}: float32 N x 3 x {INPUT_SIZE} x {INPUT_SIZE}",
        "normalisation": NORMALISATION,
        "output": f"{ONNX_OUTPUT}: float32 N x {backbone.embedding_size}, not L2-normalised (compare by cosine)",
        "backbone": str(model_cfg["backbone"]),
        "layers": ",".join(str(n) for n in backbone.layers),
        "channels": ",".join(str(n) for n in backbone.channels),
        "batchnorm": "folded into the convolutions and the final Linear; each block's input BatchNorm kept",
        "source": info.url,
        "step": str(info.step),
    }
    onnx_model = to_onnx(fold_batchnorm(backbone), metadata)
    diffs = onnx_max_abs_diff(onnx_model, backbone, verification_inputs())
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= MAX_ABS_DIFF:  # also catches NaN
        raise ExportMismatch(
            f"the ONNX model differs from the torch model by {diffs[worst]:.3g} on {worst} "
            f"(allowed {MAX_ABS_DIFF:g}); nothing written"
        )
    return onnx_model, {"opset": int(onnx_metadata(onnx_model)["opset"]), "max_abs_diff": diffs, "metadata": metadata}


def export_checkpoint(
    info: CheckpointInfo, out_url: str, fmt: str, with_head: bool, open_output: Callable[..., Any]
) -> dict[str, Any]:
    """Export ``info``'s backbone to ``out_url``: ``fmt`` "onnx" (verified before it is written) or
    "torch" (``backbone.state_dict()``, or with the head ``{"backbone": ..., "head": {"weight": ...}}``)."""
    keys = ("backbone", "head") if with_head else ("backbone",)
    state = load_tensors(info.url, keys)
    summary: dict[str, Any] = {"step": info.step, "source": info.url, "output": out_url, "format": fmt}
    if fmt == "onnx":
        payload, checked = _onnx_export(info, checkpoint_backbone(info, state["backbone"]))
        summary.update(checked)
    else:
        backbone = state["backbone"]
        buffer = io.BytesIO()
        saved = {"backbone": backbone, "head": {"weight": state["head"]["weight"]}} if with_head else backbone
        torch.save(saved, buffer)
        payload = buffer.getvalue()
        summary["tensors"] = len(backbone) + int(with_head)
        summary["head_shape"] = list(state["head"]["weight"].shape) if with_head else None
    try:
        with open_output(out_url, "wb") as f:
            f.write(payload)
    except OSError as err:  # a missing folder or bucket, no permission: the user's to fix
        raise ConfigError(f"cannot write {out_url}: {err.strerror or err}") from None
    model = (info.config or {}).get("model", {})
    summary["bytes"] = len(payload)
    summary["model"] = {k: model.get(k) for k in ("backbone", "layers", "width", "embedding_size")}
    return summary
