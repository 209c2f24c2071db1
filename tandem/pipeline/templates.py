"""Step templates: `Step`s for the usual stages of a model's life, with sensible defaults.

    train           `tandem train [--nproc N] SCRIPT ARGS...` (torchrun ranks; CPU gloo or CUDA NCCL)
    evaluate        a function or a command that scores a model: a metrics JSON artifact plus one output
                    parameter per metric, for a gate such as ``when=gate("evaluate", "accuracy", ">=", 0.95)``
    optimize        `tandem optimize SOURCE -t TARGET ...` (the precision doctor), writing a serving entry
    deploy_adapter  hot-load a LoRA adapter into a running `tandem serve` (admin key)
    roll_version    roll a new model version through the repository API (admin key), without failed requests
    smoke           requests that must succeed

The server URL is a pipeline parameter (``{params.server}`` by default). Keys are never written into a pipeline:
deploy and smoke steps name the environment variable that holds the key (`key_env`) and read it when they run;
on Argo, `key_secret` ("SECRET/KEY") fills that variable from a Kubernetes Secret.
Deploy and smoke steps are never cached: they act on a server, whose state is not in any cache key.

>>> from tandem.pipeline.spec import Param, Pipeline
>>> p = Pipeline(name="demo", params={"server": Param(default="http://127.0.0.1:8000")})
>>> _ = p.add(train("train", "fit.py", ["--out", "{outputs.model}"]))
>>> _ = p.add(smoke("smoke", [{"path": "/v2/health/ready", "method": "GET"}], after=["train"]))
>>> p.validate_dag()
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from tandem.pipeline.deploy import ADMIN_KEY_ENV, API_KEY_ENV
from tandem.pipeline.spec import Outputs, ParamValue, PipelineError, Resources, Retry, Step

__all__ = ["deploy_adapter", "evaluate", "gate", "optimize", "roll_version", "smoke", "train"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OPS = ("==", "!=", ">=", "<=", ">", "<")
SERVER = "{params.server}"


def _step(**fields: Any) -> Step:
    """A `Step`, its validation errors as `PipelineError`s naming the step and the field."""
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return Step(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise PipelineError(err["msg"], step=str(fields.get("name")),
                            field=".".join(str(p) for p in err["loc"]) or None) from None


def _outputs(outputs: Outputs | Sequence[str]) -> Outputs:
    return outputs if isinstance(outputs, Outputs) else Outputs(artifacts=list(outputs))


def _key_env(step: str, key_env: str) -> str:
    if not _ENV_NAME.match(key_env):
        raise PipelineError(f"{key_env!r} is not an environment variable name; name the variable that holds the key "
                            f"(e.g. {ADMIN_KEY_ENV}), never the key itself: pipeline files are not secret",
                            step=step, field="args.key_env")
    return key_env


def gate(step: str, metric: str, op: str, threshold: float | str) -> str:
    """A ``when`` condition on an evaluation step's metric: ``gate("evaluate", "accuracy", ">=", 0.95)``."""
    if op not in _OPS:
        raise PipelineError(f"operator {op!r} is not one of {' '.join(_OPS)}", step=step, field="when")
    return f"{{steps.{step}.{metric}}} {op} {threshold}"


def train(name: str, script: str, args: Sequence[str] = (), *, nproc: int = 1, threads: int | None = None,
          inputs: Mapping[str, str] | None = None, outputs: Outputs | Sequence[str] = ("model",),
          resources: Resources | None = None, env: Mapping[str, str] | None = None, after: Sequence[str] = (),
          when: str | None = None, code: Sequence[str] = (), timeout_s: float | None = None,
          retry: Retry | None = None, image: str | None = None) -> Step:
    """`tandem train [--nproc N] [--threads T] SCRIPT ARGS...`; `outputs` are artifact names (or `Outputs`).

    The script writes each output where its ``{outputs.NAME}`` argument says. `code`: other files the script
    imports, so the cache notices when they change (the script itself is hashed already). Retried once when
    killed (pre-empted, out of memory), never on an exit code of its own.
    """
    if nproc < 1:
        raise PipelineError(f"nproc must be >= 1, got {nproc}", step=name, field="nproc")
    command = ["tandem", "train", "--nproc", str(nproc), *(["--threads", str(threads)] if threads else []),
               script, *args]
    return _step(name=name, command=command, inputs=dict(inputs or {}), outputs=_outputs(outputs),
                 resources=resources or Resources(cpu=float(nproc * (threads or 1))), env=dict(env or {}),
                 after=list(after), when=when, code=list(code), timeout_s=timeout_s,
                 retry=retry or Retry(limit=1, on=["infra"]), image=image)


