"""Deploy steps against a running `tandem serve`: hot-load a LoRA adapter, roll a model version, smoke-test.

Each function runs as a pipeline function step (`tandem.pipeline.templates` builds the steps) and talks to the
server over HTTP with `urllib` only, so a step's process stays light:

    load_adapter   publish an adapter folder where the server may read it, POST /v1/load_lora_adapter, then
                   wait until requests for it are answered
    roll_version   copy a model-repository entry into the server's repository as a new version folder, move the
                   versions beyond `keep` aside, POST /v2/repository/models/{m}/load (a roll-over without
                   downtime), then wait until the new version is ready; a failed load puts the folder back
    smoke_test     send requests that must succeed (status, and optionally text or a JSON field)

Keys never travel in a manifest: a step names the environment variable that holds the key (`key_env`, by default
TANDEM_ADMIN_KEY for the mutating routes, TANDEM_API_KEY for smoke tests) and reads it when it runs. Every request
has a timeout. A failure is a `DeployError` naming the step (TANDEM_PIPELINE_STEP, set by the runner) and the
argument to fix, e.g. ``step 'deploy', field 'args.key_env': the server ... refused the key (401) ...``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tandem.pipeline.spec import PipelineError

__all__ = ["ADMIN_KEY_ENV", "API_KEY_ENV", "DeployError", "Reply", "load_adapter", "request", "roll_version",
           "smoke_test"]

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "TANDEM_ADMIN_KEY"
API_KEY_ENV = "TANDEM_API_KEY"
_POLL_S = 0.2
_STAGING = ".tandem-staging"   # dot folders at the repository's top level are never read as models
_RETIRED = ".tandem-retired"


class DeployError(PipelineError):
    """A deploy or smoke-test step failed; the message names the step, the argument and the fix."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, step=os.environ.get("TANDEM_PIPELINE_STEP"), field=field)


@dataclass
class Reply:
    """An HTTP answer: status, body and headers (error statuses included: they are answers too)."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        """The body parsed as JSON (None when it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error(self) -> str:
        """The server's error message (Tandem's, OpenAI's or TGI's shape), else the start of the body."""
        data = self.json()
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                err = err.get("message")
            if isinstance(err, str):
                return err
        return self.body[:300].decode("utf-8", "replace")


def request(server: str, method: str, path: str, *, json_body: Any = None, body: bytes | None = None,
            content_type: str | None = None, key: str | None = None, timeout_s: float = 30.0) -> Reply:
    """One HTTP request to `server` + `path`; a refused connection or a timeout is a `DeployError`."""
    headers = {"Accept": "application/json"}
    if json_body is not None:
        body, content_type = json.dumps(json_body).encode(), "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = server.rstrip("/") + path
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - the URL is the step's server
            return Reply(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), dict(exc.headers))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeployError(f"cannot reach the server at {server} ({method} {path}: {reason}); is `tandem serve` "
                          "running there? (fix: pass the right URL, e.g. --param server=http://HOST:PORT)",
                          field="args.server") from None


def _key(key_env: str) -> str | None:
    return os.environ.get(key_env) or None


def _refused(reply: Reply, server: str, key_env: str, what: str, admin: bool = True) -> DeployError:
    """The error for a 401/403: which variable holds the key, and whether it was set."""
    flag = "--admin-key (or --api-key when it has no admin key)" if admin else "--api-key"
    state = "is not set" if _key(key_env) is None else "is set, but the server did not accept its value"
    if reply.status == 403:
        why = f"the key in {key_env} is the API key, not the admin key this route needs"
    else:
        why = f"the environment variable {key_env} {state}"
    return DeployError(f"the server at {server} refused the key for {what} ({reply.status}: {reply.error()}); "
                       f"{why} (fix: set {key_env} to the server's {flag} in the step's environment, or "
                       "name another variable with key_env)", field="args.key_env")


def _check(reply: Reply, server: str, key_env: str, what: str, field: str) -> Reply:
    if reply.status in (401, 403):
        raise _refused(reply, server, key_env, what)
    if not 200 <= reply.status < 300:
        raise DeployError(f"{what} failed: the server at {server} answered {reply.status}: {reply.error()}",
                          field=field)
    return reply


