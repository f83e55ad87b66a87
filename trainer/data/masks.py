"""Masked-face augmentation: draw a face mask over the nose-chin region of an aligned crop.

Masks are placed from the five ArcFace landmarks, so they sit correctly on
real aligned crops as well as on the built-in synthetic faces.  A mask is
drawn in a face frame whose origin is the eye midpoint, whose ``u`` unit is
half the eye-to-eye vector and whose ``v`` unit is the eye-midpoint to
mouth-midpoint vector; in that frame the nose tip is near ``v = 0.5`` and the
chin near ``v = 1.4``.  Nothing is ever drawn above the eye line: rows up to
``EYE_MARGIN_PX`` below the lower eye are left untouched, so the upper face
that masked recognition relies on is exactly the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# (x, y) of left eye, right eye, nose tip, left and right mouth corner at 112x112.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
MASK_STYLES = ("surgical", "n95", "cloth", "bandana")
EYE_MARGIN_PX = 4

_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "surgical": ((150, 200, 230), (120, 180, 220), (245, 245, 245), (40, 40, 45), (170, 215, 190), (240, 190, 205)),
    "n95": ((240, 240, 235), (225, 225, 220), (150, 150, 155), (35, 35, 38), (170, 205, 230)),
    "cloth": (
        (30, 30, 35),
        (120, 120, 125),
        (30, 50, 100),
        (150, 30, 40),
        (60, 110, 70),
        (200, 180, 140),
        (220, 120, 160),
    ),
    "bandana": ((170, 25, 30), (25, 40, 110), (25, 25, 25), (60, 100, 60), (210, 150, 40)),
}
_PATTERN_COLOURS = _PALETTES["cloth"] + ((235, 235, 230),)
_TEXTURES: dict[str, tuple[str, ...]] = {
    "surgical": ("solid", "pleats"),
    "n95": ("solid",),
    "cloth": ("solid", "stripes", "dots", "checks"),
    "bandana": ("dots", "checks", "stripes", "solid"),
}
_SEAM_SHADE, _PLEAT_SHADE = 0.7, 0.88
# Cloth is coloured through a palette: 64 shading levels (half to full brightness) of the
# fabric colour, then of its pattern's second colour, then the strap colour; the last entry is see-through.
_DARKEST, _LEVELS = 0.5, 64
_SHADES = np.linspace(_DARKEST, 1.0, _LEVELS, dtype=np.float32)[:, None]
_STRAP_INDEX, _CLEAR_INDEX = 2 * _LEVELS, 255
# What covers a pixel in the drawing of a mask.
_FABRIC, _SEAM, _STRAP = 1, 2, 3

Point = tuple[float, float]


@dataclass
class _MaskShape:
    """A mask in face coordinates: fabric outline, seams drawn darker on it, straps beside it.

    Seams and straps are ``(polyline, width)``; a seam of width 0 is a filled polygon.
    """

    fabric: list[Point]
    seams: list[tuple[list[Point], int]] = field(default_factory=list)
    straps: list[tuple[list[Point], int]] = field(default_factory=list)


def first_mask_row(landmarks: np.ndarray) -> int:
    """The topmost image row a mask may touch: ``EYE_MARGIN_PX`` below the lower eye."""
    return math.ceil(float(max(landmarks[0, 1], landmarks[1, 1]))) + EYE_MARGIN_PX


class _FaceFrame:
    """Maps mask outlines from (u, v) face coordinates to image pixels and back."""

    def __init__(self, landmarks: np.ndarray):
        (lx, ly), (rx, ry), _, (mlx, mly), (mrx, mry) = landmarks.tolist()
        self.origin = ((lx + rx) / 2, (ly + ry) / 2)
        self.across = ((rx - lx) / 2, (ry - ly) / 2)
        self.down = ((mlx + mrx) / 2 - self.origin[0], (mly + mry) / 2 - self.origin[1])
        (a, c), (b, d) = self.across, self.down
        det = a * d - b * c
        self.inverse = ((d / det, -b / det), (-c / det, a / det))

    def to_image(self, uv: Sequence[Point]) -> list[Point]:
        (ox, oy), (ax, ay), (dx, dy) = self.origin, self.across, self.down
        return [(ox + u * ax + v * dx, oy + u * ay + v * dy) for u, v in uv]

    def to_face(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face coordinates of pixels (for textures and shading that follow the pose)."""
        dx, dy = xs - self.origin[0], ys - self.origin[1]
        (uu, uv), (vu, vv) = self.inverse
        return uu * dx + uv * dy, vu * dx + vv * dy


def _arc(cx: float, cy: float, ru: float, rv: float, start: float, stop: float, n: int) -> list[Point]:
    step = (stop - start) / (n - 1)
    return [(cx + ru * math.cos(start + i * step), cy + rv * math.sin(start + i * step)) for i in range(n)]


