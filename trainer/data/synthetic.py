"""The built-in dataset: procedurally drawn face-like identities, optionally wearing masks.

No download, deterministic per seed.  Every identity has a stable look drawn
from ``(seed, identity)`` alone: face outline, skin tone and a low-frequency
skin pattern, hair, eyes, brows, glasses, forehead marks, and a nose, mouth
and beard under where a mask goes.  Most of the look sits in the upper face,
so a model can tell identities apart with the lower face masked.  Eyes, nose
and mouth sit on the ArcFace 5-point template, the layout of a real aligned
112x112 crop.

A photo of an identity is its cached neutral drawing, posed by one affine
warp onto a random background, sometimes masked, then lit, colour-cast,
sometimes blurred, and noised.  Randomness comes only from
``np.random.default_rng([stream, seed, identity, sample])``: one stream for
an identity's look, one per photo.  No global state, nothing depends on the
worker process, and since a photo draws its mask last, masking a photo
changes nothing else about it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from .masks import ARCFACE_TEMPLATE_112, MaskAugment

SIZE = 112
_SUPERSAMPLE = 2  # neutral faces are drawn at 2x and box-filtered down: smooth edges
_POSE_CENTRE = (56.0, 64.0)
_APPEARANCE, _PHOTO = 0, 1  # random streams: an identity's look, one photo of it

# Ordered palettes: _between() mixes neighbours, so each is a continuum rather than a few classes.
_SKIN_TONES = (
    (255, 224, 200),
    (241, 194, 167),
    (224, 172, 135),
    (198, 140, 100),
    (161, 105, 72),
    (120, 78, 52),
    (84, 55, 38),
)
_HAIR_COLOURS = (
    (22, 18, 18),
    (48, 32, 24),
    (84, 56, 34),
    (125, 85, 50),
    (180, 135, 75),
    (222, 190, 120),
    (150, 62, 32),
    (155, 155, 155),
    (232, 230, 225),
    (60, 40, 90),
)
_EYE_COLOURS = (
    (62, 40, 24),
    (95, 62, 32),
    (40, 30, 26),
    (70, 115, 170),
    (85, 125, 85),
    (115, 120, 130),
    (135, 100, 45),
)
_FRAME_COLOURS = ((20, 20, 20), (90, 55, 30), (190, 160, 80), (170, 170, 175), (150, 30, 40), (30, 60, 140))
_HAIR_STYLES = ("bald", "short", "short", "fringe", "side_part", "long", "curly", "bob", "receding")
_BEARDS = ("none",) * 6 + ("stubble", "moustache", "goatee", "full")

Point = tuple[float, float]
Colour = tuple[int, int, int]
T = TypeVar("T")


def _rgb(values: Sequence[float]) -> Colour:
    r, g, b = (round(min(255.0, max(0.0, float(v)))) for v in values)
    return r, g, b


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return _rgb([x + (y - x) * t for x, y in zip(a, b)])


def _shade(colour: Colour, factor: float) -> Colour:
    return _rgb([c * factor for c in colour])


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[rng.integers(len(options))]


def _between(rng: np.random.Generator, palette: tuple[Colour, ...]) -> Colour:
    """A colour on the line between two neighbours of an ordered palette: a continuum, not classes."""
    i = int(rng.integers(len(palette) - 1))
    return _mix(palette[i], palette[i + 1], float(rng.random()))


class _Canvas:
    """Draws in 112-pixel coordinates on a supersampled colour image and its coverage."""

    def __init__(self) -> None:
        size = (SIZE * _SUPERSAMPLE,) * 2
        self.colour, self.coverage = Image.new("RGB", size), Image.new("L", size)
        self._colour, self._coverage = ImageDraw.Draw(self.colour), ImageDraw.Draw(self.coverage)

    @staticmethod
    def _scaled(points: list[Point]) -> list[Point]:
        return [(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in points]

    def polygon(self, points: list[Point], fill: Colour) -> None:
        self._colour.polygon(self._scaled(points), fill=fill)
        self._coverage.polygon(self._scaled(points), fill=255)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: Colour) -> None:
        box = self._scaled([(cx - rx, cy - ry), (cx + rx, cy + ry)])
        self._colour.ellipse(box, fill=fill)
        self._coverage.ellipse(box, fill=255)

    def line(self, points: list[Point], fill: Colour, width: float) -> None:
        pixels = max(1, round(width * _SUPERSAMPLE))
        self._colour.line(self._scaled(points), fill=fill, width=pixels, joint="curve")
        self._coverage.line(self._scaled(points), fill=255, width=pixels, joint="curve")

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Straight (not premultiplied) float colour and coverage in [0, 1] at 112x112."""
        premultiplied = np.asarray(self.colour.reduce(_SUPERSAMPLE), dtype=np.float32)
        coverage = np.asarray(self.coverage.reduce(_SUPERSAMPLE), dtype=np.float32) / 255
        return premultiplied / np.maximum(coverage, 1e-3)[..., None], coverage


