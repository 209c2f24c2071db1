"""`tandem serve --adapter-dir`: a server-wide folder runtime adapter loads may read, beside llm.adapter_dirs.

What a pipeline needs to deploy into the built-in tiny-llm (whose own adapter_dirs is its package folder)
without editing the installed package's tandem.yaml.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import TINY_LLM, start_server


def _entry(root: Path) -> Path:
    """tiny-llm as the built-in repository configures it: adapter_dirs is its own adapters folder."""
    entry = root / "repo" / "tiny-llm"
    entry.mkdir(parents=True)
    (entry / "tandem.yaml").write_text(
        "kind: llm\ncpu_workers: 1\ntimeout_s: 60\nllm:\n"
        f"  path: {TINY_LLM / 'base'}\n  adapters: {{upper: {TINY_LLM / 'adapters' / 'upper'}}}\n"
        f"  adapter_dirs: [{TINY_LLM / 'adapters'}]\n"
        "  max_batch_size: 8\n  max_total_tokens: 64\n  max_loras: 4\n  max_lora_rank: 16\n")
    return root / "repo"


def test_an_adapter_dir_flag_widens_what_runtime_loads_may_read(tmp_path: Path) -> None:
    published, elsewhere = tmp_path / "published", tmp_path / "elsewhere"
    shutil.copytree(TINY_LLM / "adapters" / "reverse", published / "rev")
    shutil.copytree(TINY_LLM / "adapters" / "reverse", elsewhere / "rev")
    srv = start_server(_entry(tmp_path), "--cpu-workers", "1", "--adapter-dir", str(published))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "rev", "lora_path": str(published / "rev")})
            assert r.status_code == 200, r.text
            out = c.post("/v1/completions", json={"model": "rev", "prompt": "hello=", "max_tokens": 12,
                                                  "temperature": 0}).json()
            assert out["choices"][0]["text"] == "olleh"
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(elsewhere / "rev")})
            assert r.status_code == 400 and "outside the allowed adapter directories" in r.text
            assert str(published) in r.text  # the error lists what is allowed, the flag's folder included
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "own", "lora_path": "reverse"})
            assert r.status_code == 200, r.text  # the entry's own adapter_dirs still apply (relative: the first)
    finally:
        srv.stop()


def test_a_missing_adapter_dir_stops_the_start_naming_the_option(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tandem.cli", "serve", str(_entry(tmp_path)), "--port", "0",
           "--adapter-dir", str(tmp_path / "no-such-folder")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--adapter-dir" in proc.stdout + proc.stderr
