"""OpenAI Images API: `POST /v1/images/generations`, so `openai.OpenAI(...).images.generate(...)` works.

    {"model", "prompt", "n", "size": "WxH" | "auto", "response_format": "b64_json", "output_format",
     "stream", "partial_images", "quality", "background", "user"}
    Tandem's extensions (the openai client's `extra_body`): negative_prompt, steps, guidance_scale, seed,
    sampler, progress (streaming: an `image_generation.progress` event per step and queue change).

Images come back inline (`b64_json`); `response_format: "url"` is refused (this server keeps no
files). Streaming sends OpenAI's `image_generation.partial_image` events (the throttled previews,
`partial_images` of them at most) and one `image_generation.completed` per image; an error after
the stream began is a final `{"error": ...}` event, which the openai client raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from tandem.diffusion.client import DiffusionClient, ImageJob, ImageRequest, pixels_of
from tandem.diffusion.images import encode_all, negotiate
from tandem.diffusion.messages import ImageEvent, Images
from tandem.diffusion.routes import (
    ClientGone,
    DiffusionDirectory,
    check_keys,
    opt_text,
    preview_b64,
    read_body,
    text,
    timing_headers,
    wait_images,
)
from tandem.diffusion.text import invalid
from tandem.serving.bodies import json_response, opt_float, opt_int
from tandem.serving.kinds import RouteDoc, RouteSpec, Schema
from tandem.serving.openapi import json_body, obj, sse
from tandem.serving.protocols.openai_errors import OPENAI_ERROR, openai_error
from tandem.serving.sse import sse_stream

__all__ = ["openai_image_routes", "parse_generation"]

logger = logging.getLogger(__name__)
_KNOWN = {"model", "prompt", "n", "size", "response_format", "output_format", "stream", "partial_images", "quality",
          "background", "user", "moderation", "negative_prompt", "steps", "guidance_scale", "seed", "sampler",
          "progress"}
_NAMES = {"guidance": "guidance_scale", "n": "n", "size": "size"}


def _size(body: dict[str, Any]) -> tuple[int | None, int | None]:
    size = opt_text(body, "size")
    if size in (None, "auto"):
        return None, None
    w, _, h = size.partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise invalid("size", f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto; got {size!r}")
    return int(w), int(h)


def _choice(body: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    value = body.get(key)
    if value is not None and value not in allowed:
        raise invalid(key, f"{key} must be one of {', '.join(allowed)} on this server; got {value!r}")


def parse_generation(body: dict[str, Any]) -> tuple[ImageRequest, dict[str, Any]]:
    """(the request, protocol options: model, format, stream, partial_images, progress)."""
    check_keys(body, _KNOWN)
    _choice(body, "response_format", ("b64_json",))
    _choice(body, "background", ("auto", "opaque"))
    _choice(body, "quality", ("auto", "standard", "low", "medium", "high"))
    stream, progress = body.get("stream"), body.get("progress")
    for key, value in (("stream", stream), ("progress", progress)):
        if value is not None and not isinstance(value, bool):
            raise invalid(key, f"{key} must be a boolean; got {value!r}")
    width, height = _size(body)
    req = ImageRequest(prompt=text(body, "prompt", default=None), negative_prompt=text(body, "negative_prompt"),
                       width=width, height=height, steps=opt_int(body, "steps", 1, 10_000),
                       guidance=opt_float(body, "guidance_scale", 0.0, 100.0), sampler=opt_text(body, "sampler"),
                       seed=opt_int(body, "seed", -1), n=opt_int(body, "n", 1, 1024) or 1, preview=bool(stream),
                       names=_NAMES)
    options = {"model": opt_text(body, "model"), "format": negotiate(opt_text(body, "output_format")),
               "stream": bool(stream), "progress": bool(progress),
               "partial_images": opt_int(body, "partial_images", 0, 3) or 0}
    return req, options


def _image_fields(job: ImageJob, fmt: str) -> dict[str, Any]:
    p = job.params
    return {"created_at": int(time.time()), "size": f"{p.width}x{p.height}", "quality": "auto",
            "background": "opaque", "output_format": fmt}


def _usage() -> dict[str, Any]:
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}


async def _events(job: ImageJob, client: DiffusionClient, opts: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    fmt, partials, sent = opts["format"], opts["partial_images"], 0
    base = _image_fields(job, fmt)
    size = (job.params.width, job.params.height)
    async for item in job.events():
        if isinstance(item, Images):
            encoded = await asyncio.to_thread(encode_all, pixels_of(item), fmt, client.name, True)
            for e in encoded:
                yield {"type": "image_generation.completed", "b64_json": e.decode(), **base, "usage": _usage(),
                       "seed": job.params.seed}
            return
        if opts["progress"]:
            yield _progress(item)
        if item.kind == "step" and item.preview and sent < partials:
            for image in preview_b64(item.preview, item.preview_shape, size):
                yield {"type": "image_generation.partial_image", "b64_json": image, **base,
                       "partial_image_index": sent, "step": item.step, "steps": item.steps}
            sent += 1


def _progress(item: ImageEvent) -> dict[str, Any]:
    return {"type": "image_generation.progress", "kind": item.kind, "step": item.step, "steps": item.steps,
            "queue_position": item.position}


def _stream(job: ImageJob, client: DiffusionClient, opts: dict[str, Any]) -> StreamingResponse:
    return sse_stream(_events(job, client, opts), job.close, openai_error, named=True)


async def _complete(job: ImageJob, client: DiffusionClient, opts: dict[str, Any], r: HTTPRequest) -> Response:
    try:
        images = await wait_images(job, r)
    except ClientGone:
        return Response(status_code=499)
    encoded = await asyncio.to_thread(encode_all, pixels_of(images), opts["format"], client.name, True)
    p = job.params
    return json_response({"created": int(time.time()), "data": [{"b64_json": e.decode()} for e in encoded],
                          "output_format": opts["format"], "size": f"{p.width}x{p.height}", "seed": p.seed,
                          "steps": p.steps, "guidance_scale": p.guidance, "sampler": p.sampler},
                         headers=timing_headers(images, p.seed))


_REQUEST: Schema = obj({"prompt": {"type": "string"}}, {
    "model": {"type": ["string", "null"]}, "n": {"type": ["integer", "null"], "minimum": 1},
    "size": {"type": ["string", "null"]}, "response_format": {"type": ["string", "null"], "enum": ["b64_json", None]},
    "output_format": {"type": ["string", "null"]}, "stream": {"type": ["boolean", "null"]},
    "partial_images": {"type": ["integer", "null"]}, "negative_prompt": {"type": ["string", "null"]},
    "steps": {"type": ["integer", "null"]}, "guidance_scale": {"type": ["number", "null"]},
    "seed": {"type": ["integer", "null"]}, "sampler": {"type": ["string", "null"]},
    "progress": {"type": ["boolean", "null"]}})
_RESPONSE: Schema = obj({"created": {"type": "integer"},
                         "data": {"type": "array", "items": obj({"b64_json": {"type": "string"}})}})


def openai_image_routes(d: DiffusionDirectory) -> list[RouteSpec]:
    async def generations(r: HTTPRequest) -> Response:
        req, opts = parse_generation(await read_body(r))
        client = d.get(opts["model"])
        job = await client.start(req)
        if opts["stream"]:
            return _stream(job, client, opts)
        return await _complete(job, client, opts, r)

    def model_of(r: HTTPRequest) -> str:
        return d.clients[0].name if d.clients else ""  # the body names it; the default for the metric label

    doc = RouteDoc("OpenAI Images: text-to-image, inline base64 images, optionally streamed with previews",
                   "openai", request={"application/json": _REQUEST},
                   responses={200: {**json_body(_RESPONSE), **sse(obj({"type": {"type": "string"}}))}},
                   errors=(400, 404, 413, 503, 504),
                   error=OPENAI_ERROR)
    return [RouteSpec("/v1/images/generations", "POST", "openai_images", generations, shape=openai_error,
                      model_of=model_of, doc=doc)]
