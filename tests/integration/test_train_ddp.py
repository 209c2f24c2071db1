"""`tandem train --nproc 2` (torchrun, gloo): DDP equals one process on the same global batch; comm hooks run;
a failing rank stops the job with its error instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tandem.serving._proc import pid_alive

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "tests" / "fixtures" / "train_ddp" / "ddp_run.py")


def _launch(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TANDEM_TRAIN_TIMEOUT_S": "30"}
    return subprocess.run([sys.executable, "-m", "tandem.train.command", "train", "--nproc", str(nproc),
                           "--threads", "1", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_two_gloo_ranks_equal_one_process_and_compressed_hooks_train(tmp_path: Path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert _launch(1, str(one), "16", "none").returncode == 0
    result = _launch(2, str(two), "16", "none,fp16,bf16,powersgd")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OMP_NUM_THREADS=1" in result.stderr
    reference, runs = torch.load(one), torch.load(two)
    for name, value in reference["none"]["state"].items():
        torch.testing.assert_close(runs["none"]["state"][name], value, atol=1e-6, rtol=0)
    for compression in ("fp16", "bf16", "powersgd"):   # lossy: they need only to run and learn
        losses = runs[compression]["losses"]
        assert sum(losses[-4:]) < sum(losses[:4]), (compression, losses)


def test_a_failing_rank_stops_the_job_with_its_error() -> None:
    start = time.monotonic()
    result = _launch(2, "fail", timeout=90)
    assert result.returncode != 0
    assert "rank one exploded on purpose" in result.stdout + result.stderr
    assert time.monotonic() - start < 60


def test_sigterm_and_kill_9_of_tandem_train_stop_torchrun_and_its_ranks(tmp_path: Path) -> None:
    import signal

    script = tmp_path / "sleeper.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1] + f'.{os.getpid()}', 'w').close()\ntime.sleep(120)\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        marker = tmp_path / sig.name
        proc = subprocess.Popen([sys.executable, "-m", "tandem.train.command", "train", "--nproc", "1",
                                 str(script), str(marker)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while not list(tmp_path.glob(f"{sig.name}.*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = [int(p.suffix[1:]) for p in tmp_path.glob(f"{sig.name}.*")]
        assert ranks, "the rank never started"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(pid) for pid in ranks), f"a rank outlived `tandem train` after {sig.name}"
