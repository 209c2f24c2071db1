"""AUTOMATIC1111-compatible routes, for the scripts written against its web UI's API.

    POST /sdapi/v1/txt2img  {prompt, negative_prompt, steps, cfg_scale, seed, width, height, batch_size,
                             n_iter, sampler_name, override_settings.sd_model_checkpoint}
                            -> {"images": [base64 PNG], "parameters": request, "info": JSON string}
    GET  /sdapi/v1/samplers, GET /sdapi/v1/sd-models

As in A1111, image k of a request uses seed + k (each is its own request to the engine, so every
image can be reproduced alone from its seed), `info` lists `all_seeds`, and seed -1 draws one.
Options A1111 has that Tandem does not implement (hires fix, face restoration, tiling, img2img
fields) are refused by name when set, never silently ignored; bookkeeping fields are accepted.
Validation errors are 422, as A1111 (FastAPI) answers them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import replace
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.diffusion.client import DiffusionClient, ImageJob, ImageRequest, pixels_of
from tandem.diffusion.images import encode_all
from tandem.diffusion.messages import Images
from tandem.diffusion.routes import ClientGone, DiffusionDirectory, opt_text, read_body, text, wait_images
from tandem.diffusion.text import invalid
from tandem.errors import ErrorKind, TandemError
from tandem.serving.bodies import json_response, opt_float, opt_int
from tandem.serving.kinds import RouteDoc, RouteSpec, Schema
from tandem.serving.openapi import json_body, obj

__all__ = ["SAMPLER_NAMES", "a1111_error", "a1111_routes", "parse_txt2img"]

# A1111's sampler names -> Tandem's; aliases as A1111 lists them.
SAMPLER_NAMES = {"DPM++ 2M": "dpmpp_2m", "Euler": "euler", "Euler a": "euler_a", "DDIM": "ddim"}
_ALIASES = {"dpmpp_2m": ["k_dpmpp_2m"], "euler": ["k_euler"], "euler_a": ["k_euler_a"], "ddim": []}
_ACCEPTED = {"prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "batch_size", "n_iter",
             "sampler_name", "sampler_index", "scheduler", "override_settings", "send_images", "save_images",
             "styles", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "eta",
             "do_not_save_samples", "do_not_save_grid", "script_args", "alwayson_scripts", "comments",
             "override_settings_restore_afterwards", "disable_extra_networks", "firstpass_image", "infotext"}
# Fields whose non-default value asks for something Tandem does not do.
_UNSUPPORTED = {"enable_hr": False, "restore_faces": False, "tiling": False, "denoising_strength": None,
                "init_images": None, "mask": None, "refiner_checkpoint": None, "script_name": None,
                "hr_scale": None, "hr_upscaler": None, "hr_second_pass_steps": None}


def a1111_error(e: TandemError) -> tuple[int, dict[str, Any]]:
    """FastAPI's shape as A1111 answers: validation errors 422 with `detail`; others {"error", "detail"}."""
    status = 422 if e.kind in (ErrorKind.INVALID, ErrorKind.VALIDATION) and e.status == 400 else e.status
    body: dict[str, Any] = {"error": type(e).__name__, "detail": str(e), "errors": str(e)}
    param = getattr(e, "param", None)
    if isinstance(param, str):
        body["field"] = param
    return status, body


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, default in _UNSUPPORTED.items():
        if key in body and body[key] not in (default, None, "", [], 0):
            raise invalid(key, f"{key} is not supported by this server (txt2img without hires fix, face "
                               "restoration, tiling or img2img); remove it")
    unknown = sorted(set(body) - _ACCEPTED - set(_UNSUPPORTED))
    if unknown:
        raise invalid(unknown[0], f"unknown field(s) {', '.join(unknown)}")


def _sampler(body: dict[str, Any]) -> str | None:
    name = opt_text(body, "sampler_name") or opt_text(body, "sampler_index")
    if name is None:
        return None
    if name in SAMPLER_NAMES:
        return SAMPLER_NAMES[name]
    by_alias = {a: s for s, aliases in _ALIASES.items() for a in (*aliases, s)}
    if name in by_alias:
        return by_alias[name]
    raise invalid("sampler_name", f"sampler_name: unknown sampler {name!r}; samplers: {', '.join(SAMPLER_NAMES)}")


def parse_txt2img(body: dict[str, Any]) -> tuple[ImageRequest, int, str | None]:
    """(one image's request with the first seed, how many images, the model named by override_settings)."""
    _refuse_unsupported(body)
    settings = body.get("override_settings") or {}
    if not isinstance(settings, dict):
        raise invalid("override_settings", "override_settings must be an object")
    count = (opt_int(body, "batch_size", 1, 64) or 1) * (opt_int(body, "n_iter", 1, 64) or 1)
    req = ImageRequest(prompt=text(body, "prompt", default=None), negative_prompt=text(body, "negative_prompt"),
                       width=opt_int(body, "width", 8, 4096), height=opt_int(body, "height", 8, 4096),
                       steps=opt_int(body, "steps", 1, 10_000), guidance=opt_float(body, "cfg_scale", 0.0, 100.0),
                       sampler=_sampler(body), seed=opt_int(body, "seed", -1),
                       names={"guidance": "cfg_scale", "sampler": "sampler_name", "size": "width/height",
                              "n": "batch_size"})
    return req, count, opt_text(settings, "sd_model_checkpoint", "override_settings.sd_model_checkpoint")


