"""Generate an ImageFolder tree of JPEGs for the training workload (issue 12, item 7a).

    root/train/<class>/00000.jpg ...   root/val/<class>/00000.jpg ...

Each image is one procedurally drawn shape (circle, square, triangle, cross, ring, star, ...) in a random
colour, at a random position and size, on a noisy random-colour background. The class is the shape, so a
small CNN can learn it, but only from the pixels: colours, positions and sizes carry no label. Decoding a
256x256 JPEG plus augmentation costs real CPU, which is the point (the seed's data-loading case).
Deterministic: image i of a split depends only on (seed, split, i).

    .venv/bin/python scripts/make_image_folder.py data/shapes                    # 3000 train + 600 val
    .venv/bin/python scripts/make_image_folder.py data/shapes --count 600 --val 120 --size 64
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "make_image_folder"]

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "hbars", "diamond")


def _polygon(cx: float, cy: float, r: float, points: int, start: float, inner: float | None = None
             ) -> list[tuple[float, float]]:
    # a regular polygon, or a star when `inner` (the inner radius ratio) is given
    out = []
    n = points * 2 if inner is not None else points
    for k in range(n):
        radius = r * (inner if inner is not None and k % 2 else 1.0)
        angle = start + 2 * math.pi * k / n
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2 + rng.uniform(-0.2, 0.2)), fill=colour)
    elif name == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(0.3 * r)))
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, -math.pi / 2, inner=0.42), fill=colour)
    elif name == "hbars":
        h = r / 3
        for k in (-1, 1):
            draw.rectangle((cx - r, cy + k * h - h / 2, cx + r, cy + k * h + h / 2), fill=colour)
    elif name == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=colour)
    else:
        raise ValueError(f"unknown shape {name!r}")


def render(class_index: int, seed: int, size: int = 256, classes: Sequence[str] = CLASSES) -> Image.Image:
    """One image of class `class_index`, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    # random hues, but the shape is always lighter than the background: one edge polarity to learn, and the
    # shape stays visible under colour jitter
    bg = rng.integers(0, 110, 3)
    fg = rng.integers(150, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    base = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.18, 0.34)
    cx, cy = rng.uniform(r, size - r, 2)
    _draw_shape(draw, classes[class_index], float(cx), float(cy), float(r), (int(fg[0]), int(fg[1]), int(fg[2])), rng)
    return img


def _job(args: tuple[str, int, int, int, int, tuple[str, ...]]) -> None:
    path, class_index, seed, size, quality, classes = args
    render(class_index, seed, size, classes).save(path, format="JPEG", quality=quality)


def _jobs(root: Path, split: str, count: int, seed: int, size: int, quality: int,
          classes: tuple[str, ...]) -> list[tuple[str, int, int, int, int, tuple[str, ...]]]:
    jobs = []
    split_key = zlib.crc32(split.encode())
    for name in classes:
        (root / split / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        c = i % len(classes)   # balanced classes
        path = root / split / classes[c] / f"{i:05d}.jpg"
        jobs.append((str(path), c, int(np.random.SeedSequence([seed, split_key, i]).generate_state(1)[0]),
                     size, quality, classes))
    return jobs


def make_image_folder(root: str | Path, train: int = 3000, val: int = 600, seed: int = 0, *, size: int = 256,
                      classes: int | Sequence[str] = 6, quality: int = 90, processes: int | None = None) -> Path:
    """Write root/train and root/val (`train` and `val` JPEGs, balanced over the classes); returns root.

    `classes`: how many of CLASSES (the first n) or their names. `processes`: worker processes (default:
    the usable CPUs; 1 runs in this process).
    """
    names = tuple(CLASSES[:classes]) if isinstance(classes, int) else tuple(classes)
    if not 2 <= len(names) <= len(CLASSES) or any(n not in CLASSES for n in names):
        raise ValueError(f"classes must be 2..{len(CLASSES)} of {CLASSES}, got {classes!r}")
    root = Path(root)
    jobs = _jobs(root, "train", train, seed, size, quality, names) + _jobs(root, "val", val, seed, size, quality,
                                                                           names)
    n = processes or len(os.sched_getaffinity(0))
    if n <= 1 or len(jobs) < 64:
        for job in jobs:
            _job(job)
    else:
        with mp.get_context("spawn").Pool(n) as pool:   # spawn: safe in a process that already runs torch
            pool.map(_job, jobs, chunksize=32)
    return root


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--count", type=int, default=3000, help="training images")
    ap.add_argument("--val", type=int, default=600, help="validation images")
    ap.add_argument("--size", type=int, default=256, help="side in pixels")
    ap.add_argument("--classes", type=int, default=6, help=f"how many of {', '.join(CLASSES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=None)
    args = ap.parse_args(argv)
    make_image_folder(args.root, args.count, args.val, args.seed, size=args.size, classes=args.classes,
                      processes=args.processes)
    print(f"wrote {args.count} train + {args.val} val {args.size}x{args.size} JPEGs of {args.classes} classes "
          f"to {args.root}")


if __name__ == "__main__":
    main()
