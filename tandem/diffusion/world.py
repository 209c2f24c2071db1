"""The synthetic world of the built-in text-to-image model, and a deterministic pixel checker for it.

Images are 64x64 RGB: one flat-colored shape (circle, square or upward triangle, 20-40 px, fully inside the
image with a 2 px margin) on a flat background of a different color. Prompts read
``a {color} {shape} on a {background} background``; 6 colors x 5 backgrounds x 3 shapes = 90 combinations, of
which ``HELD_OUT`` are never used for training (each of their color/shape, color/background and
shape/background pairs still appears in training).

``check(image)`` recovers ``Verdict(color, shape, background)`` from pixels alone:

* every pixel is classified to its nearest palette color (Euclidean RGB);
* the background is the most common class on the 1 px border ring;
* the shape color is the most common non-background class;
* the shape mask is the largest 4-connected component of that class; its class comes from two features of its
  bounding box: top-half / bottom-half area (about 1/3 for an upward triangle, 1 for circles and squares) and
  the mean fill of its four corner cells (a quarter of the box's side each: 1 for a square, under 0.45 for a
  circle; a blurred or slightly rounded square still fills most of them).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SIZE = 64
MARGIN = 2
MIN_SHAPE, MAX_SHAPE = 20, 40
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEMPLATE = "a {color} {shape} on a {background} background"
NONE = "none"

Combo = tuple[str, str, str]  # (color, shape, background)

HELD_OUT: tuple[Combo, ...] = (
    ("red", "circle", "blue"),
    ("green", "square", "yellow"),
    ("blue", "triangle", "white"),
    ("yellow", "circle", "black"),
    ("white", "square", "red"),
    ("black", "triangle", "green"),
    ("red", "square", "black"),
    ("green", "triangle", "red"),
    ("blue", "circle", "yellow"),
    ("white", "triangle", "blue"),
)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
_NAMES: tuple[str, ...] = tuple(COLORS)
_PROMPT_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*$", re.IGNORECASE)
TRIANGLE_MAX_TOP_RATIO = 0.6  # top-half / bottom-half mask area: ~0.33 triangle, ~1 circle and square
CORNER = 0.25  # side of the bounding box's corner cells, as a fraction of the box's side
SQUARE_MIN_CORNERS = 0.6  # mean fill of the corner cells: 1 square, 0.05-0.45 circle (ideal renders, 20-40 px)


@dataclass(frozen=True)
class Verdict:
    """What the checker sees in an image."""

    color: str
    shape: str
    background: str

    def as_combo(self) -> Combo:
        return (self.color, self.shape, self.background)


def all_combos() -> list[Combo]:
    """All 90 (color, shape, background) combinations, in a fixed order."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def train_combos() -> list[Combo]:
    """The 80 combinations used for training (all but ``HELD_OUT``)."""
    held = set(HELD_OUT)
    return [c for c in all_combos() if c not in held]


def prompt(color: str, shape: str, background: str) -> str:
    """The prompt of one combination."""
    return TEMPLATE.format(color=color, shape=shape, background=background)


def parse_prompt(text: str) -> Combo:
    """(color, shape, background) from a prompt in the world's template; ValueError if it is not one."""
    match = _PROMPT_RE.match(text)
    if match is None:
        raise ValueError(f"not a prompt of the form {TEMPLATE!r}: {text!r}")
    color, shape, background = (g.lower() for g in match.groups())
    if color not in COLORS or background not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown color, shape or background in {text!r}")
    return color, shape, background


