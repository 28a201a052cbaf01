"""Built-in synthetic images: flat-coloured shapes with dark outlines, generated on the fly.

Every image draws its own palette (no colour belongs to a shape kind), a background that is
flat or striped, and several overlapping ellipses, polygons, striped shapes and nested
shapes. That gives each image several regions whose colours only the reference can tell, so
a briefly trained colorization model shows whether reference colours reach the right regions.
Image ``i`` of seed ``s`` is the same on every call, in any process.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .checks import check_int
from .images import pil_to_tensor

# Shapes are drawn at this multiple of the output size, then downsampled, for smooth edges.
_SUPERSAMPLING = 2
# How a shape's inside is painted; its boundary is an ellipse or a polygon either way.
_FILLS = ("flat", "striped", "nested")

Point = tuple[float, float]


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    # Any hue; saturation and value kept away from gray and black so regions differ from
    # the outlines and from each other in the sketch as well as in colour.
    hue, saturation, value = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def _outline_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 40, size=3))


def _ellipse(center: Point, radii: Point, angle: float) -> list[Point]:
    (cx, cy), (rx, ry) = center, radii
    cos, sin = math.cos(angle), math.sin(angle)
    points = []
    for t in np.linspace(0, 2 * math.pi, 72, endpoint=False):
        x, y = rx * math.cos(t), ry * math.sin(t)
        points.append((cx + x * cos - y * sin, cy + x * sin + y * cos))
    return points


def _polygon(rng: np.random.Generator, center: Point, radius: float) -> list[Point]:
    # A star-shaped polygon: vertices in angular order at random radii, so it never
    # self-intersects and ranges from triangles to irregular blobs; the angles are evenly
    # spaced plus jitter so that no polygon collapses into a sliver.
    count = int(rng.integers(3, 9))
    spacing = 2 * math.pi / count
    angles = rng.uniform(0, 2 * math.pi) + spacing * (np.arange(count) + rng.uniform(-0.3, 0.3, size=count))
    radii = radius * rng.uniform(0.55, 1.0, size=count)
    return [(center[0] + r * math.cos(a), center[1] + r * math.sin(a)) for a, r in zip(angles, radii)]


def _scaled(points: list[Point], center: Point, factor: float) -> list[Point]:
    return [(center[0] + (x - center[0]) * factor, center[1] + (y - center[1]) * factor) for x, y in points]


def _stripes(rng: np.random.Generator, side: int, colors: list[tuple[int, int, int]]) -> Image.Image:
    """A square image of parallel bands in the given colours, at a random angle and width."""
    image = Image.new("RGB", (side, side), colors[0])
    draw = ImageDraw.Draw(image)
    angle = rng.uniform(0, math.pi)
    width = side * rng.uniform(0.04, 0.12)
    direction, normal = (math.cos(angle), math.sin(angle)), (-math.sin(angle), math.cos(angle))
    center, reach = side / 2, side
    for band, offset in enumerate(np.arange(-reach, reach, width)):
        a, b = offset, offset + width
        corners = [
            (center + normal[0] * o + direction[0] * e, center + normal[1] * o + direction[1] * e)
            for o, e in ((a, -reach), (a, reach), (b, reach), (b, -reach))
        ]
        draw.polygon(corners, fill=colors[band % len(colors)])
    return image


class ProceduralShapes(Dataset):
    """``length`` synthetic RGB images of ``size`` x ``size``, as float tensors (3, size, size) in [0, 1]."""

    def __init__(self, size: int, length: int, seed: int = 0) -> None:
        check_int("size", size, 8)
        check_int("length", length, 1)
        check_int("seed", seed, 0)
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        return pil_to_tensor(self.render(index))

    def render(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB Pillow image."""
        rng = np.random.default_rng([self.seed, index])
        side = self.size * _SUPERSAMPLING
        outline = _outline_color(rng)
        line_width = max(2, round(side * rng.uniform(0.006, 0.012)))
        if rng.random() < 0.3:
            image = _stripes(rng, side, [_random_color(rng) for _ in range(int(rng.integers(2, 4)))])
        else:
            image = Image.new("RGB", (side, side), _random_color(rng))
        for _ in range(int(rng.integers(3, 8))):
            self._draw_shape(rng, image, side, outline, line_width)
        return image.resize((self.size, self.size), Image.Resampling.LANCZOS)

    def _draw_shape(
        self, rng: np.random.Generator, image: Image.Image, side: int, outline: tuple[int, int, int], line_width: int
    ) -> None:
        fill = _FILLS[int(rng.integers(len(_FILLS)))]
        center = (rng.uniform(0.1, 0.9) * side, rng.uniform(0.1, 0.9) * side)
        radius = rng.uniform(0.12, 0.32) * side
        if rng.random() < 0.5:
            boundary = _ellipse(center, (radius, radius * rng.uniform(0.45, 1.0)), rng.uniform(0, math.pi))
        else:
            boundary = _polygon(rng, center, radius)
        draw = ImageDraw.Draw(image)
        if fill == "striped":
            mask = Image.new("L", image.size, 0)
            ImageDraw.Draw(mask).polygon(boundary, fill=255)
            image.paste(_stripes(rng, side, [_random_color(rng), _random_color(rng)]), (0, 0), mask)
        else:
            draw.polygon(boundary, fill=_random_color(rng))
        draw.line([*boundary, boundary[0]], fill=outline, width=line_width, joint="curve")
        if fill == "nested":
            # Concentric copies of the boundary, each a new region with its own colour.
            for factor in np.sort(rng.uniform(0.25, 0.75, size=int(rng.integers(1, 3))))[::-1]:
                inner = _scaled(boundary, center, float(factor))
                draw.polygon(inner, fill=_random_color(rng))
                draw.line([*inner, inner[0]], fill=outline, width=line_width, joint="curve")
