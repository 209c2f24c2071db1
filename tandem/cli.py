"""Command line: `tandem serve`, `tandem bench`. A thin typer layer over the Python API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tandem.bench.command import register as register_bench
from tandem.config import ServerConfig
from tandem.envs import TANDEM_CPU_WORKERS, TANDEM_DRAIN_TIMEOUT_S, TANDEM_HOST, TANDEM_LOG_LEVEL, TANDEM_PORT
from tandem.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tandem: serve and accelerate AI models on whatever compute this machine has.")
console = Console(stderr=True)


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
) -> None:
    """Serve every model of a model repository over HTTP (KServe v2, TorchServe, SageMaker)."""
    from tandem.serving.repository import default_repository, scan_repository
    from tandem.serving.supervisor import StartupInterrupted, Supervisor

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s supervisor %(message)s")
    try:
        server = ServerConfig(host=host, port=port, cpu_workers=cpu_workers, default_model=default_model,
                              drain_timeout_s=drain_timeout, log_level=log_level,
                              front_nice=front_nice)
        entries = scan_repository(repo or default_repository())
        sup = Supervisor(entries, server)
        console.print(f"starting {len(entries)} model(s) with {sup.n_fronts} front process(es)...")
        sup.start()
    except StartupInterrupted:
        console.print("interrupted during start-up; every process stopped, shared memory released")
        raise typer.Exit(130) from None
    except (ConfigError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    for entry in entries:
        b = entry.batching
        console.print(f"  {entry.key}: {entry.config.instances} replica(s) on {', '.join(sup.devices(entry.key))}, "
                      f"batch <= {b.max_batch_size}, delay {b.max_batch_delay_ms} ms")
    # Tests and scripts wait for this exact line on stdout.
    print(f"tandem ready on http://{host}:{sup.port}", flush=True)
    sup.run_forever()
    console.print("stopped; shared memory released")


register_bench(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