def _ellipse_points(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, n: int) -> list[Point]:
    step = (stop - start) / (n - 1)
    return [(cx + rx * math.cos(start + i * step), cy + ry * math.sin(start + i * step)) for i in range(n)]


class _EyeShape(NamedTuple):
    half_width: float
    half_height: float
    tilt: float  # > 0 lifts the outer corners
    iris_colour: Colour
    iris_radius: float
    crease: bool


class _BrowShape(NamedTuple):
    thickness: float
    half_length: float
    inner_drop: float  # > 0 lowers the inner ends: a frown
    arch: float
    colour: Colour


class _Face:
    """One identity's look, drawn part by part from its appearance stream."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.skin = _between(rng, _SKIN_TONES)
        self.hair = _between(rng, _HAIR_COLOURS)
        self.cx, self.cy = 56 + rng.normal(0, 0.8), rng.uniform(57, 62)
        self.half_width, self.half_height = rng.uniform(33, 41), rng.uniform(46, 53)
        self.jaw_taper = rng.uniform(0.0, 0.3)
        self.hair_style = _pick(rng, _HAIR_STYLES)
        self.eyes = ARCFACE_TEMPLATE_112[:2].astype(float) + np.array([[-1, 0], [1, 0]]) * rng.uniform(-1.5, 1.5)
        self.eyes[:, 1] += rng.uniform(-1, 1)
        self.brow_gap = rng.uniform(7, 11)

    def outline(self, n: int = 40, grow: float = 1.0) -> list[Point]:
        """The head outline, narrowing towards the chin by ``jaw_taper``."""
        points = []
        for t in np.linspace(0, 2 * math.pi, n, endpoint=False):
            taper = 1 - self.jaw_taper * max(0.0, math.sin(t)) ** 2
            x = self.cx + grow * self.half_width * math.cos(t) * taper
            points.append((x, self.cy + grow * self.half_height * math.sin(t)))
        return points

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole look, back to front: straight float colour and coverage at 112x112."""
        canvas = _Canvas()
        self._back_hair(canvas)
        self._neck_and_ears(canvas)
        canvas.polygon(self.outline(), self.skin)
        self._skin_marks(canvas)
        self._nose(canvas)
        self._beard(canvas)
        self._mouth(canvas)
        eye, brow = self._eye_shape(), self._brow_shape()
        for side in (0, 1):
            self._eye(canvas, side, eye)
        self._front_hair(canvas)
        for side in (0, 1):
            self._brow(canvas, side, brow)
        if self.rng.random() < 0.3:
            self._glasses(canvas)
        colour, coverage = canvas.finish()
        return self._skin_pattern(colour), coverage

    def _back_hair(self, canvas: _Canvas) -> None:
        rng, top = self.rng, self.cy - self.half_height
        if self.hair_style == "long":
            width = self.half_width * rng.uniform(1.15, 1.35)
            canvas.polygon(
                _ellipse_points(self.cx, top + width, width, width, math.pi, 2 * math.pi, 16)
                + [(self.cx + width, SIZE + 2), (self.cx - width, SIZE + 2)],
                self.hair,
            )
        elif self.hair_style == "curly":
            radius, bumps = self.half_width * rng.uniform(1.25, 1.45), int(rng.integers(9, 15))
            centre_y = self.cy - self.half_height * 0.35
            points = [
                (
                    self.cx + radius * (1 + 0.07 * math.sin(bumps * t)) * math.cos(t),
                    centre_y + radius * (1 + 0.07 * math.sin(bumps * t)) * math.sin(t),
                )
                for t in np.linspace(0, 2 * math.pi, 60, endpoint=False)
            ]
            canvas.polygon(points, self.hair)
        elif self.hair_style == "bob":
            width = self.half_width * rng.uniform(1.1, 1.25)
            canvas.polygon(
                _ellipse_points(self.cx, top + width, width, width, math.pi, 2 * math.pi, 16)
                + [(self.cx + width, self.cy + rng.uniform(10, 30)), (self.cx - width, self.cy + rng.uniform(10, 30))],
                self.hair,
            )

    def _neck_and_ears(self, canvas: _Canvas) -> None:
        rng, neck = self.rng, _shade(self.skin, 0.82)
        half = self.half_width * rng.uniform(0.45, 0.6)
        canvas.polygon(
            [
                (self.cx - half, self.cy),
                (self.cx + half, self.cy),
                (self.cx + half * 1.2, SIZE + 2),
                (self.cx - half * 1.2, SIZE + 2),
            ],
            neck,
        )
        if self.hair_style in ("long", "bob"):
            return
        ear_y, rx, ry = rng.uniform(58, 66), rng.uniform(4, 6.5), rng.uniform(8, 12)
        for side in (-1, 1):
            x = self.cx + side * self.half_width * 0.97
            canvas.ellipse(x, ear_y, rx, ry, _shade(self.skin, 0.92))
            canvas.ellipse(x + side * 0.8, ear_y, rx * 0.45, ry * 0.6, _shade(self.skin, 0.75))

    def _skin_marks(self, canvas: _Canvas) -> None:
        """Moles, freckles, blush, forehead lines, birthmarks: small stable identity cues."""
        rng, top = self.rng, self.cy - self.half_height
        for _ in range(rng.poisson(1.0)):
            x, y = self.cx + rng.uniform(-0.75, 0.75) * self.half_width, rng.uniform(top + 12, self.cy + 25)
            radius = rng.uniform(0.6, 1.5)
            canvas.ellipse(x, y, radius, radius, _shade(self.skin, 0.5))
        if rng.random() < 0.15:
            for _ in range(int(rng.integers(15, 40))):
                x, y = self.cx + rng.uniform(-28, 28), rng.uniform(52, 76)
                canvas.ellipse(x, y, 0.5, 0.5, _shade(self.skin, 0.78))
        if rng.random() < 0.3:
            blush = _mix(self.skin, (210, 90, 100), rng.uniform(0.12, 0.25))
            for side in (-1, 1):
                canvas.ellipse(self.cx + side * 21, 74, 7, 5, blush)
        if rng.random() < 0.3:
            for i in range(int(rng.integers(1, 4))):
                y = self.eyes[0][1] - self.brow_gap - 6 - 3.5 * i
                canvas.line(
                    _ellipse_points(self.cx, y + 14, 14, 14, 1.2 * math.pi, 1.8 * math.pi, 6),
                    _shade(self.skin, 0.85),
                    0.6,
                )
        if rng.random() < 0.1:
            x, y = self.cx + rng.uniform(-25, 25), rng.uniform(top + 14, 45)
            canvas.ellipse(x, y, rng.uniform(2, 5), rng.uniform(1.5, 4), _mix(self.skin, (140, 70, 60), 0.35))
        if rng.random() < 0.05:
            canvas.ellipse(self.cx, self.eyes[0][1] - self.brow_gap + 1, 1.5, 1.5, (190, 30, 40))

    def _nose(self, canvas: _Canvas) -> None:
        rng = self.rng
        (x, y), half = ARCFACE_TEMPLATE_112[2] + rng.uniform(-1, 1, 2), rng.uniform(5, 9)
        shadow = _shade(self.skin, 0.82)
        for side in (-1, 1):
            canvas.line([(x + side * 3, self.eyes[0][1] + 4), (x + side * half * 0.7, y - 2)], shadow, 0.8)
            nostril = (rng.uniform(1.2, 2), rng.uniform(0.8, 1.3))
            canvas.ellipse(x + side * half * 0.55, y + 1.5, *nostril, _shade(self.skin, 0.45))
        canvas.ellipse(x, y - 1, 2.5, 2, _shade(self.skin, 1.06))

    def _beard(self, canvas: _Canvas) -> None:
        """None, or stubble, a moustache, a goatee or a full beard along the jaw."""
        rng, style = self.rng, _pick(self.rng, _BEARDS)
        if style == "none":
            return
        colour = self.hair if style != "stubble" else _mix(self.skin, self.hair, 0.35)
        (left, mouth_y), (right, _) = ARCFACE_TEMPLATE_112[3:].tolist()
        if style in ("full", "stubble"):
            # A band from the sideburns down the jaw, thickest at the chin.
            cheek, chin = rng.uniform(0.15, 0.45), rng.uniform(7, 13)
            inner_half_height = self.cy + self.half_height - chin - mouth_y
            outer, inner = [], []
            for t in np.linspace(cheek, math.pi - cheek, 15):
                across = self.half_width * math.cos(t) * (1 - self.jaw_taper * math.sin(t) ** 2)
                outer.append((self.cx + 1.02 * across, self.cy + 1.02 * self.half_height * math.sin(t)))
                inner.append((self.cx + 0.8 * across, mouth_y + inner_half_height * math.sin(t)))
            canvas.polygon(outer + inner[::-1], colour)
        if style in ("full", "stubble", "goatee"):
            canvas.ellipse(self.cx, mouth_y + 8, rng.uniform(6, 10), rng.uniform(5, 8), colour)
        if style in ("full", "stubble", "moustache"):
            moustache = [(left, mouth_y - 1), (right, mouth_y - 1), (right - 7, mouth_y - 7), (left + 7, mouth_y - 7)]
            canvas.polygon(moustache, colour)

    def _mouth(self, canvas: _Canvas) -> None:
        rng = self.rng
        (lx, ly), (rx, ry) = ARCFACE_TEMPLATE_112[3:].astype(float)
        width, y, smile = rng.uniform(0.8, 1.1), (ly + ry) / 2 + rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)
        cx, half = (lx + rx) / 2, (rx - lx) / 2 * width
        lip = _mix(self.skin, (165, 55, 65), rng.uniform(0.3, 0.6))
        upper, lower = rng.uniform(1.5, 3), rng.uniform(2, 4)
        left, right = (cx - half, y - smile), (cx + half, y - smile)
        upper_lip = [left, (cx - 3, y - upper), (cx, y - upper * 0.7), (cx + 3, y - upper), right]
        lower_lip = [right, (cx + half / 2, y + lower * 0.9), (cx, y + lower), (cx - half / 2, y + lower * 0.9), left]
        canvas.polygon(upper_lip, _shade(lip, 0.9))
        canvas.polygon(lower_lip, lip)
        canvas.line([left, (cx, y + 0.3), right], _shade(lip, 0.5), 0.7)

    def _eye_shape(self) -> _EyeShape:
        rng = self.rng
        return _EyeShape(
            rng.uniform(5.5, 8),
            rng.uniform(2.2, 3.6),
            rng.uniform(-0.12, 0.12),
            _between(rng, _EYE_COLOURS),
            rng.uniform(2.4, 3.4),
            rng.random() < 0.4,
        )

    def _eye(self, canvas: _Canvas, side: int, shape: _EyeShape) -> None:
        """An almond eye (mirrored between sides) with iris, pupil, lid lines and maybe a crease."""
        x, y = self.eyes[side]
        outward = -1 if side == 0 else 1

        def at(t: float, lid: float) -> Point:
            dx = shape.half_width * math.cos(t)
            return x + dx, y - lid * shape.half_height * math.sin(t) - shape.tilt * dx * outward

        upper = [at(t, 1.0) for t in np.linspace(0, math.pi, 9)]
        lower = [at(t, 0.75) for t in np.linspace(math.pi, 2 * math.pi, 9)]
        canvas.polygon(upper + lower, (236, 231, 224))
        radius = min(shape.iris_radius, shape.half_height)
        canvas.ellipse(x, y, radius, radius, shape.iris_colour)
        canvas.ellipse(x, y, radius * 0.45, radius * 0.45, (12, 10, 10))
        canvas.ellipse(x + 0.8, y - 0.8, 0.5, 0.5, (250, 250, 250))
        canvas.line(upper, (30, 20, 20), 1.0)
        canvas.line(lower, _shade(self.skin, 0.75), 0.5)
        if shape.crease:
            canvas.line([(px, py - 2.2) for px, py in upper[1:-1]], _shade(self.skin, 0.8), 0.5)

    def _front_hair(self, canvas: _Canvas) -> None:
        """The hair over the forehead, bounded below by the identity's hairline."""
        if self.hair_style == "bald":
            return
        rng, top = self.rng, self.cy - self.half_height
        depth = {"receding": (3, 7), "fringe": (24, 32)}.get(self.hair_style, (9, 20))
        centre = top + rng.uniform(*depth)
        temple = rng.uniform(38, 50) if self.hair_style != "receding" else rng.uniform(30, 38)
        part = rng.uniform(-12, 12) if self.hair_style == "side_part" else rng.uniform(-3, 3)
        power = rng.uniform(1.6, 4.0)
        volume = rng.uniform(1.03, 1.1)
        crown = [p for p in self.outline(48, volume) if p[1] < temple]
        crown.sort(key=lambda p: -p[0])  # right to left over the top
        left, right = self.cx - self.half_width * volume, self.cx + self.half_width * volume
        hairline = []
        for i, x in enumerate(np.linspace(left, right, 15)):
            reach = abs(x - self.cx - part) / (self.half_width * volume + abs(part))
            y = centre + (temple - centre) * min(1.0, reach) ** power
            if self.hair_style == "fringe":
                y += 2.5 * (i % 2)
            hairline.append((x, y))
        canvas.polygon(crown + hairline, self.hair)
        strands = _shade(self.hair, rng.uniform(0.7, 1.35))
        for x, y in hairline[2:-2:2]:
            canvas.line([(x, y - 1), ((x + self.cx + part) / 2, top + 2)], strands, 0.5)

    def _brow_shape(self) -> _BrowShape:
        rng = self.rng
        colour = _mix(self.hair, (25, 20, 18), 0.5) if self.hair_style != "bald" else _between(rng, _HAIR_COLOURS[:4])
        return _BrowShape(rng.uniform(1.2, 3.5), rng.uniform(6.5, 9.5), rng.uniform(-2, 2.5), rng.uniform(0, 3), colour)

    def _brow(self, canvas: _Canvas, side: int, shape: _BrowShape) -> None:
        x, y = self.eyes[side][0], self.eyes[side][1] - self.brow_gap
        inward = 1 if side == 0 else -1
        half, arch = shape.half_length, shape.arch
        points = [
            (x + inward * half, y + shape.inner_drop),
            (x + inward * half * 0.3, y - arch),
            (x - inward * half * 0.5, y - arch * 0.8),
            (x - inward * half * 1.1, y + 1.5),
        ]
        canvas.line(points, shape.colour, shape.thickness)

    def _glasses(self, canvas: _Canvas) -> None:
        rng = self.rng
        colour, width = _pick(rng, _FRAME_COLOURS), rng.uniform(0.6, 1.8)
        rx, ry, round_lens = rng.uniform(9, 12), rng.uniform(6, 8.5), rng.random() < 0.5
        for side, (x, y) in enumerate(self.eyes):
            y += 1
            if round_lens:
                canvas.line(_ellipse_points(x, y, rx, ry, 0, 2 * math.pi, 24), colour, width)
            else:
                corners = [(x - rx, y - ry), (x + rx, y - ry), (x + rx * 0.9, y + ry), (x - rx * 0.9, y + ry)]
                canvas.line(corners + corners[:1], colour, width)
            outward = -1 if side == 0 else 1
            canvas.line([(x + outward * rx, y - 2), (self.cx + outward * self.half_width * 1.02, y - 3)], colour, width)
        (lx, ly), (rx_, ry_) = self.eyes
        canvas.line([(lx + rx, ly - 1), (self.cx, ly - 3), (rx_ - rx, ry_ - 1)], colour, width)

    def _skin_pattern(self, colour: np.ndarray) -> np.ndarray:
        """A faint low-frequency colour pattern over the whole head, unique to the identity."""
        grid = Image.fromarray((128 + 40 * self.rng.standard_normal((4, 4, 3))).clip(0, 255).astype(np.uint8))
        field = (np.asarray(grid.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32) - 128) / 40
        return colour * (1 + self.rng.uniform(0.03, 0.07) * field)


