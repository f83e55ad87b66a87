"""The iResNet backbones: shapes, architecture, parameter counts, gradients, validation.

The large depths are built on the meta device (no memory, no init cost), and
their parameter counts are checked against a count derived independently
from the block recipe, and for r50/r100 against insightface's published sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfr.trainer.config import BACKBONE_DEPTHS
from mfr.trainer.models import IBasicBlock, IResNet, build_backbone, count_parameters

SEED_RESNET240 = (3, 25, 88, 3)


def _expected_parameters(layers, channels, embedding_size: int) -> int:
    """Parameter count of an iResNet, from the recipe rather than from the modules."""
    bn = 2  # weight + bias per channel
    stem = 3 * 9 * channels[0] + bn * channels[0] + channels[0]  # conv3x3, BN, PReLU
    body = 0
    in_channels = channels[0]
    for depth, c in zip(layers, channels):
        for block in range(depth):
            cin = in_channels if block == 0 else c
            body += bn * cin + 9 * cin * c + bn * c + c + 9 * c * c + bn * c
            if block == 0:  # strided: conv1x1 + BN shortcut
                body += cin * c + bn * c
        in_channels = c
    head = bn * channels[3] + channels[3] * 7 * 7 * embedding_size + embedding_size + bn * embedding_size
    return stem + body + head


def _on_meta(name: str, **kwargs) -> IResNet:
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def test_tiny_forward_gives_one_embedding_per_image():
    torch.manual_seed(0)
    model = build_backbone("tiny")
    stage_sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda _m, _i, out: stage_sizes.append(tuple(out.shape[1:])))
    embeddings = model(torch.randn(3, 3, 112, 112))
    assert embeddings.shape == (3, 512)
    assert torch.isfinite(embeddings).all()
    c = model.channels
    assert stage_sizes == [(c[0], 56, 56), (c[1], 28, 28), (c[2], 14, 14), (c[3], 7, 7)]


def test_custom_config_forward():
    torch.manual_seed(0)
    model = build_backbone("custom", layers=[1, 2, 1, 1], width=0.125, embedding_size=64, dropout=0.2)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 64)
    assert [len(stage) for stage in model.stages] == [1, 2, 1, 1]


@pytest.mark.parametrize(
    ("name", "layers"),
    [(name, None) for name in BACKBONE_DEPTHS] + [("custom", SEED_RESNET240)],
)
def test_every_depth_builds_with_the_architecture_it_names(name, layers):
    model = _on_meta(name, layers=layers)
    expected_layers = layers or BACKBONE_DEPTHS[name]
    assert isinstance(model.stages, nn.ModuleList) and len(model.stages) == 4
    assert [len(stage) for stage in model.stages] == list(expected_layers)
    assert all(isinstance(block, IBasicBlock) for stage in model.stages for block in stage)
    # Only each stage's first block halves the map and so has a conv shortcut.
    for stage in model.stages:
        assert isinstance(stage[0].downsample, nn.Sequential)
        assert stage[0].residual[4].stride == (2, 2)
        assert all(isinstance(block.downsample, nn.Identity) for block in stage[1:])
    assert count_parameters(model) == _expected_parameters(expected_layers, model.channels, 512)


@pytest.mark.parametrize(("name", "insightface_params"), [("r50", 43.6e6), ("r100", 65.2e6)])
def test_parameter_count_matches_insightface(name, insightface_params):
    assert count_parameters(_on_meta(name)) == pytest.approx(insightface_params, rel=0.01)


def test_width_multiplies_every_stage():
    assert _on_meta("r18").channels == (64, 128, 256, 512)
    half = _on_meta("r18", width=0.5)
    assert half.channels == (32, 64, 128, 256)
    assert half.stem[0].weight.shape == (32, 3, 3, 3)
    assert half.stages[3][0].residual[4].weight.shape == (256, 256, 3, 3)
    assert half.head[3].in_features == 256 * 7 * 7
    assert _on_meta("r18", width=1.5).channels == (96, 192, 384, 768)
    assert count_parameters(half) == _expected_parameters((2, 2, 2, 2), (32, 64, 128, 256), 512)


def test_tiny_uses_its_own_small_default_width():
    assert max(_on_meta("tiny").channels) < 512
    assert _on_meta("tiny", width=1.0).channels == (64, 128, 256, 512)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": (2, 2, 2)}, "layers must be 4 positive integers"),
        ({"layers": (2, 0, 2, 2)}, "layers must be 4 positive integers"),
        ({"layers": (2, -1, 2, 2)}, "layers must be 4 positive integers"),
        ({"layers": (2, 2.5, 2, 2)}, "layers must be 4 positive integers"),
        ({"layers": (1, 1, 1, 1), "width": 0.0}, "width must be"),
        ({"layers": (1, 1, 1, 1), "width": -1.0}, "width must be"),
        ({"layers": (1, 1, 1, 1), "width": math.nan}, "width must be"),
        ({"layers": (1, 1, 1, 1), "width": math.inf}, "width must be"),
        ({"layers": (1, 1, 1, 1), "embedding_size": 0}, "embedding_size must be >= 1"),
        ({"layers": (1, 1, 1, 1), "dropout": 1.0}, "dropout must be in"),
    ],
)
def test_invalid_model_arguments_are_rejected(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        IResNet(**kwargs)


def test_build_backbone_rejects_bad_names_and_layers():
    with pytest.raises(
        ValueError, match=r"unknown backbone 'r1000'; valid names: tiny, r18, .*r200, r240, r600, r1200, custom"
    ):
        build_backbone("r1000")
    with pytest.raises(ValueError, match="'custom' needs layers"):
        build_backbone("custom")
    with pytest.raises(ValueError, match="only used with backbone 'custom'"):
        build_backbone("r50", layers=[3, 4, 14, 3])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=32, dropout=0.1)
    embeddings = model(torch.randn(4, 3, 112, 112))
    # A random projection: the squared norm of a BatchNorm1d output is nearly
    # constant over the batch, so it would give (almost) no gradient.
    (embeddings * torch.randn_like(embeddings)).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic_and_per_image():
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=32, dropout=0.5)
    model(torch.randn(8, 3, 112, 112))  # one training step's worth of BN running statistics
    model.eval()
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        first, second = model(images), model(images)
        alone = model(images[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone[0], first[1], rtol=1e-4, atol=1e-5)
