"""Offline checks of an Argo manifest (a Workflow, CronWorkflow or WorkflowTemplate as a plain dict).

Two passes, and every problem is reported with its path (``spec.templates[2].container.resorces: unknown key``):

* structure: the manifest against Hera's generated Argo models, picked by ``kind``. Those models ignore unknown
  keys, and Argo's server would drop a misspelt field silently, so the dict is walked along the models' fields
  (by their wire names, the aliases) through nested models, lists and maps, and every key no model declares is
  reported; pydantic's own validation errors (a wrong type, a bad quantity) are reported too;
* semantics: duplicate template names, duplicate task names in a DAG, tasks naming unknown templates,
  ``dependencies``/``depends`` naming unknown tasks, dependency cycles, ``{{tasks.X.outputs.artifacts.Y}}`` or
  ``...parameters.Y`` that X's template does not output (or X is not upstream), ``{{inputs.parameters.P}}`` and
  ``{{workflow.parameters.P}}`` that are not declared, a missing or unknown entrypoint, and for a CronWorkflow
  its schedules (`tandem.pipeline.cron.parse_cron`) and time zone.
"""

from __future__ import annotations

import inspect
import logging
import re
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, RootModel, ValidationError

logger = logging.getLogger(__name__)

__all__ = ["ManifestError", "validate_manifest"]

_TASK_REF = re.compile(r"\{\{\s*tasks\.([-a-z0-9]+)\.outputs\.(artifacts|parameters)\.([-\w]+)\s*\}\}")
_INPUT_REF = re.compile(r"\{\{\s*inputs\.parameters\.([-\w]+)\s*\}\}")
_WORKFLOW_REF = re.compile(r"\{\{\s*workflow\.parameters\.([-\w]+)\s*\}\}")
# keys older manifests use that the models no longer declare: (model, key) -> what to write instead
_REMOVED = {("CronWorkflowSpec", "schedule"): "removed in Argo v4; write 'schedules: [...]'"}


class ManifestError(ValueError):
    """An Argo manifest is wrong; `problems` holds one ``path: what`` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s) in the Argo manifest:\n  " + "\n  ".join(problems))
        self.problems = problems


def _model_for(kind: object) -> type[BaseModel] | None:
    from hera.workflows.models import CronWorkflow, Workflow, WorkflowTemplate

    models: dict[object, type[BaseModel]] = {"Workflow": Workflow, "CronWorkflow": CronWorkflow,
                                             "WorkflowTemplate": WorkflowTemplate}
    return models.get(kind)


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise `ManifestError` listing every structural and semantic problem of `manifest`; return if none."""
    if not isinstance(manifest, dict):
        raise ManifestError([f"(root): a manifest is a mapping, not {type(manifest).__name__}"])
    model = _model_for(manifest.get("kind"))
    if model is None:
        raise ManifestError([f"kind: {manifest.get('kind')!r} is not Workflow, CronWorkflow or WorkflowTemplate"])
    problems: list[str] = []
    _walk(manifest, model, "", problems)
    try:
        model.model_validate(manifest)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"{_path(err['loc'])}: {err['msg']}")
    problems += _semantics(manifest)
    if problems:
        raise ManifestError(problems)
    logger.debug("manifest %s is valid", manifest.get("kind"))


