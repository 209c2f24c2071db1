"""Export a `Pipeline` to Argo Workflows (a Workflow, CronWorkflow or WorkflowTemplate) through Hera, or submit it.

    manifest = export(pipe, "cron", namespace="ml")   # a plain dict, as Argo's API takes it
    validate_manifest(manifest)                        # tandem.pipeline.lint: structure and semantics, offline
    print(to_yaml(manifest))

The cluster run has the local run's nodes and edges: one DAG task per step, with the step's name, and one container
template per step (image: the step's, else the pipeline's). Edges are `Pipeline.edges()`, written as ``depends``
(``a.Succeeded && b.Succeeded``) rather than ``dependencies``: with ``dependencies`` Argo runs a task whose upstream
was skipped by its ``when``, whereas the local runner (and ``depends``) omits it.

Placeholders become container paths and Argo expressions:

    {params.X}     {{workflow.parameters.X}}  (pipeline parameters are the workflow's arguments; one without a
                   default stays required at submit time)
    {inputs.X}     /tmp/tandem/inputs/X, an input artifact fed from {{tasks.S.outputs.artifacts.A}}
    {outputs.X}    /tmp/tandem/outputs/X, an output artifact
    {results.X}    /tmp/tandem/results/X, an output parameter read from that file (valueFrom.path)
    {steps.S.P}    {{inputs.parameters.S-P}}, a template input fed by {{tasks.S.outputs.parameters.P}}

``/tmp/tandem/outputs`` and ``/tmp/tandem/results`` are emptyDir mounts, so a step can write there whatever its
image (the local runner creates those folders too). Artifacts travel through the cluster's default artifact
repository (S3-compatible: S3, MinIO, GCS interop) unless ``artifact_repository="configmap[/key]"`` names one
(``spec.artifactRepositoryRef``). The image must hold the step's code: the local runner's ``workdir`` and
PYTHONPATH do not exist in a pod.

Retries. Argo's default policy (OnFailure) does not retry an Error (a pod deleted by pre-emption or node loss) and
treats a SIGKILL/SIGTERM exit like any exit, so pre-emption looked like a code failure and ``on: [infra]`` missed
it. The export uses ``retryPolicy: Always`` with an ``expression`` that sorts failures as the local runner does:

    timeout  the message names the deadline (activeDeadlineSeconds ran out: Kubernetes reports "Pod was active
             on the node longer than the specified deadline" and kills the container, so this is tested first)
    infra    not a timeout, and the node is an Error (pod deleted, node lost), or it Failed with exit code 137 or
             143 (SIGKILL: out of memory; SIGTERM: drained or pre-empted), or its message tells of pre-emption,
             eviction or a node shutdown (a process that handles SIGTERM may exit 1 when its node goes away)
    code     not a timeout and not infra: Failed with any other exit code

The expression is the OR of the step's ``retry.on`` classes. Back-off: ``duration`` = backoff_s, ``factor``,
``cap`` = max_backoff_s (the per-retry ceiling, the local meaning; ``maxDuration`` bounds the total and is not set).
Argo reads the factor as an integer, so a fractional ``retry.factor`` is an export error rather than a rounding.

Caching: off on Argo (``step.cache`` applies to local runs only). Argo memoization keeps its entries in a
ConfigMap, capped at 1 MiB for all entries together, and its key is rendered before the pod runs, so it can hold
parameters but not the content hashes of input artifacts the local cache key is built from; a memoized step
could be reused after its input data changed. Leaving it off is slower, never wrong.

Schedules: a CronWorkflow takes ``schedules: [...]`` (Argo v4; ``schedule`` is gone) with one ``timezone``; a
pipeline whose schedules use several zones must be split into one pipeline per zone. ``concurrencyPolicy: Forbid``
matches `tandem pipeline schedule`'s default.

`submit` goes through Hera's `WorkflowsService` to the Argo server's REST API. It reads the argo CLI's own
settings, so a shell set up for ``argo submit`` works unchanged: ``ARGO_SERVER`` as ``host:port`` (or a full
URL), ``ARGO_SECURE`` (default true: https), ``ARGO_BASE_HREF`` (a server behind a proxy sub-path),
``ARGO_INSECURE_SKIP_VERIFY``, ``ARGO_TOKEN`` (``argo auth token`` prints it with its ``Bearer`` prefix; a bare
token gets one) and ``ARGO_NAMESPACE``. Refusals (401/403, an existing name, a manifest the server rejects, an
unreachable host) become a `PipelineError` saying what to fix. Tests drive it over HTTP against a stand-in that
speaks the server's create endpoints; no real cluster is reachable from CI.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from hera.workflows import (
    DAG,
    Artifact,
    Container,
    CronWorkflow,
    EmptyDirVolume,
    Env,
    Parameter,
    Resources,
    RetryStrategy,
    SecretEnv,
    Task,
    Workflow,
    WorkflowTemplate,
)
from hera.workflows.models import ArtifactRepositoryRef, Backoff, Toleration, ValueFrom

from tandem.pipeline.spec import Pipeline, PipelineError, Step, parse_condition, placeholders

logger = logging.getLogger(__name__)

__all__ = ["INFRA", "ROOT", "dag_edges", "depends_names", "export", "retry_expression", "server_url", "submit",
           "to_yaml"]

Kind = Literal["workflow", "cron", "template"]
ROOT = "/tmp/tandem"   # noqa: S108  (a path inside the step's container, not on this machine)
_DEADLINE = 'lastRetry.message contains "deadline"'
_KILLED = "asInt(lastRetry.exitCode) in [137, 143]"
_GONE = "lastRetry.message matches '(?i)imminent node shutdown|preempt|evict'"
INFRA = f'lastRetry.status == "Error" || (lastRetry.status == "Failed" && ({_KILLED} || {_GONE}))'
_CLASSES = {
    "timeout": f"({_DEADLINE})",
    "infra": f"(!({_DEADLINE}) && ({INFRA}))",
    "code": f'(!({_DEADLINE}) && lastRetry.status == "Failed" && !({INFRA}))',
}
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")
_DEPENDS_NAME = re.compile(r"([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)(?:\.[A-Za-z]+)?")


def export(pipe: Pipeline, kind: Kind = "workflow", *, namespace: str | None = None,
           params: dict[str, object] | None = None, artifact_repository: str | None = None) -> dict[str, Any]:
    """`pipe` as an Argo manifest (a plain dict): a Workflow, CronWorkflow or WorkflowTemplate.

    `params` override the parameters' defaults (coerced to their types); `artifact_repository` is
    ``configmap`` or ``configmap/key`` (default: the cluster's default artifact repository).
    """
    if kind not in ("workflow", "cron", "template"):
        raise PipelineError(f"kind {kind!r}: use workflow, cron or template", field="kind")
    pipe.validate_dag()
    dag_name = _dag_name(pipe)
    templates: list[Any] = [DAG(name=dag_name, tasks=[_task(pipe, s) for s in _ordered(pipe)])]
    templates += [_container(pipe, s) for s in _ordered(pipe)]
    common: dict[str, Any] = {
        "namespace": namespace, "entrypoint": dag_name, "templates": templates,
        "arguments": _arguments(pipe, params or {}),
        "artifact_repository_ref": _repository_ref(artifact_repository),
        "labels": {"tandem/pipeline": pipe.name},
    }
    if pipe.description:
        common["annotations"] = {"tandem/description": pipe.description}
    wf: Workflow
    if kind == "workflow":
        wf = Workflow(generate_name=f"{pipe.name}-", **common)
    elif kind == "template":
        wf = WorkflowTemplate(name=pipe.name, **common)
    else:
        schedules, tz = _schedules(pipe)
        wf = CronWorkflow(name=pipe.name, schedules=schedules, timezone=tz, concurrency_policy="Forbid", **common)
    manifest: dict[str, Any] = wf.to_dict()
    logger.debug("exported %s %s: %d steps", manifest["kind"], pipe.name, len(pipe.steps))
    return manifest


def _ordered(pipe: Pipeline) -> list[Step]:
    return [pipe.step(n) for n in pipe.order()]


def _dag_name(pipe: Pipeline) -> str:
    """The DAG template's name: "main" unless a step (whose template shares its name) took it."""
    names, name = {s.name for s in pipe.steps}, "main"
    while name in names:
        name += "-dag"
    return name


def _arguments(pipe: Pipeline, given: dict[str, object]) -> list[Parameter]:
    unknown = sorted(set(given) - set(pipe.params))
    if unknown:
        raise PipelineError(f"unknown parameter(s) {unknown}; this pipeline takes {sorted(pipe.params)}",
                            field="params")
    out = []
    for name, spec in pipe.params.items():
        value = given.get(name, spec.default)
        desc = spec.description or None
        if value is None:   # no default: Argo asks for it at submit time (argo submit -p NAME=VALUE)
            out.append(Parameter(name=name, description=desc))
        else:
            out.append(Parameter(name=name, value=str(spec.coerce(name, value)), description=desc))
    return out


def _repository_ref(ref: str | None) -> ArtifactRepositoryRef | None:
    if not ref:
        return None
    config_map, _, key = ref.partition("/")
    if not config_map:
        raise PipelineError(f"artifact repository {ref!r}: write CONFIGMAP or CONFIGMAP/KEY",
                            field="artifact_repository")
    return ArtifactRepositoryRef(config_map=config_map, key=key or None)


def _schedules(pipe: Pipeline) -> tuple[list[str], str]:
    if not pipe.schedules:
        raise PipelineError("a CronWorkflow needs at least one schedule; add 'schedules: [{cron: ...}]' or export "
                            "as a workflow or template", field="schedules")
    zones = sorted({s.timezone for s in pipe.schedules})
    if len(zones) > 1:
        raise PipelineError(f"the schedules use several time zones ({', '.join(zones)}) but a CronWorkflow has one "
                            "'timezone': split the pipeline into one file per zone", field="schedules")
    return [s.cron for s in pipe.schedules], zones[0]


def _param_input(name: str) -> str:
    """The template input parameter that carries ``{steps.S.P}`` (written S.P)."""
    return name.replace(".", "-")


def _render(step: Step, text: str) -> str:
    """`text` with its placeholders as container paths and Argo template expressions."""
    out = text
    for kind, name in placeholders(text):
        if kind == "params":
            value = f"{{{{workflow.parameters.{name}}}}}"
        elif kind == "steps":
            value = f"{{{{inputs.parameters.{_param_input(name)}}}}}"
        else:
            value = f"{ROOT}/{kind}/{name}"
        out = out.replace(f"{{{kind}.{name}}}", value)
    return out


def _argv(step: Step) -> list[str]:
    if step.command is not None:
        return [_render(step, a) for a in step.command]
    # the local runner's argv, so a function step behaves alike here and in a pod
    argv = ["python", "-m", "tandem.pipeline.call", str(step.function), "--results-dir", f"{ROOT}/results"]
    for k, v in step.args.items():
        argv += ["--arg", f"{k}={_render(step, v) if isinstance(v, str) else v}"]
    return argv


def _step_refs(step: Step) -> list[str]:
    """``S.P`` of every ``{steps.S.P}`` the step uses, in order, once each."""
    refs = [n for _, t in step.texts() for k, n in placeholders(t) if k == "steps"]
    return list(dict.fromkeys(refs))


def _container(pipe: Pipeline, step: Step) -> Container:
    inputs: list[Parameter | Artifact] = [Artifact(name=n, path=f"{ROOT}/inputs/{n}") for n in step.inputs]
    inputs += [Parameter(name=_param_input(r)) for r in _step_refs(step) if not _only_in_when(step, r)]
    outputs: list[Parameter | Artifact] = [Artifact(name=a, path=f"{ROOT}/outputs/{a}")
                                           for a in step.outputs.artifacts]
    outputs += [Parameter(name=p, value_from=ValueFrom(path=f"{ROOT}/results/{p}")) for p in step.outputs.params]
    volumes = [EmptyDirVolume(name=f"tandem-{d}", mount_path=f"{ROOT}/{d}")
               for d, used in (("outputs", step.outputs.artifacts), ("results", step.outputs.params or
                                                                       step.function)) if used]
    env: list[Env | SecretEnv] = [Env(name=k, value=_render(step, v)) for k, v in step.env.items()]
    env += [SecretEnv(name=var, secret_name=ref.split("/", 1)[0], secret_key=ref.split("/", 1)[1])
            for var, ref in step.secrets.items()]
    env += [Env(name="TANDEM_PIPELINE_RUN", value="{{workflow.name}}"), Env(name="TANDEM_PIPELINE_STEP",
                                                                             value=step.name)]
    res = step.resources
    return Container(
        name=step.name, image=step.image or pipe.image, command=_argv(step), env=env,
        inputs=inputs or None, outputs=outputs or None, volumes=volumes or None,
        resources=Resources(cpu_request=_cpu(res.cpu), memory_request=res.memory, memory_limit=res.memory,
                            gpus=res.gpu or None),
        node_selector=dict(step.node_selector) or None,
        tolerations=[Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
                     for t in step.tolerations] or None,
        active_deadline_seconds=math.ceil(step.timeout_s) if step.timeout_s else None,
        retry_strategy=_retry(step),
    )


def _only_in_when(step: Step, ref: str) -> bool:
    """Whether ``{steps.REF}`` appears only in `when` (the task evaluates it; the container needs no input)."""
    return all(f"{{steps.{ref}}}" not in t for f, t in step.texts() if f != "when")


def _cpu(cpu: float) -> str:
    return str(int(cpu)) if float(cpu).is_integer() else f"{round(cpu * 1000)}m"


def retry_expression(on: list[str]) -> str:
    """The Argo ``retryStrategy.expression`` that retries exactly the failure classes in `on`."""
    return " || ".join(_CLASSES[c] for c in ("infra", "code", "timeout") if c in on)


def _retry(step: Step) -> RetryStrategy | None:
    r = step.retry
    if r.limit == 0 or not r.on:
        return None
    if not float(r.factor).is_integer():   # the controller parses it with intstr.Int32: "1.5" fails the node
        raise PipelineError(f"Argo's backoff factor is a whole number, not {r.factor:g}; use 1, 2, 3 ...",
                            step=step.name, field="retry.factor")
    return RetryStrategy(limit=r.limit, retry_policy="Always", expression=retry_expression(list(r.on)),
                         backoff=Backoff(duration=f"{r.backoff_s:g}s", factor=int(r.factor),  # type: ignore[arg-type]
                                         cap=f"{r.max_backoff_s:g}s"))


def _task(pipe: Pipeline, step: Step) -> Task:
    arguments: list[Parameter | Artifact] = []
    for local, ref in step.inputs.items():
        src, _, art = ref.partition(".")
        arguments.append(Artifact(name=local, from_=f"{{{{tasks.{src}.outputs.artifacts.{art}}}}}"))
    for ref in _step_refs(step):
        if not _only_in_when(step, ref):
            src, _, par = ref.partition(".")
            arguments.append(Parameter(name=_param_input(ref), value=f"{{{{tasks.{src}.outputs.parameters.{par}}}}}"))
    upstream = sorted(step.upstream(), key=pipe.order().index)
    return Task(name=step.name, template=step.name, arguments=arguments or None,
                depends=" && ".join(f"{u}.Succeeded" for u in upstream) or None,
                when=_when(step) if step.when else None)


def _when(step: Step) -> str:
    """The step's ``when`` as an Argo (govaluate) expression.

    Numbers compare as numbers, as locally; a word compared with == or != is quoted on both sides, because
    govaluate reads a bare word as an unknown variable.
    """
    cond = parse_condition(str(step.when), step.name)

    def side(text: str) -> str:
        out = text
        for kind, name in placeholders(text):
            src, _, par = name.partition(".")
            value = (f"{{{{workflow.parameters.{name}}}}}" if kind == "params"
                     else f"{{{{tasks.{src}.outputs.parameters.{par}}}}}")
            out = out.replace(f"{{{kind}.{name}}}", value)
        return out

    left, right = side(cond.left), side(cond.right)
    literals = [s.strip("'\"") for s in (cond.left, cond.right) if not placeholders(s)]
    if cond.op in ("==", "!=") and any(not _NUMBER.match(v) for v in literals):
        left, right = (f"'{s.strip(chr(39) + chr(34))}'" for s in (left, right))
    return f"{left} {cond.op} {right}"


def to_yaml(manifest: dict[str, Any]) -> str:
    """`manifest` as YAML (keys in Argo's order, as `export` built them)."""
    import yaml

    return str(yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=120))


