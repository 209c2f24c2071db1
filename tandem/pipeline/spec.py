"""A pipeline: named steps, the parameters and artifacts that flow between them, and the DAG they form.

One definition serves both runners: the local one (`tandem.pipeline.runner`) and the Argo export
(`tandem.pipeline.argo`), so a local run and a cluster run have the same nodes, edges, retries and caching.

A step runs a command (argv) or a Python function (``module:qualname``, run as ``python -m tandem.pipeline.call``
in its own process, locally and on Argo alike). Strings in ``command``, ``args`` and ``env`` may hold placeholders:

    {params.NAME}        a pipeline parameter's value
    {inputs.NAME}        the path of an input artifact (a file or a folder another step produced)
    {outputs.NAME}       the path where this step writes its output artifact NAME (file or folder)
    {results.NAME}       the path of a file where this step writes the value of its output parameter NAME
    {steps.STEP.NAME}    the value of output parameter NAME of step STEP (an implicit dependency)

``when: "{steps.evaluate.accuracy} >= 0.95"`` runs a step only if the comparison holds (operators
``== != >= <= > <``; numbers compare as numbers). Edges come from ``after``, from ``inputs`` (``STEP.ARTIFACT``)
and from ``{steps.*}`` references; the DAG must be acyclic. Every mistake is a `PipelineError` naming the step
and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["Condition", "Outputs", "Param", "Pipeline", "PipelineError", "Resources", "Retry", "Schedule",
           "Step", "Toleration", "WatchTrigger", "load_pipeline", "parse_condition", "placeholders"]

_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"   # a Kubernetes DNS label: Argo task and template names
_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"
_PLACEHOLDER = re.compile(r"\{(params|inputs|outputs|results|steps)\.([A-Za-z0-9_.-]+)\}")
_CONDITION = re.compile(r"^\s*(\S+)\s*(==|!=|>=|<=|>|<)\s*(\S+)\s*$")
ParamValue = str | int | float | bool
F = TypeVar("F", bound=Callable[..., Any])


class PipelineError(ValueError):
    """A pipeline definition (or run) is wrong; the message names the step and the field, and the fix."""

    def __init__(self, message: str, *, step: str | None = None, field: str | None = None) -> None:
        where = ", ".join(p for p in (f"step {step!r}" if step else "", f"field {field!r}" if field else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.step, self.field = step, field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Param(_Strict):
    """A pipeline parameter. ``path`` parameters name a file or folder whose content is part of cache keys."""

    type: Literal["str", "int", "float", "bool", "path"] = "str"
    default: ParamValue | None = None
    description: str = ""

    def coerce(self, name: str, value: object) -> ParamValue:
        """`value` as this parameter's type (strings from a command line or YAML are converted)."""
        try:
            if self.type == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    return value.lower() in ("true", "1", "yes")
                return bool(value)
            if self.type == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                return int(value)  # type: ignore[call-overload, no-any-return]
            if self.type == "float":
                return float(value)  # type: ignore[arg-type]
            return str(value)
        except (TypeError, ValueError):
            raise PipelineError(f"parameter {name!r} must be {self.type}, got {value!r}",
                                field=f"params.{name}") from None


class Resources(_Strict):
    """What a step needs: CPUs (fractions allowed), memory (Kubernetes quantity, e.g. "2Gi") and GPUs."""

    cpu: float = Field(default=1.0, gt=0)
    memory: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    gpu: int = Field(default=0, ge=0)


