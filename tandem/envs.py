"""Every TANDEM_* environment variable, read in one place."""

from __future__ import annotations

import os

__all__ = ["TANDEM_HOST", "TANDEM_PORT", "TANDEM_CPU_WORKERS", "TANDEM_SHM_DIR", "TANDEM_LOG_LEVEL",
           "TANDEM_DRAIN_TIMEOUT_S", "TANDEM_API_KEY", "TANDEM_ADMIN_KEY", "LORA_ADAPTERS", "env_str",
           "TANDEM_CACHE_DIR", "cache_dir", "shm_dir", "TANDEM_PIPELINE_HOME", "TANDEM_PIPELINE_KEY",
           "TANDEM_TRAIN_TIMEOUT_S", "TANDEM_ADAPTER_DIRS", "extra_adapter_dirs"]


def env_str(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


# Bind address and port of the HTTP server (CLI flags win).
TANDEM_HOST = "TANDEM_HOST"
TANDEM_PORT = "TANDEM_PORT"
# Number of front (HTTP + pre/post-processing) processes; default from available CPUs.
TANDEM_CPU_WORKERS = "TANDEM_CPU_WORKERS"
# Where shared-memory arenas live (default /dev/shm).
TANDEM_SHM_DIR = "TANDEM_SHM_DIR"
TANDEM_LOG_LEVEL = "TANDEM_LOG_LEVEL"
# Seconds SIGTERM waits for in-flight requests before closing.
TANDEM_DRAIN_TIMEOUT_S = "TANDEM_DRAIN_TIMEOUT_S"
# Key every route but health needs (Authorization: Bearer KEY or x-api-key: KEY); see README "Auth".
TANDEM_API_KEY = "TANDEM_API_KEY"
# Key the mutating routes (adapter load/unload) need; defaults to TANDEM_API_KEY.
TANDEM_ADMIN_KEY = "TANDEM_ADMIN_KEY"

# Where derived artefacts are kept between runs (a diffusion UNet exported for onnxruntime/openvino);
# default ~/.cache/tandem.
TANDEM_CACHE_DIR = "TANDEM_CACHE_DIR"

# Where `tandem pipeline` keeps run history (history.sqlite), logs and artifacts; default ./.tandem/pipelines.
TANDEM_PIPELINE_HOME = "TANDEM_PIPELINE_HOME"
# Key the pipeline scheduler's HTTP trigger needs (Authorization: Bearer KEY).
TANDEM_PIPELINE_KEY = "TANDEM_PIPELINE_KEY"

# Seconds a training collective waits for its peers before the process group gives up (default 600).
TANDEM_TRAIN_TIMEOUT_S = "TANDEM_TRAIN_TIMEOUT_S"

# Adapters of `tandem serve --llm` loaded at start, "name=path,name=path" (same name as TGI's variable).
LORA_ADAPTERS = "LORA_ADAPTERS"
# Folders (os.pathsep-separated, absolute) that every LLM entry's runtime adapter loads may also read,
# beside its own llm.adapter_dirs; `tandem serve --adapter-dir DIR` sets it for the processes it starts.
TANDEM_ADAPTER_DIRS = "TANDEM_ADAPTER_DIRS"


def shm_dir() -> str:
    return env_str(TANDEM_SHM_DIR) or "/dev/shm"


def cache_dir() -> str:
    return env_str(TANDEM_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "tandem")


def extra_adapter_dirs() -> list[str]:
    return [d for d in (env_str(TANDEM_ADAPTER_DIRS) or "").split(os.pathsep) if d]
