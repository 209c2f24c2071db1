"""Command line: `tandem serve`, `tandem bench`. A thin typer layer over the Python API."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from tandem.bench.command import register as register_bench
from tandem.config import ServerConfig, is_loopback
from tandem.envs import (
    LORA_ADAPTERS,
    TANDEM_ADAPTER_DIRS,
    TANDEM_ADMIN_KEY,
    TANDEM_API_KEY,
    TANDEM_CPU_WORKERS,
    TANDEM_DRAIN_TIMEOUT_S,
    TANDEM_HOST,
    TANDEM_LOG_LEVEL,
    TANDEM_PORT,
)
from tandem.errors import ConfigError
from tandem.optimize.command import register as register_optimize
from tandem.pipeline.command import register as register_pipeline
from tandem.train.command import register as register_train
from tandem.train.resize import register as register_data

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tandem: serve and accelerate AI models on whatever compute this machine has.")
console = Console(stderr=True, soft_wrap=True)  # error lines carry paths: never wrap them


def parse_lora_adapters(spec: str | None) -> dict[str, str]:
    """'a=path/a,b=path/b' -> {'a': 'path/a', 'b': 'path/b'}; errors say what is wrong."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--lora-adapters: {part!r} is not name=path (fix: e.g. --lora-adapters sql=/ads/sql)")
        out[name.strip()] = path.strip()
    return out


def _folder(path: Path, option: str) -> Path:
    """An existing folder, absolute; a ConfigError naming the option otherwise."""
    if not path.is_dir():
        raise ConfigError(f"{option} {path}: not a folder (fix: create it, or pass an existing one)")
    return path.resolve()


def _secret(value: str | None) -> Any:
    """A key from the command line or environment, as the SecretStr ServerConfig keeps (never printed)."""
    from pydantic import SecretStr

    return SecretStr(value) if value else None


def cli_llm_entry(index: int, folder: Path, adapters: str | None, max_total_tokens: int) -> Any:
    """A model entry for `--llm PATH --lora-adapters ...` (same as a kind: llm tandem.yaml)."""
    from pydantic import ValidationError

    from tandem.config import LLMConfig, ModelConfig
    from tandem.llm.kind import llm_entry

    folder = folder.resolve()
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in folder.name).lstrip("-_.") or "llm"
    try:
        config = ModelConfig(name=name, kind="llm", path=folder, llm=LLMConfig(
            path=".", adapters={k: str(Path(v).resolve()) for k, v in parse_lora_adapters(adapters).items()},
            max_total_tokens=max_total_tokens))
    except ValidationError as e:
        raise ConfigError(f"--llm {folder}: {e}") from None
    return llm_entry(index, config)


