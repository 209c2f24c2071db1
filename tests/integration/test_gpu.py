"""CUDA paths: device placement, replicas sharing one GPU, memory_limit enforcement."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import echo_repo, serve_fails, start_server


@pytest.mark.gpu
def test_two_replicas_share_one_gpu_under_a_memory_limit(tmp_path: Path) -> None:
    server = start_server(echo_repo(tmp_path, "device: cuda\ninstances: 2\nmemory_limit: 2GiB\n"))
    try:
        with server.client() as c:
            pids = {c.post("/predictions/echo", json={"x": [1, 2]}).json()["worker_pid"] for _ in range(20)}
            assert c.post("/predictions/echo", json={"x": [1, 2]}).json()["y"] == [2.0, 4.0]
        assert len(pids) == 2
    finally:
        assert server.stop() == 0


@pytest.mark.gpu
def test_model_over_cuda_memory_limit_fails_at_start(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path, "device: cuda\nmemory_limit: 1MiB\nparams: {allocate_mib: 64}\n")
    model = repo / "echo" / "model.py"
    model.write_text(model.read_text().replace(
        'self.delay = float(self.params.get("predict_delay_s", 0.0))',
        'self.delay = float(self.params.get("predict_delay_s", 0.0))\n'
        '        self.block = torch.empty(int(self.params.get("allocate_mib", 0)) * 2**20, dtype=torch.uint8, '
        'device=device)'))
    assert "memory_limit" in serve_fails(repo)