async def _run_all(client: DiffusionClient, reqs: list[ImageRequest], r: HTTPRequest) -> list[Images] | None:
    """Every image as its own engine request, started together so they denoise side by side; None: client gone."""
    started = await asyncio.gather(*(client.start(q) for q in reqs), return_exceptions=True)
    jobs = [j for j in started if isinstance(j, ImageJob)]
    try:
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            raise errors[0]
        return list(await asyncio.gather(*(wait_images(j, r) for j in jobs)))
    except ClientGone:
        return None
    finally:
        for j in jobs:
            await j.close()


async def _txt2img(d: DiffusionDirectory, r: HTTPRequest) -> Response:
    body = await read_body(r)
    req, count, model = parse_txt2img(body)
    client = d.get(model, "override_settings.sd_model_checkpoint")
    most = client.cfg.max_images
    if count > most:
        raise invalid("batch_size", f"batch_size x n_iter is {count}; {client.name} makes at most {most} per request")
    first = req.seed if req.seed not in (None, -1) else secrets.randbelow(2**32 - most)
    results = await _run_all(client, [replace(req, seed=first + k) for k in range(count)], r)
    if results is None:
        return Response(status_code=499)
    encoded = [e for res in results for e in await asyncio.to_thread(encode_all, pixels_of(res), "png", client.name,
                                                                         True)]
    info = _info(client, client.validator.params(replace(req, seed=first)), req, count, first)
    return json_response({"images": [e.decode() for e in encoded], "parameters": body, "info": json.dumps(info)})


def _info(client: DiffusionClient, p: Any, req: ImageRequest, count: int, first: int) -> dict[str, Any]:
    names = {v: k for k, v in SAMPLER_NAMES.items()}
    return {"prompt": req.prompt, "all_prompts": [req.prompt] * count, "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * count, "seed": first,
            "all_seeds": [first + k for k in range(count)], "subseed": -1, "all_subseeds": [-1] * count,
            "width": p.width, "height": p.height, "sampler_name": names[p.sampler], "cfg_scale": p.guidance,
            "steps": p.steps, "batch_size": count, "sd_model_name": client.name, "sd_model_hash": None,
            "index_of_first_image": 0, "infotexts": [f"{req.prompt}\nSteps: {p.steps}, Sampler: {names[p.sampler]}, "
                                                      f"CFG scale: {p.guidance:g}, Seed: {first + k}, "
                                                      f"Size: {p.width}x{p.height}, Model: {client.name}"
                                                      for k in range(count)]}


_TXT2IMG: Schema = obj({"prompt": {"type": "string"}}, {
    "negative_prompt": {"type": ["string", "null"]}, "steps": {"type": ["integer", "null"]},
    "cfg_scale": {"type": ["number", "null"]}, "seed": {"type": ["integer", "null"]},
    "width": {"type": ["integer", "null"]}, "height": {"type": ["integer", "null"]},
    "batch_size": {"type": ["integer", "null"]}, "n_iter": {"type": ["integer", "null"]},
    "sampler_name": {"type": ["string", "null"]}})
_REPLY: Schema = obj({"images": {"type": "array", "items": {"type": "string"}}, "parameters": {"type": "object"},
                      "info": {"type": "string"}})
_ERROR: Schema = obj({"detail": {"type": "string"}}, {"error": {"type": "string"}, "field": {"type": "string"}})


def a1111_routes(d: DiffusionDirectory) -> list[RouteSpec]:
    async def txt2img(r: HTTPRequest) -> Response:
        return await _txt2img(d, r)

    async def samplers(r: HTTPRequest) -> Response:
        return json_response([{"name": name, "aliases": [s, *_ALIASES[s]], "options": {}}
                              for name, s in SAMPLER_NAMES.items()])

    async def sd_models(r: HTTPRequest) -> Response:
        return json_response([{"title": c.name, "model_name": c.name, "hash": None, "sha256": None,
                               "filename": str(c.cfg.path), "config": None} for c in d.clients])

    def label(r: HTTPRequest) -> str:
        return d.clients[0].name if d.clients else ""

    listing = {200: json_body({"type": "array", "items": {"type": "object"}})}
    return [
        RouteSpec("/sdapi/v1/txt2img", "POST", "a1111_txt2img", txt2img, shape=a1111_error, model_of=label,
                  doc=RouteDoc("AUTOMATIC1111 txt2img: base64 PNGs with parameters and info", "a1111",
                               request={"application/json": _TXT2IMG}, responses={200: json_body(_REPLY)},
                               errors=(404, 413, 422, 503, 504), error=_ERROR)),
        RouteSpec("/sdapi/v1/samplers", "GET", "a1111_samplers", samplers, shape=a1111_error,
                  doc=RouteDoc("AUTOMATIC1111 sampler list", "a1111", responses=listing)),
        RouteSpec("/sdapi/v1/sd-models", "GET", "a1111_models", sd_models, shape=a1111_error,
                  doc=RouteDoc("AUTOMATIC1111 model list (the text-to-image models served)", "a1111",
                               responses=listing)),
    ]
