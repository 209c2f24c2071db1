"""One pydantic config tree: the server's settings and each model's `tandem.yaml`.

Errors are turned into `ConfigError`s naming the file, the field and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from tandem.errors import ConfigError

__all__ = ["SAMPLERS", "BatchingConfig", "DiffusionConfig", "LLMConfig", "ModelConfig", "OnnxConfig", "ServerConfig",
           "StageConfig", "is_loopback", "load_model_config", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(value: int | str | None) -> int | None:
    """Parse `"2GiB"`, `"512MB"`, `1048576` into bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse {value!r} as a size; write e.g. 2GiB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_cpus() -> int:
    """CPUs this process may run on (honours affinity masks and containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """Dynamic batching: a batch closes when full or `max_batch_delay_ms` after its first item."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_batch_delay_ms: float = Field(default=5.0, ge=0, le=10_000)
    length_aware: bool = True


class LLMConfig(_Strict):
    """An LLM entry (`kind: llm`): a Hugging Face Llama/Mistral/Qwen2 folder plus PEFT LoRA adapters.

    Paths are relative to the entry's folder. Memory is accounted in bytes: the KV cache takes
    max_batch_size * max_total_tokens * (2 * layers * kv_heads * head_dim * dtype size), and the
    adapter bank max_loras * max_lora_rank * (in + out) per targeted projection; both are logged.
    """

    path: str
    adapters: dict[str, str] = Field(default_factory=dict)  # name -> folder, loaded at start
    # Folders that runtime loads (POST /v1/load_lora_adapter) may read from. Default: the parent
    # folders of the start-up adapters.
    adapter_dirs: list[str] = Field(default_factory=list)
    max_loras: int = Field(default=8, ge=1, le=1024)  # device slots of stacked A/B buffers
    max_cpu_loras: int = Field(default=32, ge=1, le=65536)  # adapters kept in host memory (LRU)
    max_lora_rank: int = Field(default=16, ge=1, le=1024)
    # How a mixed batch applies its adapters, always one pass (see tandem/llm/lora.py): "slots" (each
    # KV slot keeps a copy of its adapter, made at join), "gathered" (weights gathered per step) or
    # "grouped" (rows sorted by adapter, grouped GEMM). benchmarks/lora.py compares them.
    lora_form: Literal["slots", "gathered", "grouped"] = "slots"
    max_batch_size: int = Field(default=32, ge=1, le=4096)  # sequences decoded together (KV slots)
    max_total_tokens: int = Field(default=512, ge=2)  # prompt + generated tokens per sequence
    max_prefill_tokens: int = Field(default=4096, ge=1)
    max_waiting: int = Field(default=256, ge=1)  # queued requests beyond the running ones; 503 past it
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    default_max_new_tokens: int = Field(default=64, ge=1)

    def resolve(self, base: Path, value: str) -> Path:
        p = Path(value).expanduser()
        return (p if p.is_absolute() else base / p).resolve()

    def model_dir(self, base: Path) -> Path:
        return self.resolve(base, self.path)

    def total_tokens(self, base: Path) -> int:
        """max_total_tokens capped at the model's max_position_embeddings: the fronts and the worker agree."""
        positions = json.loads((self.model_dir(base) / "config.json").read_text()).get("max_position_embeddings")
        return min(self.max_total_tokens, positions or self.max_total_tokens)


DType = Literal["auto", "float32", "bfloat16", "float16"]
SAMPLERS = ("dpmpp_2m", "euler", "euler_a", "ddim")  # per-request schedulers of the diffusion kind


class StageConfig(_Strict):
    """Where and how one sub-model of a diffusion pipeline runs (text encoder, UNet, VAE decoder).

    `device: auto` follows the entry's device; `dtype: auto` is bf16 on CUDA, fp32 on CPU (the seed
    compiles every stage in bf16 on accelerators). `runtime` is the seam for compiled sub-models:
    `torch` (eager, optionally `compile`d per size bucket) runs every stage; the UNet may instead run
    on `onnxruntime` or `openvino` (CPU, fp32: exported once per size bucket and cached, see
    tandem/diffusion/runtimes.py and BENCHMARKS.md for what they give on CPUs).
    """

    device: str = "auto"
    dtype: DType = "auto"
    runtime: Literal["torch", "onnxruntime", "openvino"] = "torch"
    compile: bool = False  # torch.compile with static shapes per size bucket (GPU path)
    channels_last: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