class Toleration(_Strict):
    """A Kubernetes toleration, so a step can run on tainted (for example GPU) nodes."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Retry(_Strict):
    """Retries with exponential back-off. ``on`` says which failures are retried: ``infra`` (the process was
    killed: SIGKILL, out of memory, pre-empted, the runner died), ``code`` (it exited non-zero), ``timeout``."""

    limit: int = Field(default=0, ge=0, le=50)
    backoff_s: float = Field(default=5.0, ge=0)
    factor: float = Field(default=2.0, ge=1)
    max_backoff_s: float = Field(default=300.0, ge=0)
    on: list[Literal["infra", "code", "timeout"]] = ["infra"]

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads the key `on` as the boolean True; take it back
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return float(min(self.max_backoff_s, self.backoff_s * self.factor ** (attempt - 1)))


class Outputs(_Strict):
    """What a step produces: artifacts (files or folders) and parameters (small values, as text)."""

    artifacts: list[str] = []
    params: list[str] = []

    @field_validator("artifacts", "params")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not re.match(_IDENT, n):
                raise ValueError(f"output name {n!r} must be an identifier (letters, digits, _)")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate output names in {names}")
        return names


class Step(_Strict):
    """One node of the DAG: a command or a Python function, with its inputs, outputs and run policy."""

    name: str = Field(pattern=_NAME, max_length=63)
    command: list[str] | None = None
    function: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    args: dict[str, ParamValue] = {}
    inputs: dict[str, str] = {}
    outputs: Outputs = Outputs()
    after: list[str] = []
    when: str | None = None
    image: str | None = None
    env: dict[str, str] = {}
    # environment variables that hold secrets (keys): locally taken from the runner's environment, on Argo from
    # a Kubernetes Secret, given as "SECRET/KEY"; never written into the pipeline or its manifest
    secrets: dict[str, str] = {}
    resources: Resources = Resources()
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    timeout_s: float | None = Field(default=None, gt=0)
    retry: Retry = Retry()
    cache: bool = True
    code: list[str] = []

    def texts(self) -> Iterator[tuple[str, str]]:
        """(field, text) of every string that may hold placeholders."""
        for i, a in enumerate(self.command or []):
            yield f"command[{i}]", a
        for k, v in self.args.items():
            if isinstance(v, str):
                yield f"args.{k}", v
        for k, v in self.env.items():
            yield f"env.{k}", v
        if self.when:
            yield "when", self.when

    def upstream(self) -> set[str]:
        """Names of the steps this one depends on."""
        deps = set(self.after) | {ref.split(".", 1)[0] for ref in self.inputs.values()}
        for _, text in self.texts():
            deps |= {name.split(".", 1)[0] for kind, name in placeholders(text) if kind == "steps"}
        return deps


class Schedule(_Strict):
    """A cron schedule (five fields, minute hour day-of-month month day-of-week) in an IANA time zone."""

    cron: str
    timezone: str = "UTC"


class WatchTrigger(_Strict):
    """Run when a new file matching `pattern` appears in `folder`; its path goes to parameter `param`."""

    folder: str
    pattern: str = "*"
    param: str | None = None


class Condition(BaseModel):
    """A parsed ``when``: left and right are literals or ``{steps.S.P}`` / ``{params.P}`` placeholders."""

    left: str
    op: str
    right: str

    def holds(self, render: Callable[[str], str]) -> bool:
        """Whether the comparison is true once placeholders are rendered (numbers compare as numbers)."""
        a, b = render(self.left).strip(), render(self.right).strip()
        try:
            x: float | str = float(a)
            y: float | str = float(b)
        except ValueError:
            x, y = a.strip("'\""), b.strip("'\"")
        ops: dict[str, Callable[[Any, Any], bool]] = {
            "==": lambda p, q: p == q, "!=": lambda p, q: p != q, ">=": lambda p, q: p >= q,
            "<=": lambda p, q: p <= q, ">": lambda p, q: p > q, "<": lambda p, q: p < q}
        try:
            return ops[self.op](x, y)
        except TypeError:   # a number against a word: only == and != make sense
            return self.op == "!="


def placeholders(text: str) -> list[tuple[str, str]]:
    """The (kind, name) of every placeholder in `text`."""
    return [(m.group(1), m.group(2)) for m in _PLACEHOLDER.finditer(text)]


def parse_condition(text: str, step: str | None = None) -> Condition:
    """``"{steps.evaluate.accuracy} >= 0.95"`` as a `Condition`."""
    m = _CONDITION.match(text)
    if not m:
        raise PipelineError(f"{text!r} is not 'LEFT OP RIGHT' with OP one of == != >= <= > <",
                            step=step, field="when")
    return Condition(left=m.group(1), op=m.group(2), right=m.group(3))


class Pipeline(_Strict):
    """A named DAG of steps with parameters, schedules and triggers. Build it in Python or load it from YAML.

    >>> p = Pipeline(name="demo")
    >>> make = p.add(Step(name="make", command=["sh", "-c", "echo hi > {outputs.data}"],
    ...                   outputs=Outputs(artifacts=["data"])))
    >>> _ = p.add(Step(name="show", command=["cat", "{inputs.data}"], inputs={"data": "make.data"}))
    >>> p.validate_dag()
    """

    name: str = Field(pattern=_NAME, max_length=63)
    description: str = ""
    params: dict[str, Param] = {}
    steps: list[Step] = []
    schedules: list[Schedule] = []
    watch: list[WatchTrigger] = []
    image: str = "python:3.11-slim"
    workdir: str | None = None   # where commands run (default: the pipeline file's folder)

    def add(self, step: Step) -> Step:
        """Append `step` (names must be unique) and return it."""
        if any(s.name == step.name for s in self.steps):
            raise PipelineError("a step with this name already exists", step=step.name, field="name")
        self.steps.append(step)
        return step

    def function(self, name: str | None = None, **fields: Any) -> Callable[[F], F]:
        """Decorator: the function becomes a step (run in its own process) named after it (``_`` -> ``-``)."""
        def wrap(fn: F) -> F:
            if "<locals>" in fn.__qualname__ or fn.__module__ == "__main__":
                raise PipelineError(f"{fn.__qualname__}: a function step must be a module-level function of an "
                                    "importable module (the step imports it in its own process)",
                                    step=name or fn.__name__.replace("_", "-"), field="function")
            self.add(Step(name=name or fn.__name__.replace("_", "-"),
                          function=f"{fn.__module__}:{fn.__qualname__}", **fields))
            return fn
        return wrap

    def step(self, name: str) -> Step:
        """The step called `name`."""
        for s in self.steps:
            if s.name == name:
                return s
        raise PipelineError(f"no step {name!r}; steps: {', '.join(s.name for s in self.steps)}")

    def edges(self) -> set[tuple[str, str]]:
        """(upstream, downstream) pairs."""
        return {(u, s.name) for s in self.steps for u in s.upstream()}

    def order(self) -> list[str]:
        """Step names in a topological order (ties kept in definition order)."""
        deps = {s.name: s.upstream() for s in self.steps}
        done: list[str] = []
        while len(done) < len(deps):
            ready = [n for n in deps if n not in done and deps[n] <= set(done)]
            if not ready:
                raise PipelineError(f"the steps form a cycle: {' -> '.join(_cycle(deps))}", field="after")
            done.extend(ready)
        return done

    def resolve_params(self, given: dict[str, object] | None = None) -> dict[str, ParamValue]:
        """Defaults overlaid with `given`, each coerced to its type; unknown or missing ones are errors."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise PipelineError(f"unknown parameter(s) {unknown}; this pipeline takes {sorted(self.params)}",
                                field="params")
        out: dict[str, ParamValue] = {}
        for name, spec in self.params.items():
            value = given.get(name, spec.default)
            if value is None:
                raise PipelineError(f"parameter {name!r} has no default; pass it (--param {name}=VALUE)",
                                    field=f"params.{name}")
            out[name] = spec.coerce(name, value)
        return out

    def validate_dag(self) -> None:
        """Check names, references, placeholders, conditions, schedules and acyclicity; raise `PipelineError`."""
        seen: set[str] = set()
        for s in self.steps:
            if s.name in seen:
                raise PipelineError("duplicate step name", step=s.name, field="name")
            seen.add(s.name)
        produced = {s.name: s for s in self.steps}
        for s in self.steps:
            _check_step(s, produced, self.params)
        for i, sch in enumerate(self.schedules):
            from tandem.pipeline.cron import CronError, parse_cron, zone

            try:
                parse_cron(sch.cron)
                zone(sch.timezone)
            except CronError as exc:
                raise PipelineError(str(exc), field=f"schedules[{i}]") from None
        for i, w in enumerate(self.watch):
            if w.param is not None and w.param not in self.params:
                raise PipelineError(f"watch trigger sets unknown parameter {w.param!r}", field=f"watch[{i}].param")
        self.order()


