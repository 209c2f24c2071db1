"""HTTP routes of the diffusion kind, and what they share: model lookup, waiting with cancellation, SSE.

    POST /predictions/{model}, /invocations   SageMaker / DJL (seed 000) and Hugging Face's text-to-image
                                              contract: {"prompt" | "inputs", "parameters"} -> image bytes
    POST /v1/images/generations               OpenAI Images (openai_images.py), streaming with previews
    POST /sdapi/v1/txt2img, GET samplers, sd-models   AUTOMATIC1111 (a1111.py)

A client that disconnects frees its UNet rows at the next iteration: non-streaming handlers watch
the connection while they wait; streaming ones close the job when Starlette stops the stream.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.diffusion.client import DiffusionClient, ImageJob, ImageRequest, pixels_of
from tandem.diffusion.images import MEDIA_TYPES, encode_all, negotiate
from tandem.diffusion.messages import Images
from tandem.diffusion.text import invalid
from tandem.errors import InvalidInput, ModelNotFound, TandemError
from tandem.serving.bodies import json_object, json_response, opt_float, opt_int, read_limited
from tandem.serving.kinds import FrontState, RouteDoc, RouteSpec, Schema, plain_error
from tandem.serving.openapi import BINARY, obj

__all__ = ["DiffusionDirectory", "diffusion_routes", "read_body", "wait_images"]

_BODY_LIMIT = 1024 * 1024  # prompts and parameters only
_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


class ClientGone(Exception):
    """The HTTP client disconnected while its images were being made."""


class DiffusionDirectory:
    """The diffusion entries of a front, by name; the first one is the default (a live view, like LLMs')."""

    def __init__(self, state: FrontState) -> None:
        self.state = state

    @property
    def clients(self) -> list[DiffusionClient]:
        return self.state.of_kind("diffusion")

    def names(self) -> set[str]:
        return {c.name for c in self.clients}

    def get(self, name: str | None, field: str = "model") -> DiffusionClient:
        clients = self.clients
        if not clients:
            raise ModelNotFound("this server has no text-to-image model (add a kind: diffusion entry)")
        if not name:
            default = self.state.default_model
            return next((c for c in clients if c.name == default), clients[0])
        for c in clients:
            if c.name == name:
                return c
        e = ModelNotFound(f"unknown text-to-image model {name!r}; served: {sorted(self.names())}")
        e.param = field  # type: ignore[attr-defined]
        raise e

    def serves_default(self) -> bool:
        """Whether /invocations means a diffusion model: --default-model names one, or only these are served."""
        if not self.clients:
            return False
        default = self.state.default_model
        if default:
            return default in self.names()
        return all(c.kind == "diffusion" for c in self.state.clients.values())


async def read_body(request: HTTPRequest) -> dict[str, Any]:
    return json_object(await read_limited(request, _BODY_LIMIT, "text-to-image requests"))


async def wait_images(job: ImageJob, request: HTTPRequest) -> Images:
    """The job's images; if the client disconnects meanwhile, cancel the job (rows freed next iteration)."""
    result = asyncio.ensure_future(job.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=_POLL_S)
            if done:
                return result.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not result.done():
            result.cancel()
        await job.close()


def text(body: dict[str, Any], key: str, name: str = "", default: str | None = "") -> str:
    value = body.get(key, default)
    if value is None and default is not None:
        value = default
    if not isinstance(value, str):
        raise invalid(name or key, f"{name or key} must be a string; got {type(value).__name__}")
    return value


def opt_text(body: dict[str, Any], key: str, name: str = "") -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise invalid(name or key, f"{name or key} must be a string; got {type(value).__name__}")
    return value


def check_keys(body: dict[str, Any], known: set[str], where: str = "") -> None:
    """Unknown fields are refused by name (never silently ignored)."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise invalid(f"{where}{unknown[0]}", f"unsupported field(s) {', '.join(where + u for u in unknown)}; "
                                              f"supported: {', '.join(sorted(known))}")


# -- SageMaker / DJL / Hugging Face: {"prompt" | "inputs", "parameters"} -> image bytes ----------------
_PARAMS = {"negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "seed", "scheduler",
           "num_images_per_prompt", "output_format"}
_NAMES = {"steps": "parameters.num_inference_steps", "guidance": "parameters.guidance_scale",
          "sampler": "parameters.scheduler", "seed": "parameters.seed", "n": "parameters.num_images_per_prompt",
          "size": "parameters.width/height", "negative_prompt": "parameters.negative_prompt"}


def parse_invocation(body: dict[str, Any]) -> tuple[ImageRequest, str | None]:
    """The seed's handler contract, which Hugging Face's text_to_image client also speaks."""
    check_keys(body, {"prompt", "inputs", "parameters"})
    key = "prompt" if "prompt" in body else "inputs"
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid("parameters", "parameters must be an object")
    check_keys(params, _PARAMS, "parameters.")
    p = "parameters."
    req = ImageRequest(
        prompt=text(body, key, default=None), negative_prompt=text(params, "negative_prompt", p + "negative_prompt"),
        width=opt_int(params, "width", 8, 4096, name=p + "width"),
        height=opt_int(params, "height", 8, 4096, name=p + "height"),
        steps=opt_int(params, "num_inference_steps", 1, 10_000, name=p + "num_inference_steps"),
        guidance=opt_float(params, "guidance_scale", 0.0, 100.0, name=p + "guidance_scale"),
        sampler=opt_text(params, "scheduler", p + "scheduler"), seed=opt_int(params, "seed", -1, name=p + "seed"),
        n=opt_int(params, "num_images_per_prompt", 1, 1024, name=p + "num_images_per_prompt") or 1,
        names={**_NAMES, "prompt": key})
    return req, opt_text(params, "output_format", p + "output_format")


async def invoke(client: DiffusionClient, request: HTTPRequest) -> Response:
    """Image bytes (PNG, or JPEG/WebP by Accept or output_format); JSON when Accept asks for it."""
    req, fmt_param = parse_invocation(await read_body(request))
    accept = request.headers.get("accept", "")
    as_json = "application/json" in accept
    client.validator.params(req)  # field errors first: they say more than the format rule below
    if req.n > 1 and not as_json:
        raise invalid("parameters.num_images_per_prompt", "several images come back as JSON: send "
                                                          "Accept: application/json (or ask for one image)")
    fmt = negotiate(fmt_param, accept, "parameters.output_format")
    job = await client.start(req)
    try:
        images = await wait_images(job, request)
    except ClientGone:
        return Response(status_code=499)
    encoded = await asyncio.to_thread(encode_all, pixels_of(images), fmt, client.name, as_json)
    headers = timing_headers(images, job.params.seed)
    if as_json:
        return json_response({"images": [e.decode() for e in encoded], "seed": job.params.seed,
                              "format": fmt, "parameters": params_dict(job)}, headers=headers)
    return Response(encoded[0], media_type=MEDIA_TYPES[fmt], headers=headers)


def timing_headers(images: Images, seed: int) -> dict[str, str]:
    """Where the model time went, for clients and benchmarks (the endpoint time is theirs to measure)."""
    t = images.timings
    return {"X-Tandem-Seed": str(seed), "X-Tandem-Model-Ms": f"{t.model_ms:.1f}",
            "X-Tandem-Timings": f"queue={t.queue_ms:.1f};encode={t.encode_ms:.1f};denoise={t.denoise_ms:.1f};"
                                f"decode={t.decode_ms:.1f};rows={t.rows_mean:.1f}"}


def params_dict(job: ImageJob) -> dict[str, Any]:
    p = job.params
    return {"width": p.width, "height": p.height, "steps": p.steps, "guidance_scale": p.guidance,
            "sampler": p.sampler, "seed": p.seed, "n": p.n}


def preview_b64(preview: bytes, shape: tuple[int, int, int, int], size: tuple[int, int]) -> list[str]:
    """Previews (n, h, w, 3) upscaled to the image size, as base64 PNGs."""
    from PIL import Image

    from tandem.diffusion.images import encode_image

    arr = np.frombuffer(preview, np.uint8).reshape(shape)
    out = []
    for img in arr:
        big = np.asarray(Image.fromarray(img, "RGB").resize(size, Image.Resampling.BILINEAR))
        out.append(base64.b64encode(encode_image(big, "png")).decode())
    return out


# -- routes --------------------------------------------------------------------------------------------------
_INVOKE_BODY: Schema = obj({}, {"prompt": {"type": "string"}, "inputs": {"type": "string"},
                                "parameters": {"type": ["object", "null"]}})
_IMAGE_REPLY = {200: {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY,
                      "application/json": obj({"images": {"type": "array", "items": {"type": "string"}},
                                               "seed": {"type": "integer"}})}}


def field_error_shape(e: TandemError) -> tuple[int, dict[str, Any]]:
    """Tandem's plain `{"error": message}`, plus `field` when the error is about one request field."""
    status, body = plain_error(e)
    param = getattr(e, "param", None)
    return status, {**body, "field": param} if isinstance(param, str) else body


def diffusion_routes(state: FrontState) -> list[RouteSpec]:
    """Every route of the diffusion kind."""
    from tandem.diffusion.a1111 import a1111_routes
    from tandem.diffusion.openai_images import openai_image_routes

    d = DiffusionDirectory(state)

    async def predictions(r: HTTPRequest) -> Response:
        return await invoke(d.get(r.path_params["model"]), r)

    async def invocations(r: HTTPRequest) -> Response:
        return await invoke(d.get(None), r)

    def named(r: HTTPRequest) -> bool:
        return r.path_params.get("model") in d.names()

    def model_of(r: HTTPRequest) -> str:
        return str(r.path_params.get("model", ""))

    def default_name(r: HTTPRequest) -> str:
        return d.clients[0].name if d.clients else ""

    doc = RouteDoc("Text-to-image (SageMaker/DJL, Hugging Face): prompt and parameters -> the image", "text-to-image",
                   request={"application/json": _INVOKE_BODY}, responses=_IMAGE_REPLY, errors=(400, 404, 413, 503, 504))
    return [
        RouteSpec("/predictions/{model}", "POST", "predictions", predictions, shape=field_error_shape,
                  model_of=model_of, doc=doc, claims=named),
        RouteSpec("/invocations", "POST", "invocations", invocations, shape=field_error_shape, model_of=default_name,
                  doc=doc, claims=lambda r: d.serves_default()),
        *openai_image_routes(d), *a1111_routes(d),
    ]


def number_or(body: dict[str, Any], key: str, convert: Callable[[Any], Any], name: str) -> Any:
    """A numeric field that clients send as a number or a numeric string (A1111 scripts do both)."""
    value = body.get(key)
    if isinstance(value, str):
        try:
            return convert(value)
        except ValueError:
            raise InvalidInput(f"{name} must be a number; got {value!r}") from None
    return value


__all__ += ["ClientGone", "check_keys", "number_or", "opt_text", "params_dict", "preview_b64", "text",
            "timing_headers"]
