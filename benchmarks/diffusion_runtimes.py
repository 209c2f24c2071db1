"""The UNet stage on ONNX Runtime and OpenVINO against torch eager, same CPU, same threads.

For each model (random-weight SD-layout pipelines built in a temp dir, plus the shipped tiny
text-to-image pipeline when tandem/default_repo/text-to-image/pipeline exists):

    torch            Stages.denoise: diffusers' UNet2DConditionModel, eager fp32 (the reference)
    ort              the UNet exported with torch.onnx.export (dynamo), ONNX Runtime CPU, fp32
    ort-ts           the same graph exported with dynamo=False (TorchScript exporter)
    ov-f32           OpenVINO CPU from the ONNX file, INFERENCE_PRECISION_HINT=f32, dynamic batch
    ov-f32-static    the same, one fixed-shape compiled model per batch size (buckets)
    ov-default       OpenVINO CPU with the plugin's default precision hint (bf16 on AVX512_BF16/AMX CPUs)

Parity: max |diff| of the UNet output against torch at B=2 and B=8, and PSNR of a full request's
decoded image (DenoiseEngine, 20 DPM-Solver++ 2M steps, one image with guidance 7.5, or the
folder's tandem_defaults.json guidance: B=2 per call) against the torch-eager image of the same
seed, with the relative error of the final latents and the share of clipped pixels (a saturated
random-weight image would flatter the PSNR). Speed: one UNet call at B=2 and B=8, median of
`--calls` repetitions, and the full request (text encoder + 20 UNet calls + VAE), median of
`--requests`; the variants take turns inside every repetition (A/B/C/A/B/C...) so that load from
other processes spreads over all of them. Every runtime uses `--threads` intra-op threads (2).

On a shared 2-core AMD EPYC (AVX512_BF16, no AMX; another process training on ~1 core), half
model, --threads 1: UNet B=2 torch 285 ms, ORT 204, OpenVINO f32 188 (static buckets 179), OpenVINO
default (bf16) 115; 20-step request 6.9 s / 4.6 / 4.4 (4.1) / 2.8; PSNR 90 dB for the fp32 runtimes,
51 dB for bf16. With --threads 2 on that loaded machine torch eager's times swing 2-5x (its OpenMP
barriers stall when a core is taken) while the others' do not, so its ratios there overstate the gain.

    .venv/bin/python benchmarks/diffusion_runtimes.py                        # half-width SD UNet (~15 min on 2 cores)
    .venv/bin/python benchmarks/diffusion_runtimes.py --models half sd --markdown out.md --json out.json
    .venv/bin/python benchmarks/diffusion_runtimes.py --models tiny --calls 3 --requests 1   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tandem.config import DiffusionConfig  # noqa: E402
from tandem.diffusion.engine import DenoiseEngine, Job  # noqa: E402
from tandem.diffusion.messages import ImageParams  # noqa: E402
from tandem.diffusion.optimize import psnr  # noqa: E402
from tandem.diffusion.pipeline import Stages, load_stages  # noqa: E402
from tandem.diffusion.runtimes import OnnxUNet, OpenVinoUNet, convert_unet_openvino, export_unet_onnx  # noqa: E402
from tandem.diffusion.testing import SD_SHAPED, TINY, PipelineShape, make_random_pipeline  # noqa: E402
from tandem.diffusion.text import PromptTokenizer  # noqa: E402

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SHIPPED = ROOT / "tandem" / "default_repo" / "text-to-image" / "pipeline"
# SD's UNet layout at half SD_SHAPED's widths: one B=2 call ~1 s on 2 loaded cores (SD_SHAPED: ~4 s).
HALF = dataclasses.replace(SD_SHAPED, unet_channels=(32, 64, 128, 128))
SHAPES: dict[str, PipelineShape] = {"tiny": TINY, "half": HALF, "sd": SD_SHAPED}
VARIANTS = ("torch", "ort", "ort-ts", "ov-f32", "ov-f32-static", "ov-default")
PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk, oil painting", "blurry"


def generate(stages: Stages, cfg: DiffusionConfig, job: Job) -> tuple[torch.Tensor, np.ndarray]:
    """One request through the engine, as run_alone runs it: its final latents and decoded uint8 image."""
    engine = DenoiseEngine(stages, cfg)
    if err := engine.submit(job):
        raise ValueError(err)
    while engine.has_work:
        _, done = engine.step()
        for f in done:
            return f.latents, stages.decode(f.latents).numpy()
    raise RuntimeError("the engine finished no job")


def _defaults(folder: Path) -> dict[str, Any]:
    path = folder / "tandem_defaults.json"  # the shipped pipeline's own size/guidance, where it has them
    return dict(json.loads(path.read_text())) if path.exists() else {}


def fitting(tok: PromptTokenizer, text: str) -> tuple[list[int], int]:
    """Token ids of `text`, cut to the tokenizer's length (TINY's character-level tokenizer takes 16)."""
    while True:
        try:
            return tok.encode(text, "prompt")
        except Exception:  # noqa: BLE001 - too long: drop the last word
            text = text.rsplit(" ", 1)[0] if " " in text else text[:-1]


def build_runtimes(stages: Stages, work: Path, variants: list[str], threads: int,
                   shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[dict[str, Denoise], dict[str, Any]]:
    """Export/convert once per graph; the callables by variant name, and what making each cost."""
    sample, text = shapes
    made: dict[str, Denoise] = {"torch": stages.denoise}
    info: dict[str, Any] = {}
    onnx: dict[bool, Path] = {}

    def graph(dynamo: bool) -> Path:
        if dynamo not in onnx:
            t0 = time.perf_counter()
            onnx[dynamo] = export_unet_onnx(stages.unet, work / f"unet_{'dynamo' if dynamo else 'ts'}.onnx",
                                            sample, text, dynamo=dynamo)
            info[f"export_{'dynamo' if dynamo else 'ts'}_s"] = round(time.perf_counter() - t0, 1)
        return onnx[dynamo]

    for name in variants:
        if name == "torch":
            continue
        t0 = time.perf_counter()
        if name in ("ort", "ort-ts"):
            path = graph(name == "ort")
            t0 = time.perf_counter()
            made[name] = OnnxUNet(path, ["CPUExecutionProvider"], threads=threads)
        else:
            path = graph(True)
            t0 = time.perf_counter()
            ov = OpenVinoUNet(convert_unet_openvino(path), precision="default" if name == "ov-default" else "f32",
                              threads=threads, static_batch=name.endswith("-static"))
            info[f"{name}_precision"] = ov.inference_precision
            made[name] = ov
        info[f"{name}_load_s"] = round(time.perf_counter() - t0, 1)
    return made, info


def unet_inputs(b: int, sample: tuple[int, ...], text: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(b)
    return (torch.randn((b, *sample[1:]), generator=g), torch.linspace(999, 1, b),
            torch.randn((b, *text[1:]), generator=g))


def bench_model(label: str, folder: Path, size: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cfg = DiffusionConfig(sizes=[f"{size}x{size}"], max_batch_rows=16)
    stages = load_stages(folder, cfg, "cpu")
    tok = PromptTokenizer(folder)
    h = size // stages.scale_factor
    sample = (2, stages.latent_channels, h, h)
    text = (2, tok.max_length, int(stages.unet.config.cross_attention_dim))
    params = sum(p.numel() for p in stages.unet.parameters())
    print(f"\n== {label}: UNet {params / 1e6:.1f} M params, latents {sample[1:]}, text {text[1:]}", flush=True)
    runtimes, info = build_runtimes(stages, work / label, args.variants, args.threads, (sample, text))
    print("   made:", info, flush=True)
    names = list(runtimes)
    res: dict[str, dict[str, Any]] = {n: {"unet_ms": {}, "max_abs_diff": {}} for n in names}

    for b in args.batches:  # parity, and the warm-up call of every (runtime, B)
        x, t, c = unet_inputs(b, sample, text)
        with torch.inference_mode():
            ref = runtimes["torch"](x, t, c)
            for n in names:
                res[n]["max_abs_diff"][b] = float((runtimes[n](x, t, c).float() - ref).abs().max())
        res["torch"]["ref_abs_max"] = float(ref.abs().max())
    for b in args.batches:
        x, t, c = unet_inputs(b, sample, text)
        times: dict[str, list[float]] = {n: [] for n in names}
        with torch.inference_mode():
            for _ in range(args.calls):
                for n in names:
                    t0 = time.perf_counter()
                    runtimes[n](x, t, c)
                    times[n].append(time.perf_counter() - t0)
        for n in names:
            res[n]["unet_ms"][b] = 1000 * statistics.median(times[n])
        print(f"   B={b}: " + ", ".join(f"{n} {res[n]['unet_ms'][b]:.0f} ms" for n in names), flush=True)

    (cond, cl), (uncond, ul) = fitting(tok, PROMPT), fitting(tok, NEGATIVE)
    guidance = float(_defaults(folder).get("guidance_scale", 7.5))
    image_params = ImageParams(width=size, height=size, steps=args.steps, guidance=guidance, sampler="dpmpp_2m",
                               seed=1234)
    req: dict[str, list[float]] = {n: [] for n in names}
    images: dict[str, np.ndarray] = {}
    latents: dict[str, torch.Tensor] = {}
    for rep in range(args.requests):
        for n in names:
            st = dataclasses.replace(stages)
            st.denoise = runtimes[n]  # type: ignore[method-assign]
            job = Job(rep * 100 + names.index(n) + 1, 0, image_params, cond, uncond, cl, ul)
            t0 = time.perf_counter()
            lat, out = generate(st, cfg, job)
            req[n].append(time.perf_counter() - t0)
            images.setdefault(n, out)
            latents.setdefault(n, lat)
            if not np.array_equal(images[n], out):
                print(f"   warning: {n} gave a different image on repetition {rep}", flush=True)
    for n in names:
        res[n]["request_s"] = statistics.median(req[n])
        res[n]["psnr_db"] = psnr(images[n], images["torch"])
        ref = latents["torch"]
        res[n]["latent_rel_err"] = float((latents[n] - ref).norm() / ref.norm())
    img = images["torch"]
    info["image_std"] = round(float(img.std()), 1)
    info["image_clipped"] = round(float(np.mean((img == 0) | (img == 255))), 3)
    info["guidance"] = guidance
    print("   request: " + ", ".join(f"{n} {res[n]['request_s']:.2f} s ({res[n]['psnr_db']:.1f} dB)"
                                      for n in names), flush=True)
    return {"model": label, "unet_params_m": round(params / 1e6, 2), "size": size, "latents": list(sample[1:]),
            "text": list(text[1:]), "info": info, "results": res}


def table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    bs = args.batches
    head = (["model", "runtime"] + [f"UNet B={b} ms" for b in bs] + [f"x B={b}" for b in bs]
            + [f"{args.steps}-step request s", "x request", "PSNR dB", "latent rel err"]
            + [f"max abs diff B={b}" for b in bs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        res = run["results"]
        base = res["torch"]
        for n, r in res.items():
            prec = run["info"].get(f"{n}_precision")
            name = f"{n} ({prec})" if prec else n
            cells = [run["model"], name]
            cells += [f"{r['unet_ms'][b]:.0f}" for b in bs]
            cells += [f"{base['unet_ms'][b] / r['unet_ms'][b]:.2f}" for b in bs]
            cells += [f"{r['request_s']:.2f}", f"{base['request_s'] / r['request_s']:.2f}",
                      "inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}", f"{r['latent_rel_err']:.1e}"]
            cells += [f"{r['max_abs_diff'][b]:.2e}" for b in bs]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["half"], choices=sorted(SHAPES),
                    help="random-weight shapes to build (the shipped pipeline is added when present)")
    ap.add_argument("--folder", type=Path, action="append", default=[],
                    help="also measure this SD-layout pipeline folder (repeatable)")
    ap.add_argument("--no-shipped", action="store_true", help="skip tandem/default_repo/text-to-image/pipeline")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--calls", type=int, default=7, help="timed UNet calls per runtime and batch size")
    ap.add_argument("--requests", type=int, default=3, help="timed full requests per runtime")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if "torch" not in args.variants:
        args.variants.insert(0, "torch")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tandem-unet-rt-") as tmp:
        work = Path(tmp)
        models: list[tuple[str, Path, int]] = []
        for name in args.models:
            shape = SHAPES[name]
            models.append((name, make_random_pipeline(work / name / "pipeline", shape, seed=0), shape.sample_size))
        folders = list(args.folder) + ([SHIPPED] if SHIPPED.exists() and not args.no_shipped else [])
        for f in folders:
            vae = json.loads((f / "vae" / "config.json").read_text())
            size = int(_defaults(f).get("height") or vae.get("sample_size") or 64)
            models.append((f"{f.parent.name}/{f.name}" if f == SHIPPED else f.name, f, size))
        for label, folder, size in models:
            runs.append(bench_model(label.replace("/", "_"), folder, size, args, work))
    meta = {"threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "calls": args.calls, "requests": args.requests,
            "steps": args.steps, "versions": _versions()}
    md = table(runs, args)
    print("\n" + md)
    print(f"\nthreads {args.threads}; load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          "x = torch eager time / this runtime's time (>1: faster)")
    if args.markdown:
        args.markdown.write_text(md + "\n\n" + json.dumps(meta) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("onnxruntime", "openvino", "diffusers", "onnx"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except ImportError:
            out[mod] = "missing"
    return out


if __name__ == "__main__":
    main()
