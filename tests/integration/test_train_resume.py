"""Exact resume after kill -9 mid-epoch: the resumed run sees the same next batches and loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fixtures" / "train" / "resume_run.py"


def _start(run_dir: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(out), *extra], env=env)


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_sigkill_mid_epoch_is_exact(tmp_path: Path) -> None:
    flag = tmp_path / "stopped"
    reference = _start(tmp_path / "ref", tmp_path / "ref.jsonl")
    victim = _start(tmp_path / "run", tmp_path / "run.jsonl", "--stop-after", "8", str(flag))
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert victim.poll() is None, "the run to be killed exited early"
        assert time.monotonic() < deadline, "the run never reached step 8"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)   # mid-epoch 2 (5 batches an epoch), two steps after the step-6 checkpoint
    victim.wait(30)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    before = [r for r in _rows(tmp_path / "run.jsonl") if int(r["step"]) <= 6]  # type: ignore[call-overload]
    resumed = _start(tmp_path / "run", tmp_path / "resumed.jsonl")
    assert resumed.wait(120) == 0 and reference.wait(120) == 0
    after = _rows(tmp_path / "resumed.jsonl")
    assert after[0]["step"] == 7
    want = _rows(tmp_path / "ref.jsonl")
    assert len(want) == 10
    assert [r["batch"] for r in before + after] == [r["batch"] for r in want]
    assert [r["loss"] for r in before + after] == [r["loss"] for r in want]
    # the run folder's steps.jsonl reads as one uninterrupted run too
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert logged == [r["loss"] for r in want]