def _surgical(rng: np.random.Generator) -> _MaskShape:
    """Rectangular with a bent nose wire, horizontal pleats and thin ear loops."""
    top, bottom, half = rng.uniform(0.27, 0.33), rng.uniform(1.4, 1.55), rng.uniform(1.95, 2.1)
    shape = _MaskShape(
        fabric=[
            (-half, top + 0.06),
            (0, top),
            (half, top + 0.06),
            (half + 0.05, 1.05),
            (half * 0.6, bottom - 0.06),
            (0, bottom),
            (-half * 0.6, bottom - 0.06),
            (-half - 0.05, 1.05),
        ]
    )
    shape.seams = [
        ([(-half + 0.1, v + 0.04), (0, v), (half - 0.1, v + 0.04)], 1) for v in np.linspace(top + 0.22, 1.05, 3)
    ]
    shape.seams.append(([(-0.7, top + 0.06), (0, top + 0.03), (0.7, top + 0.06)], 2))
    for side in (-1, 1):
        loop = [(side * half, top + 0.1), (side * (half + 0.9), 0.45), (side * (half + 0.9), 0.75), (side * half, 1.0)]
        shape.straps.append((loop, 1))
    return shape


def _n95(rng: np.random.Generator) -> _MaskShape:
    """A rounded cup with a centre seam, a nose clip, head straps and sometimes a valve."""
    centre, ru, rv = rng.uniform(0.9, 0.97), rng.uniform(1.7, 1.9), rng.uniform(0.62, 0.7)
    shape = _MaskShape(fabric=_arc(0, centre, ru, rv, 0, 2 * np.pi, 28))
    shape.seams = [
        ([(0, centre - rv), (0.05, centre), (0, centre + rv)], 1),
        (_arc(0, centre, ru * 0.55, rv * 0.8, 1.15 * np.pi, 1.85 * np.pi, 8), 2),
    ]
    if rng.random() < 0.35:
        shape.seams.append((_arc(0.8 * (2 * rng.integers(2) - 1), centre + 0.15, 0.3, 0.13, 0, 2 * np.pi, 12), 0))
    shape.straps = [([(side * ru * 0.95, v), (side * 2.7, v - 0.1)], 2) for side in (-1, 1) for v in (0.55, 1.15)]
    return shape


def _cloth(rng: np.random.Generator) -> _MaskShape:
    """Curved top edge over the nose bridge, reaching below the chin, thick ear loops."""
    top, half, chin = rng.uniform(0.27, 0.33), rng.uniform(2.0, 2.15), rng.uniform(1.6, 1.8)
    top_edge = [(u, top + 0.06 * u * u) for u in np.linspace(-half, half, 9)]
    bottom_edge = [(half, 1.15), (half * 0.6, chin - 0.15), (0, chin), (-half * 0.6, chin - 0.15), (-half, 1.15)]
    shape = _MaskShape(fabric=top_edge + bottom_edge)
    if rng.random() < 0.5:
        shape.seams.append(([(0, top), (0.03, 1.0), (0, chin)], 1))
    shape.straps = [([(side * half, top + 0.3), (side * (half + 0.8), 0.6), (side * half, 1.1)], 3) for side in (-1, 1)]
    return shape


def _bandana(rng: np.random.Generator) -> _MaskShape:
    """A scarf tied behind the head: straight top across the whole face, hanging to a point."""
    top, point = rng.uniform(0.3, 0.38), rng.uniform(1.9, 2.3)
    fabric = [(-3.4, top), (3.4, top), (2.3, 1.0), (1.1, point - 0.35), (0, point), (-1.1, point - 0.35), (-2.3, 1.0)]
    return _MaskShape(fabric=fabric, seams=[([(-3.4, top + 0.04), (3.4, top + 0.04)], 2)])


_SHAPES = {"surgical": _surgical, "n95": _n95, "cloth": _cloth, "bandana": _bandana}


def _frac(x: np.ndarray) -> np.ndarray:
    """``x % 1`` for floats, several times faster than numpy's remainder."""
    return x - np.floor(x)