def _spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest.get("spec") or {}
    if manifest.get("kind") == "CronWorkflow":
        spec = spec.get("workflowSpec") or {}
    return spec if isinstance(spec, dict) else {}


def depends_names(depends: str) -> set[str]:
    """Task names in a ``depends`` expression (``a.Succeeded && (b || !c.Failed)``)."""
    cleaned = re.sub(r"&&|\|\||[!()]", " ", depends)
    return {m.group(1) for tok in cleaned.split() if (m := _DEPENDS_NAME.fullmatch(tok))}


def dag_edges(manifest: dict[str, Any]) -> set[tuple[str, str]]:
    """(upstream, downstream) task pairs of the manifest's entrypoint DAG (``dependencies`` and ``depends``)."""
    spec = _spec(manifest)
    entry: dict[str, Any] = next((t for t in spec.get("templates", []) if t.get("name") == spec.get("entrypoint")), {})
    edges: set[tuple[str, str]] = set()
    for task in (entry.get("dag") or {}).get("tasks", []):
        ups = set(task.get("dependencies") or []) | depends_names(task.get("depends") or "")
        edges |= {(u, task["name"]) for u in ups}
    return edges


def server_url(server: str, *, secure: bool = True, base_href: str = "") -> str:
    """The Argo server's base URL, ending in ``/`` (so API paths join under a proxy sub-path).

    ``server`` is the argo CLI's ``ARGO_SERVER``: ``host:port`` (https unless ``secure`` is false) or a full
    ``http(s)://`` URL. ``base_href`` is its ``ARGO_BASE_HREF``.
    """
    server = server.strip()
    if not server:
        raise PipelineError("ARGO_SERVER is empty: set it to host:port (as for the argo CLI) or https://host:port")
    if "://" in server and not server.startswith(("http://", "https://")):
        raise PipelineError(f"ARGO_SERVER {server!r}: the scheme must be http or https")
    url = urlsplit(server if "://" in server else ("https://" if secure else "http://") + server)
    parts = [p for p in (url.path + "/" + base_href).split("/") if p]
    return f"{url.scheme}://{url.netloc}/" + "".join(p + "/" for p in parts)