def _path(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# structure ------------------------------------------------------------------------------------------------------
def _strip(tp: Any) -> list[Any]:
    """The alternatives of `tp` (Optional and Union unwrapped, None dropped)."""
    if get_origin(tp) in (Union, types.UnionType):
        return [a for arg in get_args(tp) for a in _strip(arg)]
    return [] if tp is type(None) else [tp]


def _walk(value: Any, tp: Any, path: str, problems: list[str]) -> None:
    """Report keys of `value` that the type `tp` (a model, list, dict or union of them) does not declare."""
    for alt in _strip(tp):
        origin = get_origin(alt)
        if origin is list and isinstance(value, list):
            (item,) = get_args(alt) or (Any,)
            for i, v in enumerate(value):
                _walk(v, item, f"{path}[{i}]", problems)
            return
        if origin is dict and isinstance(value, dict):
            args = get_args(alt)
            for k, v in value.items():
                _walk(v, args[1] if len(args) == 2 else Any, _join(path, k), problems)
            return
        if inspect.isclass(alt) and issubclass(alt, RootModel):
            _walk(value, alt.model_fields["root"].annotation, path, problems)
            return
        if inspect.isclass(alt) and issubclass(alt, BaseModel) and isinstance(value, dict):
            _walk_model(value, alt, path, problems)
            return


def _walk_model(value: dict[str, Any], model: type[BaseModel], path: str, problems: list[str]) -> None:
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for key, v in value.items():
        field = fields.get(key)
        if field is None and (model.__name__, key) in _REMOVED:
            problems.append(f"{_join(path, key)}: {_REMOVED[model.__name__, key]}")
            continue
        if field is None:
            hint = next((a for a, f in fields.items() if key in (a.lower(), _snake(a)) and a != key), None)
            problems.append(f"{_join(path, key)}: unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))
            continue
        _walk(v, field.annotation, _join(path, key), problems)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


# semantics ------------------------------------------------------------------------------------------------------
def _semantics(manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    base = "spec"
    if manifest.get("kind") == "CronWorkflow":
        problems += _cron(spec)
        spec, base = spec.get("workflowSpec"), "spec.workflowSpec"
        if not isinstance(spec, dict):
            return [*problems, "spec.workflowSpec: missing"]
    templates = [t for t in spec.get("templates") or [] if isinstance(t, dict)]
    by_name: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(templates):
        name = t.get("name")
        if name in by_name:
            problems.append(f"{base}.templates[{i}].name: duplicate template name {name!r}")
        by_name.setdefault(str(name), t)
    entry = spec.get("entrypoint")
    if not entry:
        problems.append(f"{base}.entrypoint: missing (name the template to run first)")
    elif entry not in by_name:
        problems.append(f"{base}.entrypoint: unknown template {entry!r}")
    declared = {p.get("name") for p in (spec.get("arguments") or {}).get("parameters") or [] if isinstance(p, dict)}
    for i, t in enumerate(templates):
        where = f"{base}.templates[{i}]"
        problems += _template_refs(t, where, declared)
        if isinstance(t.get("dag"), dict):
            problems += _dag(t["dag"], f"{where}.dag", by_name)
    return problems


def _cron(spec: dict[str, Any]) -> list[str]:
    from tandem.pipeline.cron import CronError, parse_cron, zone

    problems: list[str] = []
    schedules = spec.get("schedules")
    if not schedules:
        problems.append("spec.schedules: a CronWorkflow needs at least one schedule")
    for i, s in enumerate(schedules or []):
        try:
            parse_cron(str(s))
        except CronError as exc:
            problems.append(f"spec.schedules[{i}]: {exc}")
    if spec.get("timezone"):
        try:
            zone(str(spec["timezone"]))
        except CronError as exc:
            problems.append(f"spec.timezone: {exc}")
    return problems


def _strings(value: Any, path: str) -> list[tuple[str, str]]:
    """(path, text) of every string inside `value`."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, _join(path, k))]
    if isinstance(value, list):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{path}[{i}]")]
    return []


def _template_refs(t: dict[str, Any], where: str, declared: set[Any]) -> list[str]:
    """``{{inputs.parameters.P}}`` the template does not declare and ``{{workflow.parameters.P}}`` nobody does."""
    problems: list[str] = []
    inputs = {p.get("name") for p in (t.get("inputs") or {}).get("parameters") or [] if isinstance(p, dict)}
    body = {k: v for k, v in t.items() if k not in ("dag", "steps", "name")}
    for path, text in _strings(body, where):
        problems += [f"{path}: {{{{inputs.parameters.{p}}}}} is not among the template's inputs"
                     for p in _INPUT_REF.findall(text) if p not in inputs]
    for path, text in _strings(t, where):
        problems += [f"{path}: {{{{workflow.parameters.{p}}}}} is not among spec.arguments.parameters"
                     for p in _WORKFLOW_REF.findall(text) if p not in declared]
    return problems


def _dag(dag: dict[str, Any], where: str, templates: dict[str, dict[str, Any]]) -> list[str]:
    from tandem.pipeline.argo import depends_names

    problems: list[str] = []
    tasks = [t for t in dag.get("tasks") or [] if isinstance(t, dict)]
    names: dict[str, dict[str, Any]] = {}
    for i, task in enumerate(tasks):
        if task.get("name") in names:
            problems.append(f"{where}.tasks[{i}].name: duplicate task name {task.get('name')!r}")
        names.setdefault(str(task.get("name")), task)
    ups: dict[str, set[str]] = {}
    for i, task in enumerate(tasks):
        at = f"{where}.tasks[{i}]"
        ref = task.get("template")
        if ref is not None and ref not in templates:
            problems.append(f"{at}.template: unknown template {ref!r}")
        deps = set(task.get("dependencies") or []) | depends_names(str(task.get("depends") or ""))
        for d in sorted(deps - set(names)):
            problems.append(f"{at}: depends on unknown task {d!r}")
        ups.setdefault(str(task.get("name")), set()).update(deps & set(names))
    cycle = _find_cycle(ups)
    if cycle:
        problems.append(f"{where}.tasks: dependency cycle {' -> '.join(cycle)}")
    for i, task in enumerate(tasks):
        problems += _consumed(task, f"{where}.tasks[{i}]", names, templates, ups)
    return problems


def _consumed(task: dict[str, Any], at: str, tasks: dict[str, dict[str, Any]],
              templates: dict[str, dict[str, Any]], ups: dict[str, set[str]]) -> list[str]:
    """Outputs that `task` consumes from other tasks: produced by their templates, and by an upstream task."""
    problems: list[str] = []
    ancestors = _ancestors(str(task.get("name")), ups)
    for path, text in _strings({k: task.get(k) for k in ("arguments", "when") if k in task}, at):
        for src, kind, name in _TASK_REF.findall(text):
            if src not in tasks:
                problems.append(f"{path}: {{{{tasks.{src}...}}}} names unknown task {src!r}")
                continue
            tpl = templates.get(str(tasks[src].get("template")), {})
            outs = {o.get("name") for o in (tpl.get("outputs") or {}).get(kind) or [] if isinstance(o, dict)}
            what = "artifact" if kind == "artifacts" else "parameter"
            if name not in outs:
                problems.append(f"{path}: {what} {name!r} is consumed from task {src!r} but its template "
                                f"{tasks[src].get('template')!r} never produces it")
            elif src not in ancestors:
                problems.append(f"{path}: consumes {what} {name!r} of task {src!r} without depending on it")
    return problems


def _ancestors(name: str, ups: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(ups.get(name, ()))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(ups.get(n, ()))
    return seen


def _find_cycle(ups: dict[str, set[str]]) -> list[str] | None:
    """One dependency cycle as a path that ends where it starts, or None (iterative depth-first search)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    for start in ups:
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(ups.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(ups.get(nxt, ()))))
    return None
