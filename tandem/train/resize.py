"""`tandem data resize SRC DST --max-side N`: pre-resize an image folder tree in parallel.

Decoding and resizing big images is often the CPU cost that makes a training loop wait on data; doing it once,
offline, makes every epoch cheaper. Layout: DST mirrors SRC's folders. Images (by extension) whose longer side
is over N are resized to N on the longer side, aspect ratio kept, same format (JPEG at --quality, EXIF kept);
images already small enough are copied byte for byte; every other file (labels, annotations, splits) is copied
too, so DST is a drop-in replacement for SRC. A DST file newer than its source is kept as is (re-runs only
process what changed). Unreadable images are reported and skipped (the command then exits 1 after doing the rest).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["IMAGE_SUFFIXES", "ResizeResult", "register", "resize_folder"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class ResizeResult:
    """Counts of what `resize_folder` did, and how long it took."""

    resized: int = 0
    copied_small: int = 0       # images already within max_side
    copied_other: int = 0       # non-image files
    kept: int = 0               # destination already up to date
    failed: list[str] | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for people."""
        failed = len(self.failed or [])
        return (f"resized {self.resized}, copied {self.copied_small} small images and {self.copied_other} other "
                f"files, kept {self.kept} up-to-date, failed {failed}, in {self.seconds:.2f} s")


def _resize_one(job: tuple[str, str, int, int]) -> tuple[str, str]:
    """Worker: (kind, detail) for one file; kind is resized / small / other / kept / failed."""
    from PIL import Image

    src, dst, max_side, quality = job
    s, d = Path(src), Path(dst)
    if d.exists() and d.stat().st_mtime >= s.stat().st_mtime:
        return "kept", src
    d.parent.mkdir(parents=True, exist_ok=True)
    if s.suffix.lower() not in IMAGE_SUFFIXES:
        shutil.copy2(s, d)
        return "other", src
    try:
        with Image.open(s) as img:
            if max(img.size) <= max_side:
                shutil.copy2(s, d)
                return "small", src
            fmt = img.format
            exif = img.info.get("exif")
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps aspect; JPEG draft decode
            out: Image.Image = img
            if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
                out = img.convert("RGB")
            kwargs: dict[str, object] = {"quality": quality} if fmt == "JPEG" else {}
            if exif:
                kwargs["exif"] = exif
            tmp = d.with_name(f".{d.name}.tmp")
            out.save(tmp, format=fmt, **kwargs)
            tmp.replace(d)
        return "resized", src
    except Exception as exc:  # one bad file must not stop a folder of thousands
        return "failed", f"{src}: {type(exc).__name__}: {exc}"


def resize_folder(src: str | Path, dst: str | Path, max_side: int, *, workers: int | None = None,
                  quality: int = 90) -> ResizeResult:
    """Resize every image under `src` to at most `max_side` pixels on its longer side into `dst` (see module)."""
    from tandem.train.data import usable_cpus

    source, target = Path(src).resolve(), Path(dst).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {source} does not exist")
    if max_side < 1 or not 1 <= quality <= 100:
        raise ValueError(f"need --max-side >= 1 and 1 <= --quality <= 100, got {max_side} and {quality}")
    if target == source or source in target.parents:
        raise ValueError(f"the destination {target} must be outside the source {source}")
    start = time.perf_counter()
    jobs = [(str(p), str(target / p.relative_to(source)), max_side, quality)
            for p in sorted(source.rglob("*")) if p.is_file()]
    n = max(1, min(workers or usable_cpus(), len(jobs)))
    if n == 1:
        outcomes = [_resize_one(j) for j in jobs]
    else:
        # spawn, not fork: the caller may be a process with torch's OpenMP, gloo or onnxruntime threads running,
        # and a forked copy of those can crash (it did in the test suite after in-process DDP/ORT tests)
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            outcomes = list(pool.imap_unordered(_resize_one, jobs, chunksize=max(1, len(jobs) // (8 * n))))
    result = ResizeResult(failed=[])
    names = {"resized": "resized", "small": "copied_small", "other": "copied_other", "kept": "kept"}
    for kind, detail in outcomes:
        if kind == "failed":
            assert result.failed is not None
            result.failed.append(detail)
            logger.warning("could not resize %s", detail)
        else:
            setattr(result, names[kind], getattr(result, names[kind]) + 1)
    result.seconds = time.perf_counter() - start
    return result


def resize(
    src: Annotated[Path, typer.Argument(help="Image folder tree (e.g. ImageFolder layout)")],
    dst: Annotated[Path, typer.Argument(help="Output folder (same layout)")],
    max_side: Annotated[int, typer.Option("--max-side", help="Longest side in pixels after resizing")],
    workers: Annotated[int | None, typer.Option(help="Parallel processes (default: the usable CPUs)")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality of resized JPEGs")] = 90,
) -> None:
    """Pre-resize an image folder in parallel so training decodes smaller images."""
    try:
        result = resize_folder(src, dst, max_side, workers=workers, quality=quality)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for line in (result.failed or [])[:10]:
        typer.echo(f"failed: {line}", err=True)
    typer.echo(result.summary())
    if result.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `data` command group (`tandem data resize`) to `app`."""
    data = typer.Typer(help="Dataset preparation: pre-resize image folders", no_args_is_help=True)
    data.command("resize")(resize)
    app.add_typer(data, name="data")
