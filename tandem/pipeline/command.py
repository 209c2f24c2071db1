"""`tandem pipeline run | list | status | logs | retry | export | schedule`.

The history lives in ``--home`` (``TANDEM_PIPELINE_HOME``, default ``./.tandem/pipelines``): ``history.sqlite``,
``runs/RUN/STEP.log`` and ``artifacts/KEY/``. Importing this module costs no torch: the CLI stays quick.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

__all__ = ["register"]

pipeline_app = typer.Typer(help="Pipelines: run a DAG of steps here, see its history, export it to Argo.",
                           no_args_is_help=True)

HomeOpt = Annotated[Path | None, typer.Option(help="History folder (default $TANDEM_PIPELINE_HOME or "
                                                   "./.tandem/pipelines)")]


def _home(home: Path | None) -> Path:
    from tandem.pipeline.runner import default_home

    return (home or default_home()).resolve()


def _params(pairs: list[str] | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--param {pair!r}: write NAME=VALUE")
        out[key] = value
    return out


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _load(file: Path):  # type: ignore[no-untyped-def]
    from tandem.pipeline.spec import PipelineError, load_pipeline

    try:
        return load_pipeline(file)
    except PipelineError as exc:
        raise _fail(f"{file}: {exc}") from None


def _report(result) -> int:  # type: ignore[no-untyped-def]
    failed = result.failed()
    for r in failed:
        typer.secho(f"step {r.name!r} failed ({r.failure}): {r.message}", fg=typer.colors.RED, err=True)
    counts: dict[str, int] = {}
    for r in result.steps.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    typer.echo(f"run {result.run_id} {result.status} in {result.seconds:.1f} s ({summary})")
    return 1 if failed else 0


def run(
    file: Annotated[Path, typer.Argument(help="Pipeline file (.yaml or .py defining `pipeline`)")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE (repeatable)")] = None,
    home: HomeOpt = None,
    run_id: Annotated[str | None, typer.Option(help="Run id (default NAME-UTCSTAMP-xxxx)")] = None,
    trigger: Annotated[str, typer.Option(help="What started the run (recorded)")] = "manual",
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON at the end")] = False,
) -> None:
    """Run FILE's DAG on this machine: independent steps in parallel, cached steps skipped, history kept."""
    from tandem.pipeline.runner import results_json, run_pipeline
    from tandem.pipeline.spec import PipelineError

    pipe = _load(file)
    given = _params(param)
    for name, value in given.items():   # a path typed on the command line is relative to where it was typed
        spec = pipe.params.get(name)
        if spec is not None and spec.type == "path" and not Path(str(value)).is_absolute():
            given[name] = str(Path.cwd() / str(value))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result = run_pipeline(pipe, given, _home(home), run_id=run_id, trigger=trigger,
                              file=str(file.resolve()), progress=lambda line: typer.echo(line))
    except PipelineError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; `tandem pipeline retry RUN` runs what did not finish", 130) from None
    if as_json:
        typer.echo(results_json(result))
    raise typer.Exit(_report(result))


def retry(
    run_id: Annotated[str, typer.Argument(help="The run (an id or a unique prefix)")],
    home: HomeOpt = None,
) -> None:
    """Run again what failed or was interrupted in RUN_ID; its succeeded steps are reused, not repeated."""
    from tandem.pipeline.runner import retry_run
    from tandem.pipeline.spec import PipelineError

    try:
        result = retry_run(run_id, _home(home), progress=lambda line: typer.echo(line))
    except PipelineError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(_report(result))


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def list_runs(
    pipeline: Annotated[str | None, typer.Option(help="Only runs of this pipeline")] = None,
    limit: Annotated[int, typer.Option(help="How many runs")] = 20,
    home: HomeOpt = None,
) -> None:
    """The latest runs, newest first."""
    from tandem.pipeline.store import Store

    store = Store(_home(home))
    store.mark_orphans()
    rows = store.runs(pipeline, limit)
    typer.echo(f"{'RUN':<40} {'STATUS':<12} {'STARTED':<20} {'SECONDS':>8}  TRIGGER")
    for r in rows:
        secs = f"{r.ended - r.started:.1f}" if r.ended else "-"
        typer.echo(f"{r.id:<40} {r.status:<12} {_when(r.started):<20} {secs:>8}  {r.trigger}")
    store.close()