def _check_step(s: Step, steps: dict[str, Step], params: dict[str, Param]) -> None:
    if (s.command is None) == (s.function is None):
        raise PipelineError("give exactly one of 'command' (an argv list) or 'function' ('module:name')",
                            step=s.name, field="command")
    if s.command is not None and not s.command:
        raise PipelineError("the command is empty", step=s.name, field="command")
    for dep in s.after:
        if dep not in steps:
            raise PipelineError(f"depends on unknown step {dep!r}", step=s.name, field="after")
    for local, ref in s.inputs.items():
        src, _, art = ref.partition(".")
        if not re.match(_IDENT, local):
            raise PipelineError(f"input name {local!r} must be an identifier", step=s.name, field="inputs")
        if src not in steps:
            raise PipelineError(f"input {local!r} comes from unknown step {src!r} (write STEP.ARTIFACT)",
                                step=s.name, field=f"inputs.{local}")
        if art not in steps[src].outputs.artifacts:
            have = ", ".join(steps[src].outputs.artifacts) or "nothing"
            raise PipelineError(f"input {local!r}: artifact {art!r} is never produced by step {src!r} "
                                f"(it produces: {have})", step=s.name, field=f"inputs.{local}")
    for where, text in s.texts():
        for kind, name in placeholders(text):
            _check_placeholder(s, where, kind, name, steps, params)
    if s.when:
        parse_condition(s.when, s.name)
    _check_secrets(s)