@app.command()
def serve(
    repo: Annotated[Path | None, typer.Argument(help="Model repository (default: the built-in one)")] = None,
    host: Annotated[str, typer.Option(envvar=TANDEM_HOST, help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar=TANDEM_PORT, help="HTTP port (0 = any free port)")] = 8000,
    cpu_workers: Annotated[int | None, typer.Option(
        envvar=TANDEM_CPU_WORKERS, help="Front (HTTP + pre/post-processing) processes")] = None,
    default_model: Annotated[str | None, typer.Option(help="Model behind /invocations")] = None,
    drain_timeout: Annotated[float, typer.Option(
        envvar=TANDEM_DRAIN_TIMEOUT_S, help="Seconds SIGTERM waits for in-flight requests")] = 30.0,
    log_level: Annotated[str, typer.Option(envvar=TANDEM_LOG_LEVEL)] = "info",
    front_nice: Annotated[int, typer.Option(
        help="Niceness added to front processes (favours accelerator workers sharing their CPU cores)")] = 0,
    llm: Annotated[Path | None, typer.Option(
        help="Serve this Hugging Face Llama/Mistral/Qwen2 folder (TGI + OpenAI APIs); alone or with REPO")] = None,
    lora_adapters: Annotated[str | None, typer.Option(
        envvar=LORA_ADAPTERS, help="Adapters of --llm loaded at start: name=path,name=path (PEFT folders)")] = None,
    max_total_tokens: Annotated[int, typer.Option(help="--llm: prompt + generated tokens per request")] = 512,
    api_key: Annotated[str | None, typer.Option(
        envvar=TANDEM_API_KEY, show_envvar=True, show_default=False,
        help="Key every route but health needs (Authorization: Bearer KEY or x-api-key: KEY)")] = None,
    admin_key: Annotated[str | None, typer.Option(
        envvar=TANDEM_ADMIN_KEY, show_envvar=True, show_default=False,
        help="Key the mutating routes (adapter load/unload) need; default: the --api-key")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Allow a non-loopback --host without --api-key (anyone reaching it can use every model)")] = False,
    adapter_dir: Annotated[list[Path] | None, typer.Option(
        "--adapter-dir", help="A folder every LLM's runtime adapter loads (POST /v1/load_lora_adapter) may also "
                              "read, beside its llm.adapter_dirs (repeatable)")] = None,
    model_control: Annotated[Literal["none", "explicit", "poll"], typer.Option(
        help="none: serve what is there at start; explicit: /v2/repository load/unload; poll: also reload "
             "models whose folder changed")] = "explicit",
) -> None:
    """Serve a model repository (KServe v2, TorchServe, SageMaker) and/or an LLM (TGI, OpenAI) over HTTP."""
    from tandem.kinds import builtin_kinds
    from tandem.serving.repository import default_repository, scan_repository
    from tandem.serving.supervisor import StartupInterrupted, Supervisor

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s supervisor %(message)s")
    try:
        server = ServerConfig(host=host, port=port, cpu_workers=cpu_workers, default_model=default_model,
                              drain_timeout_s=drain_timeout, log_level=log_level,
                              front_nice=front_nice, api_key=_secret(api_key), admin_key=_secret(admin_key),
                              insecure=insecure, model_control=model_control)
        for name in (TANDEM_API_KEY, TANDEM_ADMIN_KEY):  # keys travel in ServerConfig; model code never sees them
            os.environ.pop(name, None)
        if adapter_dir:  # read by the LLM kind's clients in the front processes this starts
            os.environ[TANDEM_ADAPTER_DIRS] = os.pathsep.join(str(_folder(d, "--adapter-dir")) for d in adapter_dir)
        kinds = builtin_kinds()
        folder = repo or default_repository() if repo or not llm else None
        entries = scan_repository(folder, kinds, allow_empty=model_control != "none") \
            if folder is not None else []
        if llm is not None:
            entries.append(cli_llm_entry(len(entries), llm, lora_adapters, max_total_tokens))
        sup = Supervisor(entries, server, kinds, repo=folder)
        console.print(f"starting {len(entries)} model(s) with {sup.n_fronts} front process(es)...")
        sup.start()
    except StartupInterrupted:
        console.print("interrupted during start-up; every process stopped, shared memory released")
        raise typer.Exit(130) from None
    except (ConfigError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    for entry in entries:
        how = kinds[entry.config.kind].describe(entry)
        console.print(f"  {entry.key}: {entry.config.instances} replica(s) on {', '.join(sup.devices(entry.key))}, "
                      f"{how}")
    if server.api_key or server.admin_key:
        admin = "the admin key" if server.admin_key else "the API key"
        console.print(f"  auth: {'API key on every route but health, ' if server.api_key else ''}"
                      f"{admin} on adapter and repository load/unload")
    elif is_loopback(server.host):
        console.print("  auth: off (loopback only; pass --api-key to require a key)")
    else:
        console.print("[yellow]  auth: off on a non-loopback address (--insecure)[/yellow]")
    console.print(f"  console: http://{host}:{sup.port}/")
    # Tests and scripts wait for this exact line on stdout.
    print(f"tandem ready on http://{host}:{sup.port}", flush=True)
    sup.run_forever()
    console.print("stopped; shared memory released")


register_bench(app)
register_optimize(app)
register_data(app)
register_train(app)
register_pipeline(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