def _wait(ready: Callable[[], bool], timeout_s: float, what: str, field: str) -> None:
    """Poll `ready` until it holds; three answers in a row, since each may come from another front process."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 3:
        streak = streak + 1 if ready() else 0
        if streak < 3:
            if time.monotonic() > deadline:
                raise DeployError(f"{what} was not live after {timeout_s:g} s", field=field)
            time.sleep(_POLL_S if streak == 0 else 0)


# -- LoRA adapters --------------------------------------------------------------------------------------------------
def _publish(adapter: Path, publish_dir: Path, name: str) -> Path:
    """Copy `adapter` to publish_dir/name/<content hash>/ (immutable: a folder being served is never rewritten)."""
    from tandem.pipeline._hashing import content_hash

    if not (adapter / "adapter_config.json").is_file():
        raise DeployError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)", field="args.adapter")
    dest = publish_dir / name / content_hash(adapter)[:16]
    if not dest.is_dir():
        staging = publish_dir / name / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(adapter, staging)
        os.replace(staging, dest)
    return dest


def _prune(publish_dir: Path, name: str, keep: Path, previous: int = 1) -> None:
    """Drop published copies of `name` but `keep` and the `previous` newest others (a rollback target)."""
    others = sorted((p for p in (publish_dir / name).iterdir() if p.is_dir() and p != keep
                     and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[previous:]:
        shutil.rmtree(old, ignore_errors=True)


def _live_file(publish_dir: str, name: str) -> Path:
    return Path(publish_dir).resolve() / name / ".live.json"


def _live_record(publish_dir: str, name: str) -> dict[str, str]:
    """server|model -> the lora_path this step last loaded there (empty when unknown or unreadable)."""
    try:
        data = json.loads(_live_file(publish_dir, name).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _remember(publish_dir: str, name: str, where: str, lora_path: str) -> None:
    """Record what is live (written whole, then renamed: a concurrent reader never sees half a file)."""
    record = {**_live_record(publish_dir, name), where: lora_path}
    path = _live_file(publish_dir, name)
    tmp = path.with_name(f".live-{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _listed(server: str, name: str, model: str, key: str | None, timeout_s: float) -> bool:
    """Whether GET /v1/models lists the adapter (``model/name`` for an LLM other than the default)."""
    reply = request(server, "GET", "/v1/models", key=key, timeout_s=timeout_s)
    ids = {str(card.get("id")) for card in (reply.json() or {}).get("data", [])} if reply.status == 200 else set()
    return name in ids or (bool(model) and f"{model}/{name}" in ids)


def load_adapter(server: str, adapter: Path, name: str, publish_dir: str = "", server_dir: str = "",
                 model: str = "", key_env: str = ADMIN_KEY_ENV, timeout_s: float = 120.0) -> dict[str, str]:
    """Hot-load the PEFT adapter folder `adapter` into the server as `name` and wait until it answers.

    `publish_dir`: a folder inside the server's `llm.adapter_dirs` to copy the adapter into first (else the
    server must be able to read `adapter` itself); `server_dir`: that folder as the server sees it, when its
    mount differs. `model`: the LLM to load it into (default: the server's first LLM).

    Idempotent with `publish_dir`: when this step last loaded the same content (the published folder is named
    by its hash) into this server and the server still lists the adapter, nothing is reloaded (output
    ``reloaded``: ``false``). The server does not report an adapter's path, so a restarted server that lists
    the name from its own start-up configuration is taken at its word.
    """
    path = Path(adapter).resolve()
    if server_dir and not publish_dir:
        raise DeployError("server_dir names publish_dir as the server sees it: give publish_dir too",
                          field="args.server_dir")
    published = _publish(path, Path(publish_dir).resolve(), name) if publish_dir else path
    lora_path = str(Path(server_dir) / published.relative_to(Path(publish_dir).resolve())) if server_dir \
        else str(published)
    key = _key(key_env)
    where = f"{server.rstrip('/')}|{model}"
    if publish_dir and _live_record(publish_dir, name).get(where) == lora_path \
            and _listed(server, name, model, key, timeout_s):
        # Still prove the admin key: a deploy with a key the server refuses fails, reload or not. An empty body
        # is answered 400 after the key check, so nothing changes on the server.
        probe = request(server, "POST", "/v1/load_lora_adapter", json_body={}, key=key, timeout_s=timeout_s)
        if probe.status in (401, 403):
            raise _refused(probe, server, key_env, f"loading adapter {name!r}")
        logger.info("adapter %s is already live from %s: not reloaded", name, lora_path)
        return {"adapter": name, "lora_path": lora_path, "load_ms": "0", "reloaded": "false"}
    body: dict[str, str] = {"lora_name": name, "lora_path": lora_path, **({"model": model} if model else {})}
    t0 = time.monotonic()
    reply = request(server, "POST", "/v1/load_lora_adapter", json_body=body, key=key, timeout_s=timeout_s)
    if reply.status == 400 and "outside the allowed adapter directories" in reply.error():
        fix = ("publish_dir must be one of the entry's llm.adapter_dirs, as the server sees it; see server_dir"
               if publish_dir else "give publish_dir, a folder among the entry's llm.adapter_dirs, or start the "
               f"server with `tandem serve --adapter-dir DIR` for a DIR that holds {lora_path} (`make serve` "
               "allows the local pipelines' artifact store)")
        raise DeployError(f"the server cannot read {lora_path}: {reply.error()} (fix: {fix})",
                          field="args.publish_dir")
    _check(reply, server, key_env, f"loading adapter {name!r}", "args.adapter")
    data = reply.json() or {}
    if data.get("status") != "loaded":
        raise DeployError(f"the server answered the load of {name!r} with {reply.body[:200]!r}, not status "
                          "'loaded'", field="args.adapter")

    def answers() -> bool:
        probe = {"model": name, "prompt": "a", "max_tokens": 1, "temperature": 0}
        return request(server, "POST", "/v1/completions", json_body=probe, key=key,
                       timeout_s=timeout_s).status == 200

    _wait(answers, timeout_s, f"adapter {name!r}", "args.name")
    if publish_dir:
        _remember(publish_dir, name, where, lora_path)
        _prune(Path(publish_dir).resolve(), name, published)
    logger.info("adapter %s loaded from %s in %.0f ms", name, lora_path, (time.monotonic() - t0) * 1000)
    return {"adapter": name, "lora_path": lora_path, "load_ms": str(data.get("load_ms")), "reloaded": "true"}


# -- model versions -------------------------------------------------------------------------------------------------
def _versions_on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / "tandem.yaml").exists() or (p / "model.py").exists())) if folder.is_dir() else []


def _next_version(existing: list[str]) -> str:
    numbers = [int(v) for v in existing if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def _served(server: str, model: str, key: str | None, key_env: str, timeout_s: float) -> dict[str, str]:
    """version -> state of `model` in the server's repository index."""
    reply = _check(request(server, "POST", "/v2/repository/index", key=key, timeout_s=timeout_s), server,
                   key_env, "reading the repository index", "args.server")
    return {m["version"]: m["state"] for m in reply.json() or [] if m.get("name") == model}


def _stage(entry: Path, repo_dir: Path, model: str, version: str) -> Path:
    """A copy of `entry` whose tandem.yaml names `model` and `version`, outside the repository's model folders."""
    import yaml

    if not (entry / "tandem.yaml").is_file():
        raise DeployError(f"{entry} is not a model-repository entry (no tandem.yaml)", field="args.entry")
    staging = repo_dir / _STAGING / f"{model}-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(entry, staging, ignore=shutil.ignore_patterns("__pycache__", ".tandem-optimized"))
    settings = yaml.safe_load((staging / "tandem.yaml").read_text()) or {}
    settings.update(name=model, version=version)
    (staging / "tandem.yaml").write_text(f"# Rolled in by tandem.pipeline from {entry}\n"
                                         + yaml.safe_dump(settings, sort_keys=False))
    return staging


def _retire(folder: Path, repo_dir: Path, versions: list[str]) -> list[tuple[Path, Path]]:
    """Move version folders aside (kept for a rollback); returns (where it went, where it was)."""
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for v in versions:
        dest = repo_dir / _RETIRED / folder.name / f"{v}-{stamp}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / v, dest)
        moved.append((dest, folder / v))
    return moved


def roll_version(server: str, model: str, entry: Path, repo_dir: Path, version: str = "", keep: int = 1,
                 key_env: str = ADMIN_KEY_ENV, timeout_s: float = 300.0) -> dict[str, str]:
    """Serve `entry` as a new version of `model` through the repository API, without a failed request.

    The entry is copied to repo_dir/model/VERSION (VERSION: the next integer unless given); the `keep` - 1 newest
    older versions stay and the rest move to repo_dir/.tandem-retired/; then the server loads the model (new
    replicas start beside the old, the fronts switch, the old drain) and the step waits until VERSION is ready.
    """
    if keep < 1:
        raise DeployError(f"keep must be >= 1 (the new version counts), got {keep}", field="args.keep")
    repo_dir, entry = Path(repo_dir).resolve(), Path(entry).resolve()
    if not repo_dir.is_dir():
        raise DeployError(f"{repo_dir} is not a folder: give the repository folder the server was started with "
                          "(it must be on this machine or a shared volume)", field="args.repo_dir")
    key = _key(key_env)
    folder = repo_dir / model
    on_disk = _versions_on_disk(folder)
    version = version or _next_version(on_disk + list(_served(server, model, key, key_env, timeout_s)))
    if version in on_disk:
        raise DeployError(f"version {version!r} of {model!r} already exists in {folder}", field="args.version")
    staging = _stage(entry, repo_dir, model, version)
    folder.mkdir(exist_ok=True)
    os.replace(staging, folder / version)
    older = sorted((v for v in on_disk if v != version), key=lambda v: (not v.isdigit(), int(v) if v.isdigit()
                                                                         else 0, v))
    moved = _retire(folder, repo_dir, older[:max(0, len(older) - (keep - 1))])
    try:
        reply = request(server, "POST", f"/v2/repository/models/{quote(model)}/load", key=key, timeout_s=timeout_s)
        _check(reply, server, key_env, f"loading version {version} of {model!r}", "args.entry")
    except DeployError:
        _undo(folder / version, moved, repo_dir)
        raise
    ready_path = f"/v2/models/{quote(model)}/versions/{quote(version)}/ready"
    _wait(lambda: request(server, "GET", ready_path, key=key, timeout_s=timeout_s).status == 200, timeout_s,
          f"version {version} of {model!r}", "args.entry")
    logger.info("rolled %s to version %s (retired %s)", model, version, [str(m[0]) for m in moved])
    return {"model": model, "version": version, "retired": ",".join(p.name for p, _ in moved)}


def _undo(new: Path, moved: list[tuple[Path, Path]], repo_dir: Path) -> None:
    """After a failed load: the repository folder again holds what the server still serves."""
    failed = repo_dir / _RETIRED / new.parent.name / f"{new.name}-failed-{time.strftime('%Y%m%dT%H%M%S')}"
    failed.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, failed)
    for dest, origin in moved:
        os.replace(dest, origin)