class DiffusionConfig(_Strict):
    """A text-to-image entry (`kind: diffusion`): a diffusers Stable Diffusion 1.x/2.x pipeline folder.

    The folder holds model_index.json, text_encoder, tokenizer, unet, vae and scheduler (safetensors
    only). Requests are denoised together, one UNet call per iteration over every active request of
    the same size (see tandem/diffusion/engine.py); `max_batch_rows` counts UNet rows, two per image
    with classifier-free guidance.
    """

    path: str = "pipeline"
    sizes: list[str] = Field(default_factory=lambda: ["512x512"], min_length=1)  # buckets; first = default
    scheduler: Literal["dpmpp_2m", "euler", "euler_a", "ddim"] = "dpmpp_2m"
    default_steps: int = Field(default=20, ge=1, le=1000)
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=100, ge=1, le=1000)
    default_guidance: float = Field(default=7.5, ge=0.0, le=100.0)
    max_guidance: float = Field(default=30.0, ge=0.0, le=100.0)
    max_images: int = Field(default=4, ge=1, le=64)  # images one request may ask for (n, batch_size)
    max_batch_rows: int = Field(default=8, ge=1, le=1024)  # UNet rows per iteration
    max_waiting: int = Field(default=64, ge=1, le=65536)  # queued requests beyond the active ones; 503 past it
    preview_interval_ms: float = Field(default=250.0, ge=0.0)  # at most one preview per request this often
    text_encoder: StageConfig = Field(default_factory=StageConfig)
    unet: StageConfig = Field(default_factory=StageConfig)
    vae: StageConfig = Field(default_factory=StageConfig)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[str]) -> list[str]:
        for s in v:
            w, h = _size(s)
            if w % 8 or h % 8 or not (8 <= w <= 4096 and 8 <= h <= 4096):
                raise ValueError(f"size {s!r}: width and height must be multiples of 8 between 8 and 4096")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> DiffusionConfig:
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError("need min_steps <= default_steps <= max_steps")
        if self.default_guidance > self.max_guidance:
            raise ValueError("default_guidance must be <= max_guidance")
        for name, stage in (("text_encoder", self.text_encoder), ("vae", self.vae)):
            if stage.runtime != "torch":
                raise ValueError(f"{name}.runtime {stage.runtime!r}: only the UNet stage runs on another runtime; "
                                 "the text encoder and VAE run on torch")
        if self.unet.runtime != "torch" and (self.unet.device.startswith("cuda") or self.unet.dtype not in
                                             ("auto", "float32") or self.unet.compile):
            raise ValueError(f"unet.runtime {self.unet.runtime!r} runs the UNet in fp32 on the CPU (fix: device cpu, "
                             "dtype auto or float32, compile false; on GPUs use runtime torch)")
        return self

    def buckets(self) -> list[tuple[int, int]]:
        """The allowed (width, height) pairs, the default first."""
        return [_size(s) for s in self.sizes]

    def pipeline_dir(self, base: Path) -> Path:
        p = Path(self.path).expanduser()
        return (p if p.is_absolute() else base / p).resolve()


class OnnxConfig(_Strict):
    """The `onnx:` section of a `runtime: onnxruntime` entry: which artefact, on which providers.

    `path` is relative to the entry's folder and must resolve inside it. `providers: auto` picks
    CUDAExecutionProvider when the entry's device is CUDA and ONNX Runtime has it, else
    CPUExecutionProvider; TensorRT runs only when listed explicitly.
    """

    path: str = Field(min_length=1)
    providers: Literal["auto"] | list[str] = "auto"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("providers must be auto or a non-empty list, e.g. [CPUExecutionProvider]")
        return v

    def artefact(self, base: Path) -> Path:
        """The artefact's resolved path; ValueError when it would lie outside `base` (the entry folder)."""
        root = base.resolve()
        target = (root / Path(self.path).expanduser()).resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"onnx.path {self.path!r} resolves to {target}, outside the entry folder {root} "
                             "(fix: copy the .onnx file into the entry folder and give a relative path)")
        return target