def evaluate(name: str, target: str | Sequence[str], *, args: Mapping[str, ParamValue] | None = None,
             inputs: Mapping[str, str] | None = None, metrics: Sequence[str] = ("accuracy",),
             after: Sequence[str] = (), when: str | None = None, resources: Resources | None = None,
             env: Mapping[str, str] | None = None, code: Sequence[str] = (), timeout_s: float | None = None,
             image: str | None = None) -> Step:
    """Score a model: `target` is ``"module:function"`` (called with `args` and ``metrics_file``; it returns
    ``write_metrics(metrics_file, {...})``) or a command (argv) that writes the JSON to ``{outputs.metrics}``.

    The step produces the artifact ``metrics`` (JSON) and one output parameter per name in `metrics`.
    """
    if not metrics:
        raise PipelineError("name at least one metric (an output parameter for the gate)", step=name,
                            field="metrics")
    common: dict[str, Any] = dict(name=name, inputs=dict(inputs or {}), after=list(after), when=when,
                                  outputs=Outputs(artifacts=["metrics"], params=list(metrics)),
                                  resources=resources, env=dict(env or {}), code=list(code), timeout_s=timeout_s,
                                  image=image)
    if isinstance(target, str):
        if "metrics_file" in (args or {}):
            raise PipelineError("metrics_file is set by the template", step=name, field="args.metrics_file")
        return _step(function=target, args={**(args or {}), "metrics_file": "{outputs.metrics}"}, **common)
    if args:
        raise PipelineError("args are for a function target; put a command's arguments in its argv", step=name,
                            field="args")
    command = ["python", "-m", "tandem.pipeline.evaluate", "--metrics-file", "{outputs.metrics}",
               *[f"--result={m}={{results.{m}}}" for m in metrics], "--", *target]
    return _step(command=command, **common)


def optimize(name: str, source: str = "{inputs.model}", *, inputs: Mapping[str, str] | None = None,
             targets: Sequence[str] = ("int8-dynamic",), calibration: str | None = None,
             atol: float | str | None = None, rtol: float | str | None = None, check_error_stat: str | None = None,
             threads: int | str | None = None, limit: int | str | None = None,
             min_speedup: float | str | None = None, write_entry: bool = True,
             entry_name: str | None = None, extra_args: Sequence[str] = (), after: Sequence[str] = (),
             when: str | None = None, resources: Resources | None = None, timeout_s: float | None = None,
             image: str | None = None) -> Step:
    """`tandem optimize SOURCE -t TARGET ...`: artifacts ``optimized`` (per-target models, precision.yaml,
    report.md) and, with `write_entry`, ``entry`` (a repository entry serving the chosen artefact on ONNX Runtime).

    SOURCE is a repository entry (its calibration requests go through its preprocess), a built-in model's name or
    an ``.onnx`` file (with `calibration` an ``.npz``). Numeric options may be placeholders (``{params.atol}``).
    """
    flags: list[str] = []
    for t in targets:
        flags += ["-t", t]
    for flag, value in (("--calibration", calibration), ("--atol", atol), ("--rtol", rtol),
                        ("--check-error-stat", check_error_stat), ("--threads", threads), ("--limit", limit),
                        ("--min-speedup", min_speedup), ("--entry-name", entry_name)):
        if value is not None:
            flags += [flag, str(value)]
    command = ["tandem", "optimize", source, "--out", "{outputs.optimized}", "--no-progress", *flags,
               *(["--write-entry", "{outputs.entry}"] if write_entry else []), *extra_args]
    artifacts = ["optimized", "entry"] if write_entry else ["optimized"]
    return _step(name=name, command=command, inputs=dict(inputs or {}), outputs=Outputs(artifacts=artifacts),
                 after=list(after), when=when, resources=resources, timeout_s=timeout_s, image=image)


