"""Workload (a) end to end: generated JPEG folder -> examples/train/image_folder.py -> run folder + val accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from make_image_folder import make_image_folder  # noqa: E402


def test_image_folder_example_learns_and_writes_a_run_folder(tmp_path: Path) -> None:
    # small and easy on purpose (64x64, 4 clearly different shapes): the test checks the pipeline, not the model
    data = make_image_folder(tmp_path / "shapes", train=480, val=120, seed=0, size=64,
                             classes=["circle", "square", "cross", "ring"], processes=1)
    (data / ".complete").touch()
    run_dir, out = tmp_path / "run", tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "examples/train/image_folder.py"), "--data", str(data), "--size", "56",
           "--width", "16", "--epochs", "6", "--batch-size", "32", "--lr", "5e-3", "--run-dir", str(run_dir),
           "--no-progress", "--json", str(out)]
    # one intra-op thread: on a busy 2-core machine two spinning OpenMP threads next to other processes make
    # each step ~10x slower; the test checks the pipeline, not the speed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["val_accuracy"] > 0.6, result   # chance is 0.25
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == result["summary"]["optimizer_steps"] == 6 * (480 // 32)
    assert all(s["time"] > 0 and s["data_time"] >= 0 and s["loss"] is not None for s in steps)
    assert "Epoch(train) [6]" in (run_dir / "train.log").read_text()
    assert (run_dir / "steps.png").stat().st_size > 1000
    assert Path(result["checkpoint"]).is_dir() and str(run_dir / "checkpoints") in result["checkpoint"]
    # the auto-tuned loader chose settings by a trial and reported it
    assert result["loader_settings"] is not None and result["tune_report"].startswith("loader tuning")
