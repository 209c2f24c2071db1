"""Step templates (tandem.pipeline.templates), the deploy and smoke-test functions against a fake server
(tandem.pipeline.deploy), the metrics helpers (tandem.pipeline.evaluate) and the example pipelines' definitions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.pipeline import deploy, templates
from tandem.pipeline.evaluate import main as evaluate_main
from tandem.pipeline.evaluate import read_metrics, write_metrics
from tandem.pipeline.spec import Param, Pipeline, PipelineError, Resources, load_pipeline
from tests.http_stub import JSONHandler, serving

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "pipelines"
ADMIN, API = "admin-secret", "api-secret"


# -- templates --------------------------------------------------------------------------------------------------------
def test_train_is_tandem_train_with_its_flags() -> None:
    s = templates.train("fit", "fit.py", ["--out", "{outputs.model}"], nproc=2, threads=3, code=["lib.py"])
    assert s.command == ["tandem", "train", "--nproc", "2", "--threads", "3", "fit.py", "--out", "{outputs.model}"]
    assert s.outputs.artifacts == ["model"] and s.resources == Resources(cpu=6) and s.code == ["lib.py"]
    assert s.retry.limit == 1 and s.retry.on == ["infra"] and s.cache
    with pytest.raises(PipelineError, match="step 'fit', field 'nproc'"):
        templates.train("fit", "fit.py", nproc=0)
    with pytest.raises(PipelineError, match="step 'Bad_Name', field 'name'"):
        templates.train("Bad_Name", "fit.py")


def test_evaluate_function_and_command_forms() -> None:
    f = templates.evaluate("evaluate", "mod:score", args={"model": "{inputs.model}"}, inputs={"model": "t.model"},
                           metrics=["accuracy", "loss"])
    assert f.function == "mod:score" and f.args == {"model": "{inputs.model}", "metrics_file": "{outputs.metrics}"}
    assert f.outputs.artifacts == ["metrics"] and f.outputs.params == ["accuracy", "loss"]
    c = templates.evaluate("evaluate", ["score.py", "{outputs.metrics}"], metrics=["accuracy"])
    assert c.command == ["python", "-m", "tandem.pipeline.evaluate", "--metrics-file", "{outputs.metrics}",
                         "--result=accuracy={results.accuracy}", "--", "score.py", "{outputs.metrics}"]
    with pytest.raises(PipelineError, match="field 'metrics'"):
        templates.evaluate("evaluate", "mod:score", metrics=[])
    with pytest.raises(PipelineError, match="field 'args'"):
        templates.evaluate("evaluate", ["score.py"], args={"x": 1})


def test_optimize_is_tandem_optimize_writing_an_entry() -> None:
    s = templates.optimize("optimize", inputs={"model": "train.entry"}, targets=["int8-static", "fp16"],
                           calibration="{inputs.model}/calibration", atol=0.05, min_speedup="{params.speed}")
    assert s.command == ["tandem", "optimize", "{inputs.model}", "--out", "{outputs.optimized}", "--no-progress",
                         "-t", "int8-static", "-t", "fp16", "--calibration", "{inputs.model}/calibration",
                         "--atol", "0.05", "--min-speedup", "{params.speed}", "--write-entry", "{outputs.entry}"]
    assert s.outputs.artifacts == ["optimized", "entry"]
    assert templates.optimize("o", write_entry=False).outputs.artifacts == ["optimized"]


def test_deploy_steps_name_the_key_variable_never_the_key() -> None:
    d = templates.deploy_adapter("deploy", adapter="train.adapter", adapter_name="sw", publish_dir="{params.dir}")
    assert d.function == "tandem.pipeline.deploy:load_adapter" and not d.cache
    assert d.args["key_env"] == "TANDEM_ADMIN_KEY" and d.args["server"] == "{params.server}"
    assert d.inputs == {"adapter": "train.adapter"}
    assert d.outputs.params == ["adapter", "lora_path", "load_ms", "reloaded"]
    r = templates.roll_version("roll", model="m", entry="optimize.entry", keep=2)
    assert r.function == "tandem.pipeline.deploy:roll_version" and not r.cache and r.args["keep"] == 2
    with pytest.raises(PipelineError, match="step 'deploy', field 'args.key_env'.*never the key itself"):
        templates.deploy_adapter("deploy", adapter="t.a", adapter_name="x", key_env="sk-live-1234")
    with pytest.raises(PipelineError, match="field 'args.keep'"):
        templates.roll_version("roll", model="m", entry="o.e", keep=0)


def test_smoke_requests_travel_as_json() -> None:
    reqs = [{"path": "/v1/completions", "json": {"model": "{params.name}"}, "equals": {"model": "{params.name}"}}]
    s = templates.smoke("smoke", reqs, after=["deploy"])
    assert json.loads(str(s.args["requests"])) == reqs and s.args["key_env"] == "TANDEM_API_KEY" and not s.cache
    with pytest.raises(PipelineError, match=r"field 'args.requests\[0\]'"):
        templates.smoke("smoke", [{"json": {}}])
    with pytest.raises(PipelineError, match="field 'args.requests'"):
        templates.smoke("smoke", [])


def test_a_gated_pipeline_of_templates_validates() -> None:
    p = Pipeline(name="demo", params={"server": Param(default="http://x"), "min": Param(type="float", default=0.9)})
    p.add(templates.train("train", "fit.py", ["--out", "{outputs.model}"]))
    p.add(templates.evaluate("evaluate", "m:f", args={"model": "{inputs.model}"}, inputs={"model": "train.model"}))
    p.add(templates.deploy_adapter("deploy", adapter="train.model", adapter_name="a",
                                   when=templates.gate("evaluate", "accuracy", ">=", "{params.min}")))
    p.validate_dag()
    assert p.step("deploy").when == "{steps.evaluate.accuracy} >= {params.min}"
    assert ("evaluate", "deploy") in p.edges()
    with pytest.raises(PipelineError, match="operator"):
        templates.gate("evaluate", "accuracy", "=>", 1)


# -- the examples -----------------------------------------------------------------------------------------------------
def test_example_pipelines_define_their_dags() -> None:
    lora = load_pipeline(EXAMPLES / "lora.py")
    assert lora.order() == ["make-data", "train", "evaluate", "deploy", "smoke"]
    assert [(s.cron, s.timezone) for s in lora.schedules] == [("0 3 * * *", "UTC")]
    assert lora.step("deploy").when == "{steps.evaluate.accuracy} >= {params.threshold}"
    classifier = load_pipeline(EXAMPLES / "classifier.py")
    assert classifier.order() == ["make-data", "train", "optimize", "roll", "smoke"]
    assert (classifier.step("optimize").command or [])[:3] == ["tandem", "optimize", "{inputs.model}"]
    for pipe in (lora, classifier):
        for step in pipe.steps:
            assert ADMIN not in json.dumps(step.model_dump())


@pytest.mark.parametrize(("file", "kind"), [("lora.py", "cron"), ("classifier.py", "workflow")])
def test_example_pipelines_export_to_argo(file: str, kind: str) -> None:
    from tandem.pipeline.argo import dag_edges, export, to_yaml
    from tandem.pipeline.lint import validate_manifest

    pipe = load_pipeline(EXAMPLES / file)
    manifest = export(pipe, kind, params={"repo_dir": "/models"} if file == "classifier.py" else None)  # type: ignore[arg-type]
    validate_manifest(manifest)
    assert dag_edges(manifest) == pipe.edges()
    assert "TANDEM_ADMIN_KEY" in to_yaml(manifest)   # the variable's name travels, never a key
    if kind == "cron":
        assert manifest["spec"]["schedules"] == ["0 3 * * *"] and manifest["spec"]["timezone"] == "UTC"


def test_loading_an_example_imports_nothing_heavy() -> None:
    """The runner loads the file for every run, cached ones too: it must stay quick."""
    code = ("import sys; from tandem.pipeline.spec import load_pipeline; "
            f"[load_pipeline('{EXAMPLES}/' + f) for f in ('lora.py', 'classifier.py')]; "
            "heavy = sorted({'torch', 'transformers', 'peft', 'PIL', 'onnx'} & set(sys.modules)); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_shape_classes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """classifier.py names the classes without importing shapes_model (numpy, PIL); image_folder.py numbers the
    class folders in sorted order, so the served labels must be in sorted order too."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import classifier
    import shapes_model

    assert classifier.CLASSES == shapes_model.CLASSES == tuple(sorted(shapes_model.CLASSES))


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_write_and_read_metrics(tmp_path: Path) -> None:
    f = tmp_path / "m.json"
    assert write_metrics(f, {"accuracy": 0.5, "n": 3}) == {"accuracy": 0.5, "n": 3.0}
    assert read_metrics(f, ["accuracy"]) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="lacks metric"):
        read_metrics(f, ["loss"])
    with pytest.raises(ValueError, match="finite number"):
        write_metrics(f, {"accuracy": float("nan")})