class ModelConfig(_Strict):
    """Settings of one model (a folder of the model repository with `model.py` + `tandem.yaml`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9_.-]+$")
    cpu_workers: int | Literal["auto"] = "auto"
    instances: int = Field(default=1, ge=1, le=64)
    device: str = "auto"
    threads: int | Literal["auto"] = "auto"
    memory_limit: int | None = None
    batching: BatchingConfig | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    queue_size: int = Field(default=64, ge=1, le=65536)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    max_request_rows: int = Field(default=4, ge=1, le=4096)  # rows one v2 request may carry
    # strings/blobs one request-level request (v2 BYTES, /v1/embeddings, /embed) may carry; 413 beyond
    max_request_inputs: int = Field(default=2048, ge=1, le=1_000_000)
    weights: str | None = None
    warmup: bool = True  # one dummy predict per replica at start (first requests are not slow)
    params: dict[str, Any] = Field(default_factory=dict)
    # "llm" / "diffusion": no model.py; the `llm` / `diffusion` section says what to serve
    kind: Literal["model", "llm", "diffusion"] = "model"
    llm: LLMConfig | None = None
    diffusion: DiffusionConfig | None = None
    # What runs each batch: "torch" calls model.py's setup/predict; "onnxruntime" runs the `onnx:`
    # artefact instead (preprocess/postprocess still come from model.py).
    runtime: Literal["torch", "onnxruntime"] = "torch"
    onnx: OnnxConfig | None = None
    path: Path = Path(".")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("memory_limit", "max_request_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v

    @field_validator("cpu_workers", "threads")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _llm_section(self) -> ModelConfig:
        if (self.kind == "llm") != (self.llm is not None):
            raise ValueError("kind: llm needs an `llm:` section (and only kind: llm may have one)")
        if (self.kind == "diffusion") != (self.diffusion is not None):
            raise ValueError("kind: diffusion needs a `diffusion:` section (and only kind: diffusion may have one)")
        return self

    @model_validator(mode="after")
    def _onnx_section(self) -> ModelConfig:
        if self.kind != "model" and (self.runtime != "torch" or self.onnx is not None):
            raise ValueError(f"kind: {self.kind} entries run on their built-in engine (fix: remove `runtime:` and "
                             "`onnx:`)")
        if self.runtime == "onnxruntime" and self.onnx is None:
            raise ValueError("runtime: onnxruntime needs an `onnx:` section (fix: add `onnx: {path: "
                             "model.onnx}` naming the artefact, relative to the entry folder)")
        if self.runtime != "onnxruntime" and self.onnx is not None:
            raise ValueError(f"an `onnx:` section is only read with runtime: onnxruntime, not {self.runtime} "
                             "(fix: add `runtime: onnxruntime`, or remove the `onnx:` section)")
        if self.onnx is not None:
            self.onnx.artefact(self.path)
        return self

    @property
    def key(self) -> str:
        """Unique name of this model version inside a server."""
        return f"{self.name}:{self.version}"

    def weights_path(self) -> Path | None:
        if self.weights is None:
            return None
        p = Path(self.weights)
        return p if p.is_absolute() else (self.path / p)

    def onnx_path(self) -> Path | None:
        """The resolved ONNX artefact of a `runtime: onnxruntime` entry (inside its folder), else None."""
        return self.onnx.artefact(self.path) if self.onnx is not None else None


class ServerConfig(_Strict):
    """Process-level settings; CLI flags and TANDEM_* variables fill it."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cpu_workers: int | None = Field(default=None, ge=1, le=256)
    default_model: str | None = None
    drain_timeout_s: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    restart_backoff_s: float = Field(default=0.5, ge=0)
    # Niceness added to front processes, to favour accelerator workers when both share CPU cores.
    # Measured on 2 cores with MiniLM: no effect beyond noise, so off by default.
    front_nice: int = Field(default=0, ge=0, le=19)
    # Live model repository (Triton's extension): "none" serves what was there at start; "explicit"
    # adds POST /v2/repository/models/{m}/load|unload; "poll" also reloads models whose folder changed.
    model_control: Literal["none", "explicit", "poll"] = "explicit"
    repository_poll_s: float = Field(default=2.0, gt=0)
    # Auth (README "Auth"): every route but health needs `api_key`; mutating routes need `admin_key`
    # (the api key when none is set). SecretStr: never shown by repr, logs or errors.
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    insecure: bool = False  # allow a non-loopback bind address without api_key

    @field_validator("api_key", "admin_key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            return None  # an empty --api-key / TANDEM_API_KEY= means no key
        return v

    @model_validator(mode="after")
    def _bind_needs_key(self) -> ServerConfig:
        if self.api_key is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"refusing to listen on {self.host!r} without an API key: anyone who can reach it "
                              "could use every model (fix: pass --api-key KEY or set TANDEM_API_KEY; or "
                              "--host 127.0.0.1; or --insecure to serve without auth on purpose)")
        return self


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address (127.0.0.0/8, ::1) or a name resolving only to such."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not host:  # "" binds every interface
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # unresolvable: the bind fails later with its own error; refuse to guess
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def _format_validation(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        fix = {"extra_forbidden": "remove it or check its spelling",
               "missing": "add it"}.get(e["type"], "see the tandem.yaml reference in README.md")
        lines.append(f"  field {field!r}: {e['msg']} (fix: {fix})")
    return "\n".join(lines)


def load_model_config(folder: Path, name: str | None = None, version: str | None = None) -> ModelConfig:
    """Read and validate `folder/tandem.yaml`; `name` and `version` are defaults the file may override."""
    path = folder / "tandem.yaml"
    raw: Any = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    raw.setdefault("name", name or folder.name)
    if version is not None:
        raw.setdefault("version", version)
    raw["path"] = folder.resolve()
    try:
        return ModelConfig(**raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(path, e)) from None