# -- smoke tests ----------------------------------------------------------------------------------------------------
def _dig(data: Any, dotted: str) -> Any:
    """data["a"][0]["b"] for "a.0.b"."""
    for part in dotted.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _one(server: str, spec: dict[str, Any], key: str | None, timeout_s: float) -> tuple[Reply, str | None]:
    """Send one smoke request: its answer, and None when it passed, else what was wrong."""
    body = Path(spec["body_file"]).read_bytes() if "body_file" in spec else None
    reply = request(server, spec.get("method", "POST" if "json" in spec or body else "GET"), spec["path"],
                    json_body=spec.get("json"), body=body, content_type=spec.get("content_type"), key=key,
                    timeout_s=float(spec.get("timeout_s", timeout_s)))
    want = int(spec.get("status", 200))
    if reply.status != want:
        return reply, f"status {reply.status} (want {want}): {reply.error()}"
    text = reply.body.decode("utf-8", "replace")
    for needle in [spec["contains"]] if isinstance(spec.get("contains"), str) else spec.get("contains", []):
        if needle not in text:
            return reply, f"the answer does not contain {needle!r}: {text[:200]}"
    for dotted, value in (spec.get("equals") or {}).items():
        try:
            got = _dig(reply.json(), dotted)
        except (KeyError, IndexError, TypeError, ValueError):
            return reply, f"the answer has no field {dotted!r}: {text[:200]}"
        if got != value:
            return reply, f"{dotted} is {got!r}, want {value!r}"
    return reply, None


