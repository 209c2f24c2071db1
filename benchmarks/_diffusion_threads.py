"""Why the diffusers-server pattern is slower than offline at c=1: where a stock pipeline call runs.

One process, the sd-shaped random pipeline at 128x128, torch at 2 intra-op threads, 20 steps per call. The
same call from the main thread, from a 6-thread executor (asyncio's default, as diffusers' examples/server
uses), with `torch.set_num_threads` inside the task, and from a 1-thread executor; then all again. Once a
thread other than the caller has run torch, its idle OpenMP team slows every later call on a 2-CPU machine.

    .venv/bin/python benchmarks/_diffusion_threads.py      # ~2 min on 2 cores
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from tandem.diffusion.testing import SD_SHAPED, make_random_pipeline


def main() -> None:
    """Print the median of 4 calls per placement, two passes."""
    torch.set_num_threads(2)
    folder = make_random_pipeline(Path(tempfile.mkdtemp(prefix="tandem-threads-")) / "pipeline", SD_SHAPED)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def one(threads: int | None = None) -> float:
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        pipe("a cat", num_inference_steps=20, height=128, width=128, output_type="np",
             generator=torch.Generator().manual_seed(1))
        return time.perf_counter() - start

    def run(label: str, call: Callable[[], float], n: int = 4) -> None:
        times = [call() for _ in range(n)]
        print(f"{label}: median {statistics.median(times) * 1e3:.0f} ms "
              f"({', '.join(f'{t * 1e3:.0f}' for t in times)})", flush=True)

    one()   # warm-up, main thread
    pool, single = ThreadPoolExecutor(6), ThreadPoolExecutor(1)
    for round_ in (1, 2):
        print(f"pass {round_}")
        run("  main thread", one)
        run("  6-thread executor", lambda: pool.submit(one).result())
        run("  6-thread executor, set_num_threads(2) in the task", lambda: pool.submit(one, 2).result())
        run("  1-thread executor", lambda: single.submit(one).result())


if __name__ == "__main__":
    main()