def _pattern(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the second colour of a patterned fabric shows: a boolean map over the face coordinates."""
    if texture == "pleats":
        return _frac(v * rng.uniform(5, 7)) < 0.3
    frequency = rng.uniform(2.2, 4.0)
    if texture == "stripes":
        angle = np.pi / 4 * rng.integers(3)
        return _frac(u * (0.5 * frequency * np.cos(angle)) + v * (frequency * np.sin(angle))) < 0.45
    if texture == "dots":
        du, dv = _frac(u * (0.5 * frequency)) - 0.5, _frac(v * frequency) - 0.5
        return du * du + dv * dv < rng.uniform(0.04, 0.09)
    return _frac(0.5 * (np.floor(u * (0.5 * frequency)) + np.floor(v * frequency))) > 0.25


def _colour(palette: Sequence[tuple[int, int, int]], rng: np.random.Generator, spread: float) -> np.ndarray:
    base = np.asarray(palette[rng.integers(len(palette))], dtype=np.float32)
    return base + rng.normal(0, spread, 3).astype(np.float32)


def _draw_labels(shape: _MaskShape, frame: _FaceFrame, size: tuple[int, int]) -> Image.Image:
    """What covers each pixel (nothing, fabric, seam or strap), drawn back to front."""
    drawing = Image.new("L", size, 0)
    draw = ImageDraw.Draw(drawing)
    draw.polygon(frame.to_image(shape.fabric), fill=_FABRIC, outline=_SEAM)
    for points, width in shape.seams:
        if width == 0:
            draw.polygon(frame.to_image(points), fill=_SEAM)
        else:
            draw.line(frame.to_image(points), fill=_SEAM, width=width)
    for points, width in shape.straps:
        draw.line(frame.to_image(points), fill=_STRAP, width=width)
    return drawing


def _cloth(style: str, labels: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The coloured, textured and shaded mask over the labelled pixels, see-through elsewhere (RGBA)."""
    colour = _colour(_PALETTES[style], rng, 8)
    texture = _TEXTURES[style][rng.integers(len(_TEXTURES[style]))]
    second = colour * _PLEAT_SHADE if texture == "pleats" else _colour(_PATTERN_COLOURS, rng, 12)
    strap = np.full(3, 240, np.float32) if rng.random() < 0.5 else colour
    # The mask curves away from the camera towards the cheeks and under the chin.
    shading = 1.0 - rng.uniform(0.06, 0.16) * np.minimum(u * u * 0.25, 1.0) - 0.08 * np.clip(v - 1.2, 0.0, 1.0)
    shading[labels == _SEAM] *= _SEAM_SHADE
    index = ((shading - _DARKEST) * ((_LEVELS - 1) / (1.0 - _DARKEST))).clip(0, _LEVELS - 1).astype(np.uint8)
    if texture != "solid":
        index[_pattern(texture, u, v, rng)] += _LEVELS
    index[labels == _STRAP] = _STRAP_INDEX
    index[labels == 0] = _CLEAR_INDEX
    palette = np.zeros((256, 4), np.float32)
    palette[:_LEVELS, :3], palette[_LEVELS : 2 * _LEVELS, :3] = _SHADES * colour, _SHADES * second
    palette[_STRAP_INDEX, :3] = strap
    palette[:_CLEAR_INDEX, 3] = 255
    cloth = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
    cloth.putpalette(palette.clip(0, 255).astype(np.uint8).tobytes(), rawmode="RGBA")
    return cloth.convert("RGBA")


def apply_mask(
    image: np.ndarray,
    rng: np.random.Generator,
    style: str | None = None,
    landmarks: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``image`` (uint8 HxWx3) wearing a face mask placed from ``landmarks``.

    ``style`` is one of ``MASK_STYLES`` (random when None); ``landmarks`` are
    the five (x, y) points in ``ARCFACE_TEMPLATE_112`` order (the template
    itself when None).  Colour, texture and exact shape come from ``rng``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 HxWx3 array, got {image.dtype} of shape {image.shape}")
    if style is None:
        style = MASK_STYLES[rng.integers(len(MASK_STYLES))]
    if style not in _SHAPES:
        raise ValueError(f"unknown mask style {style!r}; choose one of {', '.join(MASK_STYLES)}")
    landmarks = ARCFACE_TEMPLATE_112 if landmarks is None else np.asarray(landmarks)
    if landmarks.shape != (5, 2) or not np.all(np.isfinite(landmarks)):
        raise ValueError(f"landmarks must be five finite (x, y) points, got shape {landmarks.shape}")

    frame = _FaceFrame(landmarks)
    drawing = _draw_labels(_SHAPES[style](rng), frame, (image.shape[1], image.shape[0]))
    box = drawing.getbbox()
    # Cut at first_mask_row: the upper face stays untouched whatever the pose did to the outline.
    top = max(first_mask_row(landmarks), box[1]) if box else image.shape[0]
    if box is None or top >= box[3]:
        return image.copy()
    left, right, bottom = box[0], box[2], box[3]
    u, v = frame.to_face(np.arange(left, right, dtype=np.float32), np.arange(top, bottom, dtype=np.float32)[:, None])
    cloth = _cloth(style, np.asarray(drawing.crop((left, top, right, bottom))), u, v, rng)
    canvas = Image.fromarray(image)
    canvas.paste(cloth, (left, top), cloth)
    return np.array(canvas)


class MaskAugment:
    """Puts a random-style mask on a fraction ``p`` of the images it sees."""

    def __init__(self, p: float = 0.35, styles: Sequence[str] = MASK_STYLES):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mask probability p must be in [0, 1], got {p}")
        styles = tuple(styles)
        unknown = [s for s in styles if s not in MASK_STYLES]
        if not styles or unknown:
            raise ValueError(f"styles must be a non-empty subset of {MASK_STYLES}, got {styles}")
        self.p, self.styles = p, styles

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None
    ) -> tuple[np.ndarray, bool]:
        """``(image, masked)``: a masked copy with probability ``p``, else ``image`` itself."""
        if rng.random() >= self.p:
            return image, False
        style = self.styles[rng.integers(len(self.styles))]
        return apply_mask(image, rng, style=style, landmarks=landmarks), True