def smoke_test(server: str, requests: list[dict[str, Any]], key_env: str = API_KEY_ENV,
               timeout_s: float = 30.0) -> dict[str, str]:
    """Send every request (``{"path", "method", "json" | "body_file" + "content_type", "status", "contains",
    "equals": {"a.0.b": value}, "repeat"}``); all must pass, else a `DeployError` lists each failure."""
    if not requests:
        raise DeployError("no requests to send", field="args.requests")
    key, failures, sent, t0 = _key(key_env), [], 0, time.monotonic()
    for i, spec in enumerate(requests):
        if not isinstance(spec, dict) or "path" not in spec:
            raise DeployError(f"request {i} must be an object with at least a 'path'", field=f"args.requests[{i}]")
        for _ in range(int(spec.get("repeat", 1))):
            sent += 1
            reply, why = _one(server, spec, key, timeout_s)
            if why is not None and reply.status in (401, 403) and int(spec.get("status", 200)) != reply.status:
                raise _refused(reply, server, key_env, f"smoke request {i} ({spec['path']})", admin=False)
            if why is not None:
                failures.append(f"requests[{i}] {spec['path']}: {why}")
                break
    if failures:
        raise DeployError(f"{len(failures)} of {len(requests)} smoke requests failed:\n  " + "\n  ".join(failures),
                          field="args.requests")
    return {"passed": str(sent), "seconds": f"{time.monotonic() - t0:.3f}"}