def deploy_adapter(name: str, *, adapter: str, adapter_name: str, server: str = SERVER,
                   publish_dir: str | None = None, server_dir: str | None = None, model: str | None = None,
                   key_env: str = ADMIN_KEY_ENV, key_secret: str | None = None, after: Sequence[str] = (),
                   when: str | None = None, timeout_s: float = 600.0, retry: Retry | None = None) -> Step:
    """Hot-load the adapter artifact `adapter` (``STEP.ARTIFACT``) into the server as `adapter_name`.

    `publish_dir`: a folder among the server entry's ``llm.adapter_dirs`` (a parameter, e.g.
    ``{params.adapter_dir}``) the adapter is copied into first; `server_dir`: that folder as the server sees it.
    Output parameters: ``adapter``, ``lora_path``, ``load_ms``, ``reloaded`` (``false`` when the same content was
    already live there: the step is idempotent, see `tandem.pipeline.deploy.load_adapter`).
    """
    args: dict[str, ParamValue] = {"server": server, "adapter": "{inputs.adapter}", "name": adapter_name,
                                   "key_env": _key_env(name, key_env), "timeout_s": timeout_s}
    args.update({k: v for k, v in (("publish_dir", publish_dir), ("server_dir", server_dir), ("model", model))
                 if v is not None})
    return _step(name=name, function="tandem.pipeline.deploy:load_adapter", args=args,
                 secrets={key_env: key_secret} if key_secret else {}, inputs={"adapter": adapter},
                 outputs=Outputs(params=["adapter", "lora_path", "load_ms", "reloaded"]), after=list(after), when=when,
                 cache=False, timeout_s=timeout_s + 30, retry=retry, resources=Resources(cpu=0.25))


def roll_version(name: str, *, model: str, entry: str, repo_dir: str = "{params.repo_dir}", server: str = SERVER,
                 version: str | None = None, keep: int = 1, key_env: str = ADMIN_KEY_ENV,
                 key_secret: str | None = None, after: Sequence[str] = (), when: str | None = None,
                 timeout_s: float = 600.0, retry: Retry | None = None) -> Step:
    """Roll the entry artifact `entry` (``STEP.ARTIFACT``) in as the next version of `model`.

    `repo_dir` is the server's repository folder (on this machine or a shared volume); the `keep` newest versions
    stay (the new one included), older ones move to ``repo_dir/.tandem-retired/``. Output parameters: ``model``,
    ``version``, ``retired``.
    """
    if keep < 1:
        raise PipelineError(f"keep must be >= 1 (the new version counts), got {keep}", step=name, field="args.keep")
    args: dict[str, ParamValue] = {"server": server, "model": model, "entry": "{inputs.entry}",
                                   "repo_dir": repo_dir, "keep": keep, "key_env": _key_env(name, key_env),
                                   "timeout_s": timeout_s}
    if version is not None:
        args["version"] = version
    return _step(name=name, function="tandem.pipeline.deploy:roll_version", args=args,
                 secrets={key_env: key_secret} if key_secret else {}, inputs={"entry": entry},
                 outputs=Outputs(params=["model", "version", "retired"]), after=list(after), when=when,
                 cache=False, timeout_s=timeout_s + 30, retry=retry, resources=Resources(cpu=0.25))


def smoke(name: str, requests: Sequence[Mapping[str, Any]], *, server: str = SERVER, key_env: str = API_KEY_ENV,
          key_secret: str | None = None, inputs: Mapping[str, str] | None = None, after: Sequence[str] = (),
          when: str | None = None, timeout_s: float = 30.0) -> Step:
    """Requests that must succeed: each ``{"path", "method", "json" | "body_file" + "content_type", "status"
    (200), "contains", "equals": {"choices.0.text": "AbC"}, "repeat"}``; strings may hold placeholders."""
    if not requests:
        raise PipelineError("give at least one request", step=name, field="args.requests")
    for i, spec in enumerate(requests):
        if not isinstance(spec, Mapping) or not str(spec.get("path", "")).startswith("/"):
            raise PipelineError("each request needs a 'path' starting with '/'", step=name,
                                field=f"args.requests[{i}]")
    args: dict[str, ParamValue] = {"server": server, "requests": json.dumps([dict(r) for r in requests]),
                                   "key_env": _key_env(name, key_env), "timeout_s": timeout_s}
    return _step(name=name, function="tandem.pipeline.deploy:smoke_test", args=args,
                 secrets={key_env: key_secret} if key_secret else {}, inputs=dict(inputs or {}),
                 outputs=Outputs(params=["passed", "seconds"]), after=list(after), when=when, cache=False,
                 timeout_s=timeout_s * max(1, len(requests)) + 30, resources=Resources(cpu=0.25))