def _check_secrets(s: Step) -> None:
    for var, ref in s.secrets.items():
        if not re.match(_IDENT, var) or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._A-Za-z0-9]+$", ref):
            raise PipelineError(f"secret {var!r}: write ENV_NAME: SECRET/KEY (a Kubernetes Secret and its key), "
                                f"got {ref!r}", step=s.name, field=f"secrets.{var}")


def _check_placeholder(s: Step, where: str, kind: str, name: str, steps: dict[str, Step],
                       params: dict[str, Param]) -> None:
    def bad(why: str) -> PipelineError:
        return PipelineError(f"{{{kind}.{name}}}: {why}", step=s.name, field=where)

    if kind == "params" and name not in params:
        raise bad(f"no pipeline parameter {name!r} (parameters: {', '.join(params) or 'none'})")
    if kind == "inputs" and name not in s.inputs:
        raise bad(f"no input {name!r}; declare it in 'inputs' as {name}: STEP.ARTIFACT")
    if kind == "outputs" and name not in s.outputs.artifacts:
        raise bad(f"no output artifact {name!r}; declare it in outputs.artifacts")
    if kind == "results" and name not in s.outputs.params:
        raise bad(f"no output parameter {name!r}; declare it in outputs.params")
    if kind == "steps":
        src, _, par = name.partition(".")
        if src not in steps:
            raise bad(f"unknown step {src!r}")
        if par not in steps[src].outputs.params:
            raise bad(f"step {src!r} has no output parameter {par!r} "
                      f"(it has: {', '.join(steps[src].outputs.params) or 'none'})")


def _cycle(deps: dict[str, set[str]]) -> list[str]:
    """One cycle among `deps` (name -> upstream names), as a path that ends where it starts."""
    for start in deps:
        path, node = [start], start
        while True:
            nxt = next((d for d in sorted(deps[node]) if d in deps), None)
            if nxt is None:
                break
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            path.append(nxt)
            node = nxt
    return list(deps)


def _pydantic_error(exc: ValidationError, raw: dict[str, Any]) -> PipelineError:
    err = exc.errors()[0]
    loc = list(err["loc"])
    step = None
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = raw.get("steps") or []
        entry = steps[loc[1]] if loc[1] < len(steps) else {}
        step = entry.get("name", f"#{loc[1]}") if isinstance(entry, dict) else f"#{loc[1]}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc) or None
    return PipelineError(err["msg"], step=step, field=field)


def from_dict(raw: dict[str, Any]) -> Pipeline:
    """A validated `Pipeline` from plain data (a parsed YAML file)."""
    if not isinstance(raw, dict):
        raise PipelineError("a pipeline file must hold a mapping with 'name' and 'steps'")
    try:
        pipe = Pipeline.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, raw) from None
    pipe.validate_dag()
    return pipe


def load_pipeline(path: str | Path) -> Pipeline:
    """Load a pipeline from YAML (``.yaml``/``.yml``) or Python (a module defining ``pipeline``)."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"pipeline file {p} does not exist")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise PipelineError(f"{p} is not valid YAML: {exc}") from None
        pipe = from_dict(raw)
    elif p.suffix == ".py":
        pipe = _load_python(p)
    else:
        raise PipelineError(f"{p}: a pipeline file ends in .yaml, .yml or .py")
    if pipe.workdir is None:
        pipe.workdir = str(p.resolve().parent)
    return pipe


def _load_python(p: Path) -> Pipeline:
    import importlib.util
    import sys

    folder = str(p.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(p.stem, p)
    if spec is None or spec.loader is None:
        raise PipelineError(f"cannot import {p}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[p.stem] = module
    spec.loader.exec_module(module)
    pipe = getattr(module, "pipeline", None)
    if not isinstance(pipe, Pipeline):
        raise PipelineError(f"{p} must define a module-level `pipeline = Pipeline(...)`")
    pipe.validate_dag()
    return pipe