def status(
    run_id: Annotated[str, typer.Argument(help="The run (an id or a unique prefix)")],
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """A run's steps: status, attempts, timings, failure, outputs."""
    from tandem.pipeline.store import Store

    store = Store(_home(home))
    store.mark_orphans()
    run_row = store.run(run_id)
    if run_row is None:
        raise _fail(f"no run {run_id!r} (or the prefix is not unique); see `tandem pipeline list`")
    steps = store.steps(run_row.id)
    if as_json:
        out = {"run": run_row.__dict__, "steps": [s.__dict__ for s in steps],
               "artifacts": [dict(a) for a in store.artifacts(run_row.id)]}
        typer.echo(json.dumps(out, indent=2, default=str))
        raise typer.Exit(0)
    typer.echo(f"run {run_row.id}: {run_row.status} (pipeline {run_row.pipeline}, trigger {run_row.trigger}, "
               f"params {json.dumps(run_row.params)})")
    typer.echo(f"  {'STEP':<20} {'STATUS':<12} {'ATTEMPTS':>8} {'SECONDS':>8}  NOTE")
    for s in steps:
        secs = f"{s.ended - s.started:.1f}" if s.started and s.ended else "-"
        note = (s.failure + ": " if s.failure else "") + (s.message.splitlines()[0] if s.message else "")
        typer.echo(f"  {s.name:<20} {s.status:<12} {s.attempts:>8} {secs:>8}  {note}")
    store.close()


def logs(
    run_id: Annotated[str, typer.Argument(help="The run (an id or a unique prefix)")],
    step: Annotated[str | None, typer.Argument(help="One step (default: all, in order)")] = None,
    home: HomeOpt = None,
) -> None:
    """Print the logs of a run's steps."""
    from tandem.pipeline.store import Store

    store = Store(_home(home))
    run_row = store.run(run_id)
    if run_row is None:
        raise _fail(f"no run {run_id!r}; see `tandem pipeline list`")
    rows = [s for s in store.steps(run_row.id) if step is None or s.name == step]
    if step is not None and not rows:
        raise _fail(f"run {run_row.id} has no step {step!r}")
    for s in rows:
        typer.echo(f"===== {s.name} ({s.status}) =====")
        if s.log and Path(s.log).exists():
            typer.echo(Path(s.log).read_text(errors="replace"), nl=False)
        else:
            typer.echo(f"(no log: {s.message or s.status})")
    store.close()


def export(
    file: Annotated[Path, typer.Argument(help="Pipeline file (.yaml or .py)")],
    to: Annotated[Literal["argo"], typer.Option(help="Target (argo)")] = "argo",
    kind: Annotated[Literal["workflow", "cron", "template"], typer.Option(help="Workflow, CronWorkflow or "
                                                                               "WorkflowTemplate")] = "workflow",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here (default stdout)")] = None,
    namespace: Annotated[str | None, typer.Option(help="metadata.namespace")] = None,
    artifact_repository: Annotated[str | None, typer.Option(help="artifactRepositoryRef (configmap[/key]); "
                                                                 "default: the cluster's default repository")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE default (repeatable)")] = None,
    submit: Annotated[bool, typer.Option(help="Also submit it to the Argo server (ARGO_SERVER, ARGO_TOKEN)")] = False,
) -> None:
    """Write FILE as an Argo Workflows manifest (validated against Hera's Argo models), or submit it."""
    from tandem.pipeline import argo
    from tandem.pipeline.lint import ManifestError, validate_manifest
    from tandem.pipeline.spec import PipelineError

    pipe = _load(file)
    try:
        manifest = argo.export(pipe, kind, namespace=namespace, params=_params(param),
                               artifact_repository=artifact_repository)
        validate_manifest(manifest)
    except (PipelineError, ManifestError) as exc:
        raise _fail(str(exc)) from None
    text = argo.to_yaml(manifest)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {manifest['kind']} {out}", err=True)
    if submit:
        try:
            name = _submit(manifest, namespace)
        except PipelineError as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"submitted {manifest['kind']} {name}", err=True)


def _submit(manifest: dict[str, Any], namespace: str | None) -> str:
    """Submit with the argo CLI's environment (ARGO_SERVER, ARGO_SECURE, ARGO_BASE_HREF, ARGO_TOKEN, ...)."""
    from tandem.pipeline import argo
    from tandem.pipeline.spec import PipelineError

    env = os.environ
    if not env.get("ARGO_SERVER"):
        raise PipelineError("--submit needs ARGO_SERVER (host:port as for the argo CLI, or https://host:port) "
                            "and usually ARGO_TOKEN")
    truthy = ("1", "true", "yes", "on")
    host = argo.server_url(env["ARGO_SERVER"], secure=env.get("ARGO_SECURE", "true").lower() in truthy,
                           base_href=env.get("ARGO_BASE_HREF", ""))
    verify = env.get("ARGO_INSECURE_SKIP_VERIFY", "false").lower() not in truthy
    return argo.submit(manifest, host, env.get("ARGO_TOKEN") or None,
                       namespace or env.get("ARGO_NAMESPACE", "argo"), verify_ssl=verify)


def schedule(
    files: Annotated[list[Path], typer.Argument(help="Pipeline files whose schedules and triggers to serve")],
    home: HomeOpt = None,
    http_port: Annotated[int | None, typer.Option(help="Serve the HTTP trigger on this port")] = None,
    host: Annotated[str, typer.Option(help="HTTP trigger address")] = "127.0.0.1",
    key_file: Annotated[Path | None, typer.Option(help="File holding the HTTP trigger's key "
                                                       "(default $TANDEM_PIPELINE_KEY)")] = None,
    poll_s: Annotated[float, typer.Option(help="Watched folders are checked this often")] = 2.0,
    catch_up_s: Annotated[float, typer.Option(help="After downtime, still start a fire missed by at most this "
                                                   "many seconds (older ones are logged, not replayed)")] = 0.0,
    concurrency: Annotated[Literal["forbid", "allow"], typer.Option(
        help="forbid: a fire while the pipeline's previous run goes on is skipped (Argo's Forbid)")] = "forbid",
) -> None:
    """Run the scheduler: cron schedules (with time zones), watched folders and the HTTP trigger."""
    from tandem.envs import TANDEM_PIPELINE_KEY, env_str
    from tandem.pipeline.scheduler import Scheduler
    from tandem.pipeline.spec import PipelineError

    key = key_file.read_text().strip() if key_file else env_str(TANDEM_PIPELINE_KEY)
    if http_port is not None and not key:
        raise _fail("the HTTP trigger needs a key: set TANDEM_PIPELINE_KEY or pass --key-file")
    try:
        sched = Scheduler(files, _home(home), poll_s=poll_s, catch_up_s=catch_up_s, concurrency=concurrency)
    except (PipelineError, RuntimeError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    with sched:
        if http_port is not None:
            try:
                port = sched.serve_http(host, http_port, key)
            except (ValueError, OSError) as exc:
                raise _fail(str(exc)) from None
            typer.echo(f"HTTP trigger on http://{host}:{port}/pipelines/NAME/runs", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        for entry in sched.describe():
            for sch in entry["schedules"]:
                typer.echo(f"  {entry['name']}: cron {sch['cron']!r} ({sch['timezone']}), next {sch['next_fire']}",
                           err=True)
            for w in entry["watch"]:
                typer.echo(f"  {entry['name']}: watching {w['folder']} for {w['pattern']}", err=True)
        typer.echo(f"scheduling {len(files)} pipeline file(s); Ctrl-C stops", err=True)
        sched.run_forever(stop)


pipeline_app.command("run")(run)
pipeline_app.command("retry")(retry)
pipeline_app.command("list")(list_runs)
pipeline_app.command("status")(status)
pipeline_app.command("logs")(logs)
pipeline_app.command("export")(export)
pipeline_app.command("schedule")(schedule)


def register(app: typer.Typer) -> None:
    """Add `tandem pipeline ...` to the main CLI."""
    app.add_typer(pipeline_app, name="pipeline")


if __name__ == "__main__":
    sys.exit(pipeline_app())
