"""Argo export: every manifest validates offline, has the local run's nodes and edges, and each lint catches."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.pipeline import argo
from tandem.pipeline.lint import ManifestError, validate_manifest
from tandem.pipeline.spec import (
    Outputs,
    Param,
    Pipeline,
    PipelineError,
    Resources,
    Retry,
    Schedule,
    Step,
    Toleration,
)

KINDS = ("workflow", "cron", "template")


def lora() -> Pipeline:
    """The shape of the real LoRA pipeline: make-data -> train -> evaluate -> deploy (when) -> smoke."""
    p = Pipeline(name="lora", image="ghcr.io/acme/tandem:1", params={
        "rows": Param(type="int", default=2000), "base": Param(description="base model id")},
        schedules=[Schedule(cron="0 3 * * 1-5", timezone="Europe/Paris"), Schedule(cron="@weekly",
                                                                                  timezone="Europe/Paris")])
    p.add(Step(name="make-data", command=["python", "make.py", "--rows", "{params.rows}", "--out", "{outputs.data}"],
               outputs=Outputs(artifacts=["data"])))
    p.add(Step(name="train", command=["python", "train.py", "--data", "{inputs.data}", "--out", "{outputs.adapter}",
                                      "--base", "{params.base}"],
               inputs={"data": "make-data.data"}, outputs=Outputs(artifacts=["adapter"]),
               resources=Resources(cpu=4, memory="8Gi", gpu=1), node_selector={"pool": "a100"},
               tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
               timeout_s=3599.5, retry=Retry(limit=3, backoff_s=10, factor=2, max_backoff_s=120, on=["infra"]),
               env={"DATA": "{inputs.data}"}))
    p.add(Step(name="evaluate", command=["python", "ev.py", "{inputs.adapter}", "{results.accuracy}"],
               inputs={"adapter": "train.adapter"}, outputs=Outputs(params=["accuracy"]),
               resources=Resources(cpu=0.5)))
    p.add(Step(name="deploy", command=["deploy", "{inputs.adapter}", "--note", "acc={steps.evaluate.accuracy}"],
               inputs={"adapter": "train.adapter"}, when="{steps.evaluate.accuracy} >= 0.95", image="alpine:3"))
    p.add(Step(name="smoke", command=["smoke"], after=["deploy"]))
    p.validate_dag()
    return p


def functions() -> Pipeline:
    p = Pipeline(name="fn", params={"n": Param(type="int", default=3)})
    p.add(Step(name="count", function="mypkg.steps:count", args={"n": "{params.n}", "scale": 2},
               outputs=Outputs(params=["total"]), retry=Retry(limit=2, on=["code", "timeout"])))
    p.add(Step(name="check", function="mypkg.steps:check", args={"total": "{steps.count.total}"},
               when="{steps.count.total} != zero"))
    p.validate_dag()
    return p


def _spec(m: dict[str, Any]) -> dict[str, Any]:
    return m["spec"]["workflowSpec"] if m["kind"] == "CronWorkflow" else m["spec"]


def _template(m: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in _spec(m)["templates"] if t["name"] == name)


def _task(m: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in _template(m, _spec(m)["entrypoint"])["dag"]["tasks"] if t["name"] == name)


def _problems(m: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as info:
        validate_manifest(m)
    return info.value.problems


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {k: argo.export(lora(), k, namespace="ml", params={"base": "tiny-llm"}) for k in KINDS}  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_export_validates_with_same_nodes_and_edges(kind: str, manifests: dict[str, dict[str, Any]]) -> None:
    m, pipe = manifests[kind], lora()
    validate_manifest(m)
    assert m["kind"] == {"workflow": "Workflow", "cron": "CronWorkflow", "template": "WorkflowTemplate"}[kind]
    assert m["metadata"]["namespace"] == "ml"
    assert argo.dag_edges(m) == pipe.edges()
    tasks = _template(m, _spec(m)["entrypoint"])["dag"]["tasks"]
    assert [t["name"] for t in tasks] == pipe.order()
    assert {t["template"] for t in tasks} == {s.name for s in pipe.steps}
    assert len(_spec(m)["templates"]) == len(pipe.steps) + 1
    validate_manifest(yaml.safe_load(argo.to_yaml(m)))   # the YAML round trip loses nothing


def test_names_and_schedules_per_kind(manifests: dict[str, dict[str, Any]]) -> None:
    assert manifests["workflow"]["metadata"]["generateName"] == "lora-"
    assert "name" not in manifests["workflow"]["metadata"]
    assert manifests["template"]["metadata"]["name"] == "lora"
    cron = manifests["cron"]
    assert cron["metadata"]["name"] == "lora"
    assert cron["spec"]["schedules"] == ["0 3 * * 1-5", "@weekly"]
    assert "schedule" not in cron["spec"]
    assert cron["spec"]["timezone"] == "Europe/Paris"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_params_become_arguments(manifests: dict[str, dict[str, Any]]) -> None:
    params = {p["name"]: p for p in manifests["workflow"]["spec"]["arguments"]["parameters"]}
    assert params["rows"]["value"] == "2000" and params["base"]["value"] == "tiny-llm"
    required = argo.export(lora(), params={"rows": "5"})["spec"]["arguments"]["parameters"]
    assert required == [{"name": "rows", "value": "5"}, {"name": "base", "description": "base model id"}]
    with pytest.raises(PipelineError, match="must be int"):
        argo.export(lora(), params={"rows": "many"})
    with pytest.raises(PipelineError, match="unknown parameter"):
        argo.export(lora(), params={"lr": "1"})


def test_train_container_resources_and_policy(manifests: dict[str, dict[str, Any]]) -> None:
    t = _template(manifests["workflow"], "train")
    c = t["container"]
    assert c["image"] == "ghcr.io/acme/tandem:1"
    assert c["command"] == ["python", "train.py", "--data", "/tmp/tandem/inputs/data", "--out",
                            "/tmp/tandem/outputs/adapter", "--base", "{{workflow.parameters.base}}"]
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"},
                              "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}}
    assert {"name": "DATA", "value": "/tmp/tandem/inputs/data"} in c["env"]
    assert t["nodeSelector"] == {"pool": "a100"}
    assert t["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert t["activeDeadlineSeconds"] == 3600
    assert t["inputs"]["artifacts"] == [{"name": "data", "path": "/tmp/tandem/inputs/data"}]
    assert t["outputs"]["artifacts"] == [{"name": "adapter", "path": "/tmp/tandem/outputs/adapter"}]
    rs = t["retryStrategy"]
    assert rs["limit"] == 3 and rs["retryPolicy"] == "Always"
    assert rs["backoff"] == {"duration": "10s", "factor": 2, "cap": "120s"}
    assert 'lastRetry.status == "Error"' in rs["expression"] and "[137, 143]" in rs["expression"]
    assert "memoize" not in t
    assert _template(manifests["workflow"], "evaluate")["container"]["resources"] == {"requests": {"cpu": "500m"}}
    assert "retryStrategy" not in _template(manifests["workflow"], "smoke")


def _evaluate(expression: str, status: str, exit_code: int, message: str = "") -> bool:
    """`expression` (the subset of expr-lang the export writes) evaluated in Python for one ``lastRetry``."""
    py = re.sub(r"lastRetry\.message matches '\(\?i\)([^']*)'", lambda m: f"bool(re.search({m.group(1)!r}, "
                f"msg, re.I))", expression)
    py = re.sub(r'lastRetry\.message contains "([^"]*)"', lambda m: f"({m.group(1)!r} in msg)", py)
    py = py.replace("asInt(lastRetry.exitCode)", "code").replace("lastRetry.status", "status")
    py = py.replace("&&", " and ").replace("||", " or ").replace("!(", " not (")
    return bool(eval(py, {"re": re}, {"status": status, "code": exit_code, "msg": message}))


@pytest.mark.parametrize(("status", "exit_code", "message", "kind"), [
    ("Error", -1, "pod deleted", "infra"),
    ("Failed", 137, "OOMKilled (exit code 137)", "infra"),
    ("Failed", 143, "", "infra"),
    ("Failed", 1, "Pod was terminated in response to imminent node shutdown.", "infra"),   # graceful pre-emption
    ("Failed", 1, "Error (exit code 1)", "code"),
    ("Failed", 137, "Pod was active on the node longer than the specified deadline", "timeout"),
])
def test_retry_expression_sorts_failures(status: str, exit_code: int, message: str, kind: str) -> None:
    for on in ("infra", "code", "timeout"):
        assert _evaluate(argo.retry_expression([on]), status, exit_code, message) == (on == kind), on
    assert _evaluate(argo.retry_expression(["infra", "code", "timeout"]), status, exit_code, message)


def test_retry_expression_joins_classes_and_factor_is_whole() -> None:
    infra, code = argo.retry_expression(["infra"]), argo.retry_expression(["code"])
    assert argo.INFRA in infra and argo.retry_expression(["infra", "code"]) == f"{infra} || {code}"
    assert infra.count("(") == infra.count(")") and code.count("(") == code.count(")")
    p = Pipeline(name="p")
    p.add(Step(name="a", command=["true"], retry=Retry(limit=1, factor=1.5)))
    with pytest.raises(PipelineError, match="retry.factor"):
        argo.export(p)


def test_artifacts_parameters_and_when(manifests: dict[str, dict[str, Any]]) -> None:
    m = manifests["workflow"]
    ev = _template(m, "evaluate")
    assert ev["outputs"]["parameters"] == [{"name": "accuracy", "valueFrom": {"path": "/tmp/tandem/results/accuracy"}}]
    train = _task(m, "train")
    assert train["arguments"]["artifacts"] == [{"name": "data", "from": "{{tasks.make-data.outputs.artifacts.data}}"}]
    deploy = _task(m, "deploy")
    assert deploy["when"] == "{{tasks.evaluate.outputs.parameters.accuracy}} >= 0.95"
    assert deploy["depends"] == "train.Succeeded && evaluate.Succeeded"
    assert deploy["arguments"]["parameters"] == [
        {"name": "evaluate-accuracy", "value": "{{tasks.evaluate.outputs.parameters.accuracy}}"}]
    dt = _template(m, "deploy")
    assert dt["container"]["image"] == "alpine:3"
    assert dt["container"]["command"][-1] == "acc={{inputs.parameters.evaluate-accuracy}}"
    assert "artifactRepositoryRef" not in m["spec"]
    ref = argo.export(lora(), params={"base": "b"}, artifact_repository="s3-repo/gpu")["spec"]
    assert ref["artifactRepositoryRef"] == {"configMap": "s3-repo", "key": "gpu"}


@pytest.mark.parametrize("kind", ["workflow", "template"])
def test_function_steps(kind: str) -> None:
    pipe = functions()
    m = argo.export(pipe, kind)  # type: ignore[arg-type]
    validate_manifest(m)
    assert argo.dag_edges(m) == pipe.edges() == {("count", "check")}
    count = _template(m, "count")
    assert count["container"]["command"] == ["python", "-m", "tandem.pipeline.call", "mypkg.steps:count",
                                             "--results-dir", "/tmp/tandem/results",
                                             "--arg", "n={{workflow.parameters.n}}", "--arg", "scale=2"]
    assert {"mountPath": "/tmp/tandem/results", "name": "tandem-results"} in count["container"]["volumeMounts"]
    assert "deadline" in count["retryStrategy"]["expression"]
    check = _task(m, "check")
    assert check["when"] == "'{{tasks.count.outputs.parameters.total}}' != 'zero'"
    assert _template(m, "check")["container"]["command"][-1] == "total={{inputs.parameters.count-total}}"


def test_cron_needs_schedules_in_one_zone() -> None:
    with pytest.raises(PipelineError, match="'schedules'"):
        argo.export(functions(), "cron")
    pipe = functions()
    pipe.schedules = [Schedule(cron="0 1 * * *", timezone="UTC"), Schedule(cron="0 2 * * *", timezone="Asia/Tokyo")]
    with pytest.raises(PipelineError, match="split"):
        argo.export(pipe, "cron")


def test_dag_template_name_avoids_step_names() -> None:
    p = Pipeline(name="p")
    p.add(Step(name="main", command=["true"]))
    m = argo.export(p)
    validate_manifest(m)
    assert m["spec"]["entrypoint"] == "main-dag"


# each lint class on a corrupted manifest -------------------------------------------------------------------------
Corruption = Callable[[dict[str, Any], dict[str, Any], list[dict[str, Any]]], object]
CORRUPT: dict[str, Corruption] = {   # (manifest, its workflow spec, the DAG's tasks) -> mutate them
    "unknown-key": lambda m, spec, tasks: spec["templates"][2]["container"].update(resorces={}),
    "duplicate-template": lambda m, spec, tasks: spec["templates"].append(copy.deepcopy(spec["templates"][1])),
    "duplicate-task": lambda m, spec, tasks: tasks.append(copy.deepcopy(tasks[0])),
    "dangling": lambda m, spec, tasks: tasks[4].update(depends="ghost.Succeeded"),
    "cycle": lambda m, spec, tasks: tasks[0].update(depends="smoke.Succeeded"),
    "artifact": lambda m, spec, tasks: tasks[2]["arguments"]["artifacts"][0].update(
        {"from": "{{tasks.train.outputs.artifacts.weights}}"}),
    "parameter": lambda m, spec, tasks: tasks[3].update(when="{{tasks.evaluate.outputs.parameters.loss}} < 1"),
    "entrypoint": lambda m, spec, tasks: spec.pop("entrypoint"),
    "template-ref": lambda m, spec, tasks: tasks[1].update(template="trian"),
    "bad-cron": lambda m, spec, tasks: m["spec"].update(schedules=["0 25 * * *"]),
    "old-schedule": lambda m, spec, tasks: m["spec"].update(schedule="0 1 * * *"),
    "wrong-type": lambda m, spec, tasks: spec["templates"][2]["container"].update(image=["python"]),
}


def _corrupt(m: dict[str, Any], how: str) -> dict[str, Any]:
    m = copy.deepcopy(m)
    CORRUPT[how](m, _spec(m), _template(m, "main")["dag"]["tasks"])
    return m


@pytest.mark.parametrize(("how", "words"), [
    ("unknown-key", "spec.workflowSpec.templates[2].container.resorces: unknown key"),
    ("duplicate-template", "duplicate template name 'make-data'"),
    ("duplicate-task", "duplicate task name 'make-data'"),
    ("dangling", "tasks[4]: depends on unknown task 'ghost'"),
    ("cycle", "dependency cycle"),
    ("artifact", "artifact 'weights' is consumed from task 'train' but its template 'train' never produces it"),
    ("parameter", "parameter 'loss' is consumed from task 'evaluate'"),
    ("entrypoint", "spec.workflowSpec.entrypoint: missing"),
    ("template-ref", "unknown template 'trian'"),
    ("bad-cron", "spec.schedules[0]: cron '0 25 * * *'"),
    ("old-schedule", "spec.schedule: removed in Argo v4"),
    ("wrong-type", "spec.workflowSpec.templates[2].container.image: Input should be a valid string"),
])
def test_lint_catches(how: str, words: str, manifests: dict[str, dict[str, Any]]) -> None:
    problems = _problems(_corrupt(manifests["cron"], how))
    assert any(words in p for p in problems), problems


def test_lint_reports_every_problem_and_deep_keys(manifests: dict[str, dict[str, Any]]) -> None:
    m = copy.deepcopy(manifests["workflow"])
    m["spec"]["templates"][2]["container"]["resources"]["requets"] = {}
    m["spec"]["templates"][2]["retryStrategy"]["backoff"]["max_duration"] = "1h"
    m["spec"]["templates"][0]["dag"]["tasks"][1]["arguments"]["artifacts"][0]["form"] = "x"
    m["metadata"]["generate_name"] = "x-"
    m["spec"]["templates"][3]["container"]["command"].append("{{inputs.parameters.nope}}")
    problems = _problems(m)
    assert "spec.templates[2].container.resources.requets: unknown key" in problems
    assert "spec.templates[2].retryStrategy.backoff.max_duration: unknown key (did you mean 'maxDuration'?)" \
        in problems
    assert "spec.templates[0].dag.tasks[1].arguments.artifacts[0].form: unknown key" in problems
    assert any(p.startswith("metadata.generate_name: unknown key") for p in problems)
    assert any("{{inputs.parameters.nope}}" in p for p in problems)
    assert len(problems) == 5


def test_lint_rejects_unknown_kind() -> None:
    with pytest.raises(ManifestError, match="kind"):
        validate_manifest({"kind": "Pod", "spec": {}})


# the CLI (submission over HTTP: tests/integration/test_pipeline_argo_submit.py) ---------------------------------
def _write_pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "nightly", "schedules": [{"cron": "30 2 * * *", "timezone": "America/New_York"}],
        "params": {"n": {"type": "int", "default": 1}},
        "steps": [{"name": "make", "command": ["sh", "-c", "echo {params.n} > {outputs.data}"],
                   "outputs": {"artifacts": ["data"]}},
                  {"name": "show", "command": ["cat", "{inputs.data}"], "inputs": {"data": "make.data"}}]}))
    return path


def test_cli_export_cron(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    out = tmp_path / "out.yaml"
    result = CliRunner().invoke(app, ["pipeline", "export", str(_write_pipeline(tmp_path)), "--kind", "cron",
                                      "-o", str(out), "-p", "n=7", "--namespace", "ml"])
    assert result.exit_code == 0, result.output
    m = yaml.safe_load(out.read_text())
    validate_manifest(m)
    assert m["kind"] == "CronWorkflow" and m["spec"]["schedules"] == ["30 2 * * *"]
    assert m["spec"]["timezone"] == "America/New_York"
    assert argo.dag_edges(m) == {("make", "show")}
    assert m["spec"]["workflowSpec"]["arguments"]["parameters"] == [{"name": "n", "value": "7"}]


def test_secrets_come_from_a_kubernetes_secret_and_are_checked() -> None:
    from tandem.pipeline.spec import from_dict

    pipe = from_dict({"name": "s", "steps": [{"name": "deploy", "command": ["true"],
                                               "secrets": {"TANDEM_ADMIN_KEY": "tandem-keys/admin"}}]})
    manifest = argo.export(pipe)
    validate_manifest(manifest)
    tpl = next(t for t in manifest["spec"]["templates"] if t["name"] == "deploy")
    env = {e["name"]: e for e in tpl["container"]["env"]}
    assert env["TANDEM_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tandem-keys", "key": "admin"}
    assert "value" not in env["TANDEM_ADMIN_KEY"]
    with pytest.raises(PipelineError, match="write ENV_NAME: SECRET/KEY") as info:
        from_dict({"name": "s", "steps": [{"name": "d", "command": ["true"], "secrets": {"K": "not a ref"}}]})
    assert info.value.field == "secrets.K"
