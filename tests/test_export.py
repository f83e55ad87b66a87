"""BatchNorm folding and the ONNX export, against the unfolded torch model.

The backbones get random BatchNorm statistics and affine parameters (a
fresh model's are 0/1, which would make folding a no-op), so every folded
scale and shift is exercised.  ``mfrctl export`` itself, on checkpoints
written by real ranks, is tested in test_ckpt_cli.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mfr.trainer.export import (
    MAX_ABS_DIFF,
    NORMALISATION,
    fold_batchnorm,
    onnx_max_abs_diff,
    onnx_metadata,
    to_onnx,
    verification_inputs,
)
from mfr.trainer.models import IResNet, build_backbone


def _trained_looking(model: IResNet, seed: int) -> IResNet:
    """``model`` with random BN statistics, BN affines and PReLU slopes, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def backbone() -> IResNet:
    torch.manual_seed(0)
    return _trained_looking(build_backbone("custom", layers=[1, 2, 1, 1], width=0.0625, embedding_size=24), 1)


def test_folded_model_equals_the_original_in_eval_mode(backbone):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = _trained_looking(build_backbone("tiny", embedding_size=16, dropout=0.4), 2)
    for m in (backbone, model):
        folded = fold_batchnorm(m)
        images = verification_inputs()["synthetic faces"][:4]  # two photos, each masked and not
        with torch.no_grad():
            expected, got = m(images), folded(images)
            scale = expected.abs().max()
            assert scale > 0.5  # not a degenerate comparison
            assert (got - expected).abs().max() < 1e-5 * scale  # float32 rounding only
            # In float64 the rounding is gone: folding is exact up to 1e-12, not merely close.
            m64, images64 = copy.deepcopy(m).double(), images.double()
            exact = (fold_batchnorm(m64)(images64) - m64(images64)).abs().max()
        assert exact < 1e-12 * scale

        # Only each block's input BN is left (it precedes a zero-padded conv); no Dropout, no BatchNorm1d.
        blocks = sum(len(stage) for stage in m.stages)
        kept = [n for n, x in folded.named_modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
        assert kept == [f"stages.{s}.{b}.residual.0" for s, stage in enumerate(m.stages) for b in range(len(stage))]
        assert len(kept) == blocks
        assert not any(isinstance(x, nn.Dropout) for x in folded.modules())
    for k, v in backbone.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


def test_folding_a_conv_batchnorm_pair_by_hand():
    """One conv -> BN against the textbook formula: W * g / sqrt(v + eps), b' = beta - mean * g / sqrt(v + eps)."""
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, eps=1e-3)
    _trained_looking(nn.Sequential(conv, bn), 4)
    folded = fold_batchnorm(nn.Sequential(conv, bn))[0]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.weight, conv.weight * scale[:, None, None, None])
    torch.testing.assert_close(folded.bias, bn.bias - bn.running_mean * scale)


def test_onnx_model_gives_the_torch_embeddings_for_any_batch_size(backbone):
    import onnx

    model_bytes = to_onnx(fold_batchnorm(backbone), {"embedding_size": "24", "normalisation": NORMALISATION})
    inputs = verification_inputs()  # batches of 3 and 8; the export traced a batch of 2
    diffs = onnx_max_abs_diff(model_bytes, backbone, inputs)
    assert set(diffs) == {"random", "synthetic faces"}
    assert max(diffs.values()) < MAX_ABS_DIFF

    meta = onnx_metadata(model_bytes)
    assert meta["embedding_size"] == "24" and meta["normalisation"] == NORMALISATION and meta["opset"] == "20"
    proto = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(proto)
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        "batch",
        3,
        112,
        112,
    ]
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("BatchNormalization") == 5  # the five blocks' input BNs; every other one is folded
    assert "Dropout" not in ops

    # The check can fail: the same ONNX model against a backbone that differs by 1e-3 in one bias.
    other = fold_batchnorm(backbone)
    with torch.no_grad():
        other.head[3].bias[0] += 1e-3
    assert onnx_max_abs_diff(model_bytes, other, inputs)["random"] == pytest.approx(1e-3, rel=0.05)