_REFUSALS = {
    400: "the server rejected the manifest (check the message; `tandem pipeline export` lints it offline)",
    401: "not authenticated: set ARGO_TOKEN (`argo auth token` prints one)",
    403: "the token may not create this kind in this namespace: check its role, or set ARGO_NAMESPACE",
    404: "no such endpoint or namespace: check ARGO_SERVER, ARGO_BASE_HREF and ARGO_NAMESPACE",
    409: "a resource with this name already exists: delete it (argo delete / argo cron delete / "
         "argo template delete) or rename the pipeline",
}


def submit(manifest: dict[str, Any], host: str, token: str | None, namespace: str,
           verify_ssl: bool = True) -> str:
    """Create `manifest` on the Argo server at `host` (a `server_url`); returns the created name.

    Uses Hera's `WorkflowsService`: create_workflow, create_cron_workflow or create_workflow_template by kind.
    A refusal or an unreachable server is a `PipelineError` naming the status and the fix.
    """
    import requests
    from hera.exceptions import HeraException

    kind = manifest.get("kind")
    if kind not in ("Workflow", "CronWorkflow", "WorkflowTemplate"):
        raise PipelineError(f"cannot submit kind {kind!r}: Workflow, CronWorkflow or WorkflowTemplate", field="kind")
    if not host.startswith(("http://", "https://")):
        raise PipelineError(f"Argo server {host!r} needs an http:// or https:// scheme (see server_url)")
    try:
        name = _create(manifest, kind, host, token, namespace, verify_ssl)
    except HeraException as exc:
        status = getattr(exc, "status_code", None) or _status_of(str(exc))
        hint = _REFUSALS.get(status or 0, "")
        raise PipelineError(f"Argo server {host} refused the {kind}: {exc}" + (f"; {hint}" if hint else "")) \
            from None
    except requests.RequestException as exc:
        raise PipelineError(f"cannot reach the Argo server at {host}: {type(exc).__name__}: {exc}; check "
                            "ARGO_SERVER, ARGO_SECURE (http or https) and ARGO_INSECURE_SKIP_VERIFY") from None
    logger.info("submitted %s %s to %s (namespace %s)", kind, name, host, namespace)
    return name


