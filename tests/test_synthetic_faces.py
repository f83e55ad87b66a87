"""The built-in synthetic faces and the mask augmentation.

Checked: determinism (across separately built datasets and DataLoader
workers), shapes, value ranges and labels; that masks never touch the upper
face (for every style, many random draws and posed landmarks) yet do cover
the nose-chin region; that ``render(masked=True)`` differs from the unmasked
photo only below the eyes; MaskAugment's rate; and that identities are
distinct while photos of one identity vary but stay closer to each other.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mfr.trainer.data.masks import ARCFACE_TEMPLATE_112, MASK_STYLES, MaskAugment, apply_mask
from mfr.trainer.data.synthetic import SyntheticFaces, to_tensor

SIZE = 112


def _eye_line_row(landmarks: np.ndarray) -> int:
    """The first row a mask may touch: 4 px below the lower eye (written out independently of masks.py)."""
    return math.ceil(float(landmarks[:2, 1].max())) + 4


def _posed_landmarks(rng: np.random.Generator) -> np.ndarray:
    """The template under a random rotation (+-10 deg), scale (+-8 %) and shift (+-4 px)."""
    angle, scale = math.radians(rng.uniform(-10, 10)), rng.uniform(0.92, 1.08)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([56.0, 64.0])
    return ((ARCFACE_TEMPLATE_112 - centre) @ rotation.T + centre + rng.uniform(-4, 4, 2)).astype(np.float32)


def _noise_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


# --- masks -----------------------------------------------------------------------------------------


def test_template_is_the_arcface_five_points():
    assert ARCFACE_TEMPLATE_112.shape == (5, 2) and ARCFACE_TEMPLATE_112.dtype == np.float32
    np.testing.assert_allclose(ARCFACE_TEMPLATE_112[0], [38.2946, 51.6963], atol=1e-4)
    np.testing.assert_allclose(ARCFACE_TEMPLATE_112[4], [70.7299, 92.2041], atol=1e-4)
    assert len(set(MASK_STYLES)) == len(MASK_STYLES) >= 4


@pytest.mark.parametrize("style", MASK_STYLES)
def test_mask_never_touches_the_upper_face(style):
    for seed in range(60):
        rng = np.random.default_rng(seed)
        landmarks = ARCFACE_TEMPLATE_112 if seed % 2 == 0 else _posed_landmarks(rng)
        image = _noise_image(seed)
        before = image.copy()
        out = apply_mask(image, rng, style=style, landmarks=None if seed % 2 == 0 else landmarks)
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(image, before)  # the input is left alone
        top = _eye_line_row(landmarks)
        np.testing.assert_array_equal(out[:top], image[:top])
        assert (out[top:] != image[top:]).any(axis=2).mean() > 0.15


@pytest.mark.parametrize("style", MASK_STYLES)
def test_mask_covers_nose_mouth_and_chin(style):
    for seed in range(20):
        image = _noise_image(100 + seed)
        out = apply_mask(image, np.random.default_rng(seed), style=style)
        # From just below the nose tip (y 72) to the chin, between the mouth corners.
        changed = (out[76:106, 42:70] != image[76:106, 42:70]).any(axis=2)
        assert changed.mean() > 0.95, (style, seed, changed.mean())
        # The cheeks beside the nose are covered too.
        assert (out[76:86, 28:36] != image[76:86, 28:36]).any(axis=2).mean() > 0.9


def test_mask_styles_and_draws_look_different():
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    masks = [apply_mask(image, np.random.default_rng(0), style=style) for style in MASK_STYLES]
    coverage = [(m != image).any(axis=2) for m in masks]
    for i in range(len(masks)):
        for j in range(i):
            assert (coverage[i] != coverage[j]).mean() > 0.02, (MASK_STYLES[i], MASK_STYLES[j])
    colours = {apply_mask(image, np.random.default_rng(seed), style="cloth")[85, 56].tobytes() for seed in range(20)}
    assert len(colours) > 5


def test_apply_mask_is_deterministic_given_the_rng():
    image = _noise_image(7)
    first = apply_mask(image, np.random.default_rng(3))
    np.testing.assert_array_equal(first, apply_mask(image, np.random.default_rng(3)))
    assert not np.array_equal(first, apply_mask(image, np.random.default_rng(4)))


def test_bad_mask_arguments_raise():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown mask style 'scuba'"):
        apply_mask(image, np.random.default_rng(0), style="scuba")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        apply_mask(image.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="landmarks"):
        apply_mask(image, np.random.default_rng(0), landmarks=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="p must be in"):
        MaskAugment(p=1.5)
    with pytest.raises(ValueError, match="styles"):
        MaskAugment(styles=("surgical", "scuba"))
    with pytest.raises(ValueError, match="styles"):
        MaskAugment(styles=())


@pytest.mark.parametrize("p, low, high", [(0.0, 0, 0), (1.0, 400, 400), (0.35, 102, 178)])
def test_mask_augment_rate(p, low, high):
    """0.35 * 400 = 140 masked expected; the bounds are 4 binomial standard deviations (9.5)."""
    augment, image = MaskAugment(p), np.full((SIZE, SIZE, 3), 128, np.uint8)
    rng = np.random.default_rng(11)
    masked = 0
    for _ in range(400):
        out, was_masked = augment(image, rng)
        assert was_masked == (not np.array_equal(out, image))
        masked += was_masked
    assert low <= masked <= high


def test_mask_augment_uses_only_its_styles():
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    bandana = apply_mask(image, np.random.default_rng(0), style="bandana")
    augment = MaskAugment(p=1.0, styles=("n95",))
    for seed in range(10):
        out, _ = augment(image, np.random.default_rng(seed))
        # An n95 cup never reaches the lower image corners that a bandana's wide top covers.
        assert (out[70:75, :8] == 128).all() and (bandana[70:75, :8] != 128).any()


# --- synthetic faces -------------------------------------------------------------------------------


def test_items_have_the_documented_shape_range_and_labels():
    faces = SyntheticFaces(num_identities=3, images_per_identity=4, seed=5)
    assert len(faces) == 12
    for index in range(len(faces)):
        image, label = faces[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1
        assert type(label) is int and label == index // 4
    with pytest.raises(IndexError):
        faces[12]
    photo = faces.render(2, 3, masked=True)
    assert photo.shape == (SIZE, SIZE, 3) and photo.dtype == np.uint8
    with pytest.raises(IndexError):
        faces.render(3, 0, masked=False)


def test_bad_dataset_arguments_raise():
    with pytest.raises(ValueError):
        SyntheticFaces(0, 4)
    with pytest.raises(ValueError):
        SyntheticFaces(2, 4, identity_offset=-1)
    with pytest.raises(ValueError):
        SyntheticFaces(2, 4, mask_prob=1.2)


def test_to_tensor_normalisation():
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    tensor = to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, SIZE, SIZE) and tensor.is_contiguous()
    expected = (image.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=1e-6)
    assert (tensor[:, 0, 0].numpy() == -1).all() and (tensor[:, 0, 1].numpy() == 1).all()


def test_same_arguments_give_identical_photos():
    first = SyntheticFaces(4, 5, seed=3, mask_prob=0.5)
    second = SyntheticFaces(4, 5, seed=3, mask_prob=0.5)
    # Opposite visiting orders: nothing may depend on what was rendered before.
    forward = {i: first[i] for i in range(20)}
    backward = {i: second[i] for i in reversed(range(20))}
    for index in range(20):
        assert forward[index][1] == backward[index][1]
        assert forward[index][0].numpy().tobytes() == backward[index][0].numpy().tobytes()
    assert torch.equal(first[7][0], forward[7][0])
    for masked in (False, True):
        assert first.render(2, 1, masked).tobytes() == second.render(2, 1, masked).tobytes()
    other_seed = SyntheticFaces(4, 5, seed=4, mask_prob=0.5)
    assert not torch.equal(first[0][0], other_seed[0][0])


def test_dataloader_workers_give_the_same_photos():
    faces = SyntheticFaces(2, 4, seed=1)
    direct = torch.stack([faces[i][0] for i in range(8)])
    loaded = torch.cat([batch for batch, _ in DataLoader(faces, batch_size=3, num_workers=2)])
    assert torch.equal(direct, loaded)


def test_masked_render_differs_only_below_the_eyes():
    faces = SyntheticFaces(3, 16, seed=2)
    for identity in range(3):
        for sample in range(16):
            plain = faces.render(identity, sample, masked=False)
            masked = faces.render(identity, sample, masked=True)
            eyes_y = faces.landmarks(identity, sample)[:2, 1].max()
            # Blur (on some photos) may spread the mask's edge up by a few rows, never above the eyes.
            np.testing.assert_array_equal(masked[: int(eyes_y)], plain[: int(eyes_y)])
            mouth_rows = slice(int(eyes_y) + 30, int(eyes_y) + 45)
            assert (masked[mouth_rows] != plain[mouth_rows]).any(axis=2).mean() > 0.3


def test_training_photos_are_the_rendered_ones_maybe_mirrored():
    faces = SyntheticFaces(2, 20, seed=6, mask_prob=0.35, flip=True)
    seen = {"masked": 0, "mirrored": 0}
    for index in range(len(faces)):
        identity, sample = divmod(index, 20)
        image = faces[index][0].numpy()
        for masked in (False, True):
            rendered = to_tensor(faces.render(identity, sample, masked)).numpy()
            if np.array_equal(image, rendered) or np.array_equal(image, rendered[:, :, ::-1]):
                seen["masked"] += masked
                seen["mirrored"] += not np.array_equal(image, rendered)
                break
        else:
            pytest.fail(f"training photo {index} is neither rendering")
    assert 0 < seen["masked"] < 40 and 0 < seen["mirrored"] < 40
    unflipped = SyntheticFaces(2, 20, seed=6, mask_prob=0.0, flip=False)
    for index in range(len(unflipped)):
        rendered = to_tensor(unflipped.render(*divmod(index, 20), masked=False))
        assert np.array_equal(unflipped[index][0].numpy(), rendered.numpy())


def _upper_face(photo: np.ndarray) -> np.ndarray:
    """Forehead, eyes and brows: the part of a face a mask leaves visible."""
    return photo[12:56, 24:88].astype(np.float64)


def test_identities_are_distinct_and_photos_of_one_identity_vary_but_stay_closer():
    faces = SyntheticFaces(8, 5, seed=0)
    photos = [[_upper_face(faces.render(k, s, masked=False)) for s in range(5)] for k in range(8)]
    within = [np.mean((a[i] - a[j]) ** 2) for a in photos for i in range(5) for j in range(i)]
    between = [
        np.mean((photos[k][s] - photos[m][t]) ** 2)
        for k in range(8)
        for m in range(k)
        for s in range(5)
        for t in range(5)
    ]
    assert min(within) > 100  # pose, lighting and noise do change every photo
    assert np.mean(within) < 0.6 * np.mean(between)
    # Same pose and lighting (same sample index), different identity: still clearly different.
    assert min(np.mean((photos[k][0] - photos[m][0]) ** 2) for k in range(8) for m in range(k)) > 300


def test_identity_offset_selects_global_identities():
    base = SyntheticFaces(6, 3, seed=0)
    held_out = SyntheticFaces(2, 3, seed=0, identity_offset=4)
    for k in range(2):
        for sample in range(3):
            expected = base.render(4 + k, sample, masked=False)
            assert held_out.render(k, sample, masked=False).tobytes() == expected.tobytes()
        assert held_out[k * 3][1] == k
    # Same label k, different look from the offset-0 identity k.
    difference = np.abs(held_out.render(0, 0, False).astype(int) - base.render(0, 0, False).astype(int))
    assert difference.mean() > 10
