"""Image encoding in the fronts (never in the UNet's process): PNG by default, JPEG or WebP on request."""

from __future__ import annotations

import base64
import io
import time
from typing import Literal

import numpy as np

from tandem.diffusion.metrics import diffusion_metrics
from tandem.diffusion.text import invalid

__all__ = ["FORMATS", "MEDIA_TYPES", "encode_all", "encode_image", "negotiate"]

Format = Literal["png", "jpeg", "webp"]
FORMATS: tuple[Format, ...] = ("png", "jpeg", "webp")
MEDIA_TYPES: dict[Format, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_ALIASES: dict[str, Format] = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}


def negotiate(explicit: str | None, accept: str = "", field: str = "output_format") -> Format:
    """The format a request asks for: an explicit parameter wins, then the Accept header, then PNG."""
    if explicit is not None:
        fmt = _ALIASES.get(str(explicit).lower())
        if fmt is None:
            raise invalid(field, f"{field} must be one of {', '.join(FORMATS)}; got {explicit!r}")
        return fmt
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        for fmt, mt in MEDIA_TYPES.items():
            if media == mt:
                return fmt
    return "png"


def encode_image(pixels: np.ndarray, fmt: Format = "png") -> bytes:
    """(H, W, 3) uint8 -> encoded bytes (PNG lossless; JPEG and WebP at quality 92)."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, fmt.upper(), quality=92)
    return buf.getvalue()


def encode_all(images: np.ndarray, fmt: Format, model: str, b64: bool = False) -> list[bytes]:
    """Encode each of (n, H, W, 3) and record the image_encode stage time; `b64`: base64 bytes."""
    t0 = time.perf_counter()
    out = [encode_image(img, fmt) for img in images]
    if b64:
        out = [base64.b64encode(o) for o in out]
    diffusion_metrics().stage_time.labels(model, "image_encode").observe(time.perf_counter() - t0)
    return out
