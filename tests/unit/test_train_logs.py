"""Run folder: steps.jsonl lines, train.log in mmengine's format, the PNG; the step clock's timing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tandem.train.data import BatchTiming
from tandem.train.logs import RunLog


def _drive(log: RunLog, steps: int) -> None:
    # two-second iterations, a quarter second of each waiting for data
    for i in range(steps):
        log.next_called(10.0 + 2 * i)
        log.batch_ready(10.25 + 2 * i, BatchTiming(epoch=0, index=i, data_time=0.25, samples=8))
        log.record_loss(torch.tensor(float(i)))
        log.record_step(0.0, step=i + 1, lr=1e-3, skipped=False)
    log.epoch_done(10.0 + 2 * steps)


def test_jsonl_log_line_and_png(tmp_path: Path) -> None:
    log = RunLog(tmp_path, log_every=2, progress=False)
    log.epoch_length, log.total_batches = 4, 8
    _drive(log, 4)
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert rows[0]["time"] == 2.0 and rows[0]["data_time"] == 0.25 and rows[0]["samples_per_s"] == 4.0
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 2
    pattern = (r"^\d\d/\d\d \d\d:\d\d:\d\d - tandem - INFO - Epoch\(train\) \[1\]\[2/4\]  lr: 1\.0000e-03  "
               r"eta: 0:00:12  time: 2\.0000  data_time: 0\.2500  loss: 0\.5000  samples/s: 4\.0$")
    assert re.match(pattern, lines[0]), lines[0]
    summary = log.summary()
    assert summary["steps"] == 4 and summary["data_time_share"] == 0.125 and summary["samples_per_s"] == 4.0
    log.close()
    png = tmp_path / "steps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "run", enabled=False, progress=False)
    _drive(log, 2)
    log.close()
    assert not (tmp_path / "run").exists() and log.summary()["steps"] == 2


def test_resume_drops_steps_after_the_checkpoint(tmp_path: Path) -> None:
    log = RunLog(tmp_path, progress=False)
    _drive(log, 5)
    log.close()
    again = RunLog(tmp_path, progress=False)
    again.resume(3)
    assert [r.step for r in again.records] == [1, 2, 3]
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 3