def test_evaluate_command_wrapper_writes_result_files(tmp_path: Path) -> None:
    metrics, result = tmp_path / "m.json", tmp_path / "acc"
    script = f"import json; json.dump({{'accuracy': 0.97}}, open({str(metrics)!r}, 'w'))"
    assert evaluate_main(["--metrics-file", str(metrics), f"--result=accuracy={result}", "--",
                          sys.executable, "-c", script]) == 0
    assert float(result.read_text()) == 0.97
    assert evaluate_main(["--metrics-file", str(tmp_path / "none.json"), f"--result=accuracy={result}", "--",
                          sys.executable, "-c", "pass"]) == 1


# -- deploy against a fake server -------------------------------------------------------------------------------------
@dataclass
class Fake:
    """What the fake server was asked, and how it answers."""

    url: str = ""
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    adapters: set[str] = field(default_factory=set)
    versions: dict[str, str] = field(default_factory=dict)   # version -> state
    fail_load: bool = False
    allowed: Path | None = None   # the one adapter folder the server may read (None: any)


class Handler(JSONHandler):
    """The routes deploy.py calls, with Tandem's keys (admin, API) and statuses."""

    fake: Fake

    def _auth(self, admin: bool) -> bool:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if key == ADMIN or (key == API and not admin):
            return True
        self.send_json(403 if key == API else 401, {"error": "invalid API key"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.fake.calls.append(("GET", self.path, None))
        parts = self.path.strip("/").split("/")
        if self.path.startswith("/v2/models/") and parts[-1] == "ready":
            self.send_json(200 if self.fake.versions.get(parts[4]) == "READY" else 400, {})
        elif self.path == "/v1/models":
            self.send_json(200, {"data": [{"id": a} for a in sorted(self.fake.adapters | {"base"})]})
        else:
            self.send_json(200, {"ok": True})

    def do_POST(self) -> None:  # noqa: N802
        body = self.read_json()
        self.fake.calls.append(("POST", self.path, body))
        route = "load" if self.path.startswith("/v2/repository/models/") else self.path
        getattr(self, "_" + route.strip("/").replace("/", "_"))(body)

    def _v1_load_lora_adapter(self, body: Any) -> None:
        if self._auth(admin=True) and not body.get("lora_name"):
            self.send_json(400, {"error": "lora_name must be a non-empty string"})
        elif self._auth(admin=True) and self.fake.allowed and not Path(body["lora_path"]).is_relative_to(
                self.fake.allowed):
            self.send_json(400, {"error": f"lora_path {body['lora_path']!r} is outside the allowed adapter "
                                          "directories: adapters"})
        elif self._auth(admin=True):
            self.fake.adapters.add(body["lora_name"])
            self.send_json(200, {"status": "loaded", "lora_name": body["lora_name"], "load_ms": 1.5})

    def _v1_completions(self, body: Any) -> None:
        known = body["model"] in self.fake.adapters | {"base"}
        self.send_json(200 if known else 404, {"model": body["model"]} if known else {"error": "unknown"})

    def _v2_repository_index(self, body: Any) -> None:
        self.send_json(200, [{"name": "m", "version": v, "state": s} for v, s in self.fake.versions.items()])

    def _load(self, body: Any) -> None:
        if not self._auth(admin=True):
            return
        if self.fake.fail_load:
            self.send_json(400, {"error": "model 'm' failed to load: boom"})
        else:
            self.fake.versions = {"2": "READY"}
            self.send_json(200, {})

    def _echo(self, body: Any) -> None:
        if self._auth(admin=False):
            self.send_json(200, {"echo": body})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    state = Fake()
    with serving(type("Bound", (Handler,), {"fake": state})) as state.url:
        monkeypatch.setenv("TANDEM_ADMIN_KEY", ADMIN)
        monkeypatch.setenv("TANDEM_PIPELINE_STEP", "deploy")
        yield state


def _adapter(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_load_adapter_publishes_loads_and_waits(fake: Fake, tmp_path: Path) -> None:
    publish = tmp_path / "published"
    out = deploy.load_adapter(fake.url, _adapter(tmp_path / "a"), "sw", publish_dir=str(publish))
    path = Path(out["lora_path"])
    assert path.parent == publish / "sw" and (path / "adapter_model.safetensors").read_bytes() == b"w"
    assert out["adapter"] == "sw" and out["load_ms"] == "1.5"
    assert ("POST", "/v1/load_lora_adapter", {"lora_name": "sw", "lora_path": str(path)}) in fake.calls
    assert sum(1 for c in fake.calls if c[1] == "/v1/completions") >= 3   # answered three times in a row
    for i in range(2, 5):   # later versions: the newest two stay (the live one and a rollback target)
        deploy.load_adapter(fake.url, _adapter(tmp_path / f"a{i}", bytes([i])), "sw", publish_dir=str(publish))
    assert len([p for p in (publish / "sw").iterdir() if not p.name.startswith(".")]) == 2
    srv = deploy.load_adapter(fake.url, tmp_path / "a", "sw2", publish_dir=str(publish), server_dir="/srv/ads")
    assert srv["lora_path"].startswith("/srv/ads/sw2/")


def test_a_path_the_server_may_not_read_says_how_to_allow_it(fake: Fake, tmp_path: Path) -> None:
    fake.allowed = tmp_path / "served"
    adapter = _adapter(tmp_path / "store" / "a")
    with pytest.raises(deploy.DeployError) as err:   # the artifact itself: allow a folder holding it, or publish
        deploy.load_adapter(fake.url, adapter, "sw")
    msg = str(err.value)
    assert msg.startswith("step 'deploy', field 'args.publish_dir': the server cannot read ")
    assert "give publish_dir" in msg and "tandem serve --adapter-dir DIR" in msg and str(adapter) in msg
    with pytest.raises(deploy.DeployError) as err:   # a publish folder the server does not read
        deploy.load_adapter(fake.url, adapter, "sw", publish_dir=str(tmp_path / "elsewhere"))
    assert "publish_dir must be one of the entry's llm.adapter_dirs" in str(err.value)
    fake.allowed = tmp_path / "store"   # as `make serve` allows the local artifact store
    assert deploy.load_adapter(fake.url, adapter, "sw")["lora_path"] == str(adapter)


def test_the_same_adapter_again_is_not_reloaded(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish, adapter = tmp_path / "published", _adapter(tmp_path / "a")
    assert deploy.load_adapter(fake.url, adapter, "sw", publish_dir=str(publish))["reloaded"] == "true"
    loads = sum(1 for c in fake.calls if c[1] == "/v1/load_lora_adapter")
    assert deploy.load_adapter(fake.url, adapter, "sw", publish_dir=str(publish))["reloaded"] == "false"
    assert [c[2] for c in fake.calls if c[1] == "/v1/load_lora_adapter"][loads:] == [{}]   # only the key probe
    monkeypatch.setenv("TANDEM_ADMIN_KEY", "wrong")
    with pytest.raises(deploy.DeployError, match="field 'args.key_env'"):   # a refused key fails all the same
        deploy.load_adapter(fake.url, adapter, "sw", publish_dir=str(publish))


@pytest.mark.parametrize(("key", "says"), [("wrong", "did not accept"), (None, "is not set"),
                                           (API, "the API key, not the admin key")])
def test_a_refused_key_names_the_variable(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          key: str | None, says: str) -> None:
    if key is None:
        monkeypatch.delenv("TANDEM_ADMIN_KEY")
    else:
        monkeypatch.setenv("TANDEM_ADMIN_KEY", key)
    with pytest.raises(deploy.DeployError) as err:
        deploy.load_adapter(fake.url, _adapter(tmp_path / "a"), "sw")
    msg = str(err.value)
    assert msg.startswith("step 'deploy', field 'args.key_env': ") and "TANDEM_ADMIN_KEY" in msg and says in msg
    assert key is None or key not in msg


def test_an_unreachable_server_names_the_server_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_PIPELINE_STEP", "deploy")
    with pytest.raises(deploy.DeployError, match="field 'args.server'.*cannot reach"):
        deploy.load_adapter("http://127.0.0.1:1", _adapter(tmp_path / "a"), "sw")


def _entry(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text("# model\n")
    (folder / "tandem.yaml").write_text("name: other\nruntime: onnxruntime\n")
    return folder


def test_roll_version_adds_the_next_version_and_retires_the_old(fake: Fake, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _entry(repo / "m" / "1")
    fake.versions = {"1": "READY"}
    out = deploy.roll_version(fake.url, "m", _entry(tmp_path / "new"), repo)
    assert out["version"] == "2" and out["retired"].startswith("1-")
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["2"]
    settings = yaml.safe_load((repo / "m" / "2" / "tandem.yaml").read_text())
    assert settings == {"name": "m", "version": "2", "runtime": "onnxruntime"}
    assert (repo / ".tandem-retired" / "m" / out["retired"] / "model.py").is_file()
    assert not list((repo / ".tandem-staging").iterdir())
    assert ("POST", "/v2/repository/models/m/load", None) in fake.calls


def test_a_failed_roll_puts_the_repository_back(fake: Fake, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _entry(repo / "m" / "1")
    fake.versions, fake.fail_load = {"1": "READY"}, True
    with pytest.raises(deploy.DeployError, match="step 'deploy', field 'args.entry'.*boom"):
        deploy.roll_version(fake.url, "m", _entry(tmp_path / "new"), repo)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]
    with pytest.raises(deploy.DeployError, match="field 'args.version'"):
        deploy.roll_version(fake.url, "m", tmp_path / "new", repo, version="1")
    with pytest.raises(deploy.DeployError, match="field 'args.repo_dir'"):
        deploy.roll_version(fake.url, "m", tmp_path / "new", tmp_path / "nowhere")


def test_smoke_test_passes_or_lists_every_failure(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_API_KEY", API)
    body = tmp_path / "body.json"
    body.write_text('{"x": 1}')
    ok: list[dict[str, Any]] = [{"path": "/echo", "json": {"a": [1, 2]}, "equals": {"echo.a.1": 2}, "repeat": 2},
          {"path": "/echo", "body_file": str(body), "content_type": "application/json", "contains": '"x"'},
          {"path": "/v1/completions", "json": {"model": "nope"}, "status": 404}]
    assert deploy.smoke_test(fake.url, ok)["passed"] == "4"
    bad: list[dict[str, Any]] = [{"path": "/echo", "json": {"a": 1}, "equals": {"echo.a": 2}},
                                 {"path": "/v1/completions", "json": {"model": "nope"}}]
    with pytest.raises(deploy.DeployError, match=r"(?s)2 of 2 smoke requests failed.*echo.a is 1, want 2.*"
                                                 r"status 404 \(want 200\)"):
        deploy.smoke_test(fake.url, bad)
    monkeypatch.setenv("TANDEM_API_KEY", "wrong")
    with pytest.raises(deploy.DeployError, match="field 'args.key_env'.*TANDEM_API_KEY"):
        deploy.smoke_test(fake.url, ok[:1])


def test_a_function_step_gets_its_requests_from_json(fake: Fake, tmp_path: Path) -> None:
    """As the runner starts it: `python -m tandem.pipeline.call` converts the JSON argument to a list."""
    request = {"path": "/v1/completions", "json": {"model": "base"}, "equals": {"model": "base"}}
    step = templates.smoke("smoke", [request], server=fake.url, key_env="TANDEM_ADMIN_KEY")
    argv = [sys.executable, "-m", "tandem.pipeline.call", str(step.function), "--results-dir", str(tmp_path)]
    argv += [a for k, v in step.args.items() for a in ("--arg", f"{k}={v}")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "passed").read_text() == "1"


def test_make_serve_allows_the_artifact_store_pipeline_runs_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's lora command deploys into `make serve` only if the two agree on where artifacts live."""
    from tandem.pipeline.runner import default_home
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_PIPELINE_HOME", "MAKEFLAGS")}
    lines = subprocess.run(["make", "-n", "-s", "serve"], cwd=root, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    serve = next(line for line in lines if " serve " in line + " ")
    monkeypatch.chdir(root)
    monkeypatch.delenv("TANDEM_PIPELINE_HOME", raising=False)
    assert f"--adapter-dir '{default_home() / 'artifacts'}'" in serve, lines
