"""Typed messages of the diffusion kind (msgpack via msgspec).

    front ──Txt2Img / CancelImage──▶ UNet worker                  (PUSH/PULL, one socket per replica)
    front ◀──ImageEvents (one per front per iteration)── UNet loop  (progress, queue position, previews)
    front ◀──Images (one per request)── VAE decode thread           (uint8 pixels; the front encodes PNG)

Prompts travel as token ids (the fronts tokenize); pixels travel as raw uint8 rows (H, W, 3) so
image encoding (PNG/JPEG/WebP) runs in the fronts, never in the UNet's process.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from tandem.errors import ErrorKind

__all__ = ["CancelImage", "ImageEvent", "ImageEvents", "ImageParams", "Images", "Timings", "Txt2Img",
           "worker_decoder"]


class ImageParams(msgspec.Struct, array_like=True, frozen=True):
    """What one request asks for; validated by the front against the entry's settings."""

    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    seed: int
    n: int = 1
    preview: bool = False  # send throttled low-resolution previews with the progress events
    # an event for every step (streams show them); False: the first step, then one per heartbeat (enough
    # for the front's timeout_s), so a request nobody watches does not wake its front at every iteration
    progress: bool = True


class Txt2Img(msgspec.Struct, tag="txt2img", array_like=True):
    """Start one request: prompt and negative prompt as token ids (padded to the tokenizer's length)."""

    req_id: int
    front: int
    cond: list[int]
    uncond: list[int]
    cond_len: int  # real tokens (with BOS/EOS) before padding: the attention mask where the encoder uses one
    uncond_len: int
    params: ImageParams


class CancelImage(msgspec.Struct, tag="cancel_image", array_like=True):
    """The client went away: free the request's rows at the next iteration."""

    req_id: int


class ImageEvent(msgspec.Struct, array_like=True):
    """Progress of one request: queued (position), a finished step (with a preview), or its error."""

    req_id: int
    kind: Literal["queued", "step", "error"]
    step: int = 0
    steps: int = 0
    position: int = 0  # requests ahead in the queue (kind "queued")
    preview: bytes = b""  # uint8 (n, h, w, 3) at latent resolution
    preview_shape: tuple[int, int, int, int] = (0, 0, 0, 0)
    error: str = ""
    error_kind: ErrorKind | None = None


class ImageEvents(msgspec.Struct, tag="image_events", array_like=True):
    """Everything one UNet iteration produced for one front's requests."""

    model: str
    items: list[ImageEvent]


class Timings(msgspec.Struct, array_like=True, frozen=True):
    """Where one request's model time went, in milliseconds (the worker's clock)."""

    queue_ms: float
    encode_ms: float
    denoise_ms: float
    decode_ms: float
    rows_mean: float  # UNet rows per iteration this request ran in, on average

    @property
    def model_ms(self) -> float:
        return self.queue_ms + self.encode_ms + self.denoise_ms + self.decode_ms


class Images(msgspec.Struct, tag="images", array_like=True):
    """The decoded images of one request: n x (height, width, 3) uint8, row-major."""

    model: str
    req_id: int
    width: int
    height: int
    n: int
    pixels: bytes
    timings: Timings


worker_decoder = msgspec.msgpack.Decoder(Txt2Img | CancelImage)