def shape_mask(shape: str, size: int, x0: int, y0: int) -> np.ndarray:
    """Boolean (64, 64) mask of a shape whose bounding box is ``size`` px at (x0, y0), sampled at pixel centers."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    u, v = (xs - x0) / size, (ys - y0) / size  # bounding-box coordinates in [0, 1]
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at top center, base along the bottom edge
        return inside & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(color: str, shape: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (64, 64, 3) image of the combination, with random size and position drawn from ``rng``."""
    size = int(rng.integers(MIN_SHAPE, MAX_SHAPE + 1))
    x0 = int(rng.integers(MARGIN, SIZE - MARGIN - size + 1))
    y0 = int(rng.integers(MARGIN, SIZE - MARGIN - size + 1))
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLORS[background]
    image[shape_mask(shape, size, x0, y0)] = COLORS[color]
    return image


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Index into the palette of each pixel's nearest color: int (H, W)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    dist = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return np.asarray(dist.argmin(-1))


def _mode(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(_NAMES)).argmax())


def _border(labels: np.ndarray) -> np.ndarray:
    return np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty if the mask is)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, component = deque([(int(y0), int(x0))]), []
        while queue:
            y, x = queue.popleft()
            component.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask, dtype=bool)
    if best:
        rows, cols = zip(*best)
        out[list(rows), list(cols)] = True
    return out


class ShapeFeatures(NamedTuple):
    """Geometry of a shape mask, measured in its bounding box."""

    fill: float  # mask area / box area: 1 square, pi/4 circle, 1/2 triangle
    top_ratio: float  # area in the box's top half / bottom half: ~1/3 upward triangle, 1 circle and square
    corners: float  # mean fill of the box's four corner cells (CORNER of its side): 1 square, <0.45 circle


def shape_features(mask: np.ndarray) -> ShapeFeatures:
    """The features of a non-empty mask."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].astype(np.float32)
    h, w = box.shape
    centers = np.arange(h, dtype=np.float32) + 0.5
    weights = box.sum(1)
    upper = float(weights[centers < h / 2].sum() + 0.5 * weights[centers == h / 2].sum())
    lower = float(weights.sum()) - upper
    a, b = max(1, round(h * CORNER)), max(1, round(w * CORNER))
    corners = float(np.mean([box[:a, :b].mean(), box[:a, -b:].mean(), box[-a:, :b].mean(), box[-a:, -b:].mean()]))
    return ShapeFeatures(float(box.mean()), upper / max(lower, 1.0), corners)


def classify_shape(mask: np.ndarray) -> str:
    """circle, square or triangle from a shape mask; ``none`` if it is too small to tell.

    Triangles by their top-heavy/bottom-heavy area split; squares against circles by their filled corners
    (blurred or slightly rounded squares keep most of each corner cell, a circle leaves it mostly empty).
    """
    if mask.sum() < 16:
        return NONE
    features = shape_features(mask)
    if features.top_ratio < TRIANGLE_MAX_TOP_RATIO:
        return "triangle"
    return "square" if features.corners >= SQUARE_MIN_CORNERS else "circle"


def check(image: np.ndarray) -> Verdict:
    """The (color, shape, background) a (64, 64, 3) RGB image shows, judged from its pixels."""
    labels = classify_pixels(image)
    background = _mode(_border(labels))
    foreground = labels[labels != background]
    if foreground.size == 0:
        return Verdict(NONE, NONE, _NAMES[background])
    color = _mode(foreground)
    shape = classify_shape(largest_component(labels == color))
    return Verdict(_NAMES[color], shape, _NAMES[background])


def score(images: Sequence[np.ndarray], combos: Sequence[Combo]) -> dict[str, float]:
    """Fraction of images judged right on all three attributes (``all``) and on each (``color``, ...)."""
    if len(images) != len(combos):
        raise ValueError(f"{len(images)} images for {len(combos)} combos")
    verdicts = [check(image).as_combo() for image in images]
    n = max(len(combos), 1)
    out = {"n": float(len(combos)), "all": sum(v == c for v, c in zip(verdicts, combos)) / n}
    for i, name in enumerate(("color", "shape", "background")):
        out[name] = sum(v[i] == c[i] for v, c in zip(verdicts, combos)) / n
    return out