def _status_of(message: str) -> int | None:
    match = re.search(r"status code (\d{3})", message)
    return int(match.group(1)) if match else None


def _create(manifest: dict[str, Any], kind: str, host: str, token: str | None, namespace: str,
            verify_ssl: bool) -> str:
    from hera.workflows import WorkflowsService
    from hera.workflows.models import CreateCronWorkflowRequest, WorkflowCreateRequest, WorkflowTemplateCreateRequest
    from hera.workflows.models import CronWorkflow as CronModel
    from hera.workflows.models import Workflow as WorkflowModel
    from hera.workflows.models import WorkflowTemplate as TemplateModel

    with WorkflowsService(host=host, token=token, namespace=namespace, verify_ssl=verify_ssl) as service:
        if kind == "Workflow":
            created: Any = service.create_workflow(
                WorkflowCreateRequest(workflow=WorkflowModel.model_validate(manifest)), namespace=namespace)
        elif kind == "CronWorkflow":
            created = service.create_cron_workflow(
                CreateCronWorkflowRequest(cron_workflow=CronModel.model_validate(manifest)), namespace=namespace)
        else:
            created = service.create_workflow_template(
                WorkflowTemplateCreateRequest(template=TemplateModel.model_validate(manifest)), namespace=namespace)
    return str(created.metadata.name)