@functools.lru_cache(maxsize=512)
def _neutral_face(seed: int, identity: int) -> Image.Image:
    """The identity's drawing before any per-photo change: RGBA at twice the photo size.

    It is the anti-aliased 112x112 drawing enlarged bilinearly, so the
    nearest-neighbour lookups of a pose warp (several times faster than
    PIL's bilinear affine warp) land within a quarter pixel of a bilinear
    sample.  Cached per process, about 200 KB per identity.
    """
    colour, coverage = _Face(np.random.default_rng([_APPEARANCE, seed, identity, 0])).draw()
    rgba = np.dstack([colour, coverage * 255]).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgba).resize((2 * SIZE, 2 * SIZE), Image.Resampling.BILINEAR)


class _Conditions(NamedTuple):
    """Everything random about one photo except its mask."""

    warp: tuple[float, ...]  # PIL affine coefficients: output pixel -> neutral-face pixel
    landmarks: np.ndarray  # the template points moved by the pose, float32 5x2
    background: Colour
    blur: float  # Gaussian radius, 0 for none
    contrast: float
    # Lighting as column gains (brightness, colour cast, horizontal fall-off; 3 * columns) times row gains.
    column_gain: np.ndarray
    row_gain: np.ndarray
    noise: np.ndarray  # additive, (rows, 3 * columns)
    mirrored: bool


