"""CUDA paths: device placement, replicas sharing one GPU, memory_limit enforcement."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURE_REPO, start_server


def _repo(tmp_path: Path, yaml_text: str) -> Path:
    folder = tmp_path / "repo" / "echo"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text((FIXTURE_REPO / "echo" / "model.py").read_text())
    (folder / "tandem.yaml").write_text(yaml_text)
    return tmp_path / "repo"


@pytest.mark.gpu
def test_two_replicas_share_one_gpu_under_a_memory_limit(tmp_path: Path) -> None:
    server = start_server(_repo(tmp_path, "device: cuda\ninstances: 2\nmemory_limit: 2GiB\n"))
    try:
        with server.client() as c:
            pids = {c.post("/predictions/echo", json={"x": [1, 2]}).json()["worker_pid"] for _ in range(20)}
            assert c.post("/predictions/echo", json={"x": [1, 2]}).json()["y"] == [2.0, 4.0]
        assert len(pids) == 2
    finally:
        assert server.stop() == 0


@pytest.mark.gpu
def test_model_over_cuda_memory_limit_fails_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = _repo(tmp_path, "device: cuda\nmemory_limit: 1MiB\nparams: {allocate_mib: 64}\n")
    model = repo / "echo" / "model.py"
    model.write_text(model.read_text().replace(
        'self.delay = float(self.params.get("predict_delay_s", 0.0))',
        'self.delay = float(self.params.get("predict_delay_s", 0.0))\n'
        '        self.block = torch.empty(int(self.params.get("allocate_mib", 0)) * 2**20, dtype=torch.uint8, '
        'device=device)'))
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", str(repo), "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "memory_limit" in proc.stderr
