"""`tandem optimize` from the command line on an .onnx file: outputs, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tandem.cli import app
from tandem.optimize.export import export_module


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))  # x: [B, S, 32] -> [B, S, 8]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    export_module(Small().eval(), {"x": torch.randn(2, 4, 32)}, root / "small.onnx", exporter="torchscript")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((64, 6, 32)).astype(np.float32))
    np.savez(root / "wrong.npz", y=np.zeros((4, 6, 32), np.float32))
    return root


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["optimize", *args, "--no-progress", "--threads", "1"])
    return result.exit_code, result.output


def test_onnx_file_with_npz_calibration(files: Path, tmp_path: Path) -> None:
    code, out = invoke(str(files / "small.onnx"), "--calibration", str(files / "calib.npz"), "--out",
                       str(tmp_path), "--batch-size", "16", "--atol", "1.0", "-t", "int8-dynamic", "-t", "fp16")
    assert code == 0, out
    assert "int8-dynamic" in out and "fp16" in out and "chosen:" in out
    for target in ("int8-dynamic", "fp16"):
        assert (tmp_path / target / "precision.yaml").exists()
    assert (tmp_path / "model.fp32.onnx").exists()


def test_corrupt_onnx_is_a_clear_error(files: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes((files / "small.onnx").read_bytes()[:300])
    code, out = invoke(str(bad), "--calibration", str(files / "calib.npz"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not a valid ONNX model" in out and "bad.onnx" in out


def test_calibration_for_another_graph_names_the_input(files: Path, tmp_path: Path) -> None:
    code, out = invoke(str(files / "small.onnx"), "--calibration", str(files / "wrong.npz"), "--out", str(tmp_path))
    assert code == 2 and "'x'" in out and "'y'" in out


def test_onnx_without_calibration_says_what_to_pass(files: Path, tmp_path: Path) -> None:
    code, out = invoke(str(files / "small.onnx"), "--out", str(tmp_path))
    assert code == 2 and "--calibration" in out


def test_unknown_target_is_refused(files: Path, tmp_path: Path) -> None:
    code, out = invoke(str(files / "small.onnx"), "--calibration", str(files / "calib.npz"), "--out",
                       str(tmp_path), "-t", "int4")
    assert code == 2 and "unknown target" in out