# Draws the same mask as a training photo's MaskAugment does when it fires.
_ALWAYS_MASK = MaskAugment(p=1.0)
# Lighting works on pixels as (rows, 3 * columns); these are the centred coordinates in [-1, 1].
_CHANNEL_OF_COLUMN = np.tile(np.arange(3), SIZE)
_X = np.repeat((np.arange(SIZE, dtype=np.float32) - SIZE / 2) / (SIZE / 2), 3)
_Y = ((np.arange(SIZE, dtype=np.float32) - SIZE / 2) / (SIZE / 2))[:, None]
# Sensor noise: random crops of one fixed field, cheaper than fresh normals for every photo.
_NOISE = np.random.default_rng(0).standard_normal((SIZE + 48, 3 * (SIZE + 48)), dtype=np.float32)


def _conditions(rng: np.random.Generator) -> _Conditions:
    """Draws one photo's pose, background, blur, lighting and noise, always in this order."""
    angle, scale, (dx, dy) = math.radians(rng.uniform(-8, 8)), rng.uniform(0.95, 1.05), rng.uniform(-3, 3, 2)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    (cx, cy), det = _POSE_CENTRE, cos * cos + sin * sin
    landmarks = ARCFACE_TEMPLATE_112 - np.float32(_POSE_CENTRE)
    landmarks = landmarks @ np.array([[cos, sin], [-sin, cos]], np.float32) + np.float32((cx + dx, cy + dy))
    # Invert out = centre + R (in - centre) + shift, and double it for the 2x neutral face.
    a, b, d, e = cos / det, sin / det, -sin / det, cos / det
    warp = tuple(2 * v for v in (a, b, cx - a * (cx + dx) - b * (cy + dy), d, e, cy - d * (cx + dx) - e * (cy + dy)))
    background = _rgb(rng.uniform(30, 225) + rng.uniform(-50, 50, 3))  # a muted colour
    blur = rng.uniform(0.4, 1.0) if rng.random() < 0.15 else 0.0
    contrast = rng.uniform(0.8, 1.15)
    # Light falls off in one direction: a gradient along x times one along y.
    direction, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.35)
    channel_gain = rng.uniform(0.75, 1.2) * rng.normal(1, 0.05, 3).astype(np.float32)
    column_gain = channel_gain[_CHANNEL_OF_COLUMN] * (1 + strength * math.cos(direction) * _X)
    row_gain = 1 + strength * math.sin(direction) * _Y
    rows, columns = rng.integers(0, 49, 2)
    noise = rng.uniform(1, 6) * _NOISE[rows : rows + SIZE, 3 * columns : 3 * (columns + SIZE)]
    return _Conditions(warp, landmarks, background, blur, contrast, column_gain, row_gain, noise, rng.random() < 0.5)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 3xHxW in [-1, 1], i.e. ``(x / 255 - 0.5) / 0.5``."""
    # In numpy: torch would split this small job over threads, which is slower on busy CPUs.
    chw = image.transpose(2, 0, 1).astype(np.float32, order="C")
    chw *= 1 / 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


class SyntheticFaces(Dataset):
    """``num_identities`` x ``images_per_identity`` synthetic face photos.

    Identity ``k`` has the look of global identity ``identity_offset + k``
    and label ``k``, so a held-out set built with ``identity_offset`` >= the
    training set's ``num_identities`` shares no look with it.  Index ``i`` is
    photo ``i % images_per_identity`` of identity ``i // images_per_identity``.
    """

    def __init__(
        self,
        num_identities: int,
        images_per_identity: int,
        seed: int = 0,
        identity_offset: int = 0,
        mask_prob: float = 0.35,
        flip: bool = True,
    ):
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError(
                f"need at least one identity and one image each, got {num_identities} x {images_per_identity}"
            )
        if seed < 0 or identity_offset < 0:
            raise ValueError(f"seed and identity_offset must be >= 0, got {seed} and {identity_offset}")
        self.num_identities, self.images_per_identity = num_identities, images_per_identity
        self.seed, self.identity_offset, self.flip = seed, identity_offset, flip
        self.mask_augment = MaskAugment(mask_prob)

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """A training photo: masked with probability ``mask_prob``, mirrored half the time if ``flip``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} photos")
        identity, sample = divmod(int(index), self.images_per_identity)
        conditions, rng = self._conditions(identity, sample)
        image = self._posed(identity, conditions)
        image, _ = self.mask_augment(image, rng, conditions.landmarks)
        image = self._lit(image, conditions)
        if self.flip and conditions.mirrored:
            image = image[:, ::-1]
        return to_tensor(image), identity

    def render(self, identity: int, sample: int, masked: bool) -> np.ndarray:
        """Photo ``sample`` of ``identity`` (uint8 112x112x3, never mirrored), with or without a mask.

        Both versions share pose, lighting and noise: they differ only where the mask is.  The
        training photo at the same index is one of the two, possibly mirrored.
        """
        conditions, rng = self._conditions(identity, sample)
        image = self._posed(identity, conditions)
        if masked:
            image, _ = _ALWAYS_MASK(image, rng, conditions.landmarks)
        return self._lit(image, conditions)

    def landmarks(self, identity: int, sample: int) -> np.ndarray:
        """Where the five template points land in photo ``sample`` (float32 5x2, x then y)."""
        return self._conditions(identity, sample)[0].landmarks

    def _conditions(self, identity: int, sample: int) -> tuple[_Conditions, np.random.Generator]:
        """The photo's conditions, and its random stream, left positioned for drawing a mask."""
        if not (0 <= identity < self.num_identities and 0 <= sample < self.images_per_identity):
            raise IndexError(
                f"photo {sample} of identity {identity} is outside {self.num_identities} x {self.images_per_identity}"
            )
        rng = np.random.default_rng([_PHOTO, self.seed, self.identity_offset + identity, sample])
        return _conditions(rng), rng

    def _posed(self, identity: int, conditions: _Conditions) -> np.ndarray:
        """The neutral face, moved to the photo's pose, on the photo's background."""
        face = _neutral_face(self.seed, self.identity_offset + identity)
        posed = face.transform((SIZE, SIZE), Image.Transform.AFFINE, conditions.warp, Image.Resampling.NEAREST)
        photo = Image.new("RGB", (SIZE, SIZE), conditions.background)
        photo.paste(posed, (0, 0), posed)
        return np.asarray(photo)

    @staticmethod
    def _lit(image: np.ndarray, conditions: _Conditions) -> np.ndarray:
        """Blur, contrast, lighting and colour cast, then sensor noise."""
        if conditions.blur:
            image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(conditions.blur)))
        pixels = image.reshape(SIZE, 3 * SIZE).astype(np.float32)
        pixels -= 128
        pixels *= conditions.contrast
        pixels += 128
        pixels *= conditions.column_gain
        pixels *= conditions.row_gain
        pixels += conditions.noise
        return pixels.clip(0, 255).astype(np.uint8).reshape(SIZE, SIZE, 3)
