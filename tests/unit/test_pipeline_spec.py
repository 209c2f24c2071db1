"""Pipeline definitions: every mistake names the step and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.pipeline.spec import Outputs, Param, Pipeline, PipelineError, Step, from_dict, load_pipeline


def _raw(*steps: dict[str, object], **extra: object) -> dict[str, object]:
    return {"name": "p", "steps": list(steps), **extra}


GOOD_MAKE = {"name": "make", "command": ["sh", "-c", "echo > {outputs.data}"], "outputs": {"artifacts": ["data"]}}


@pytest.mark.parametrize(("raw", "step", "field", "words"), [
    (_raw({"name": "a", "command": ["x"], "after": ["nope"]}), "a", "after", "unknown step 'nope'"),
    (_raw(GOOD_MAKE, {"name": "use", "command": ["cat", "{inputs.d}"], "inputs": {"d": "make.dat"}}),
     "use", "inputs.d", "artifact 'dat' is never produced by step 'make' (it produces: data)"),
    (_raw({"name": "use", "command": ["x"], "inputs": {"d": "ghost.data"}}), "use", "inputs.d", "unknown step"),
    (_raw({"name": "a", "command": ["echo", "{params.lr}"]}), "a", "command[1]", "no pipeline parameter 'lr'"),
    (_raw({"name": "a", "command": ["echo", "{outputs.model}"]}), "a", "command[1]", "no output artifact"),
    (_raw({"name": "a", "command": ["echo", "{results.acc}"]}), "a", "command[1]", "no output parameter"),
    (_raw(GOOD_MAKE, {"name": "b", "command": ["echo", "{steps.make.acc}"]}), "b", "command[1]",
     "step 'make' has no output parameter 'acc'"),
    (_raw({"name": "a", "command": ["x"], "when": "accuracy is high"}), "a", "when", "LEFT OP RIGHT"),
    (_raw({"name": "a"}), "a", "command", "exactly one of 'command'"),
    (_raw({"name": "a", "command": ["x"], "function": "m:f"}), "a", "command", "exactly one of"),
    (_raw({"name": "a", "command": ["x"]}, {"name": "a", "command": ["y"]}), "a", "name", "duplicate"),
    (_raw({"name": "Bad_Name", "command": ["x"]}), "Bad_Name", "name", "pattern"),
    (_raw({"name": "a", "command": ["x"], "retry": {"limit": -1}}), "a", "retry.limit", "greater than"),
    (_raw({"name": "a", "command": ["x"], "resources": {"memory": "lots"}}), "a", "resources.memory", "pattern"),
    (_raw({"name": "a", "command": ["x"], "resorces": {}}), "a", "resorces", "Extra inputs"),
])
def test_each_mistake_names_step_and_field(raw: dict[str, object], step: str, field: str, words: str) -> None:
    with pytest.raises(PipelineError) as info:
        from_dict(raw)
    assert info.value.step == step and info.value.field == field, str(info.value)
    assert words in str(info.value)


def test_cycle_is_named() -> None:
    raw = _raw({"name": "a", "command": ["x"], "after": ["c"]}, {"name": "b", "command": ["x"], "after": ["a"]},
               {"name": "c", "command": ["x"], "after": ["b"]})
    with pytest.raises(PipelineError, match=r"cycle: (a -> c -> b -> a|b -> a -> c -> b|c -> b -> a -> c)"):
        from_dict(raw)


def test_edges_come_from_after_inputs_and_step_values() -> None:
    pipe = from_dict(_raw(
        GOOD_MAKE,
        {"name": "score", "command": ["sh", "-c", "echo 1 > {results.acc}"], "inputs": {"d": "make.data"},
         "outputs": {"params": ["acc"]}},
        {"name": "ship", "command": ["echo", "x"], "when": "{steps.score.acc} >= 0.5"},
        {"name": "tell", "command": ["echo"], "after": ["make"]}))
    assert pipe.edges() == {("make", "score"), ("score", "ship"), ("make", "tell")}
    assert pipe.order() == ["make", "score", "tell", "ship"]


def test_params_are_coerced_and_unknown_or_bad_ones_refused() -> None:
    pipe = Pipeline(name="p", params={"n": Param(type="int", default=3), "on": Param(type="bool", default=True),
                                      "x": Param(type="float")})
    assert pipe.resolve_params({"n": "7", "on": "no", "x": "0.5"}) == {"n": 7, "on": False, "x": 0.5}
    with pytest.raises(PipelineError, match="parameter 'x' has no default"):
        pipe.resolve_params({})
    with pytest.raises(PipelineError, match="must be int, got 'seven'"):
        pipe.resolve_params({"n": "seven", "x": 1})
    with pytest.raises(PipelineError, match=r"unknown parameter\(s\) \['typo'\]"):
        pipe.resolve_params({"typo": 1, "x": 1})


def count_lines(path: str) -> dict[str, int]:
    return {"n": len(Path(path).read_text().splitlines())}


def test_python_builder_and_decorator() -> None:
    pipe = Pipeline(name="p")
    pipe.add(Step(name="make", command=["true"], outputs=Outputs(artifacts=["data"])))
    pipe.function(inputs={"data": "make.data"}, args={"path": "{inputs.data}"},
                  outputs=Outputs(params=["n"]))(count_lines)
    assert pipe.step("count-lines").function == f"{__name__}:count_lines"
    with pytest.raises(PipelineError, match="already exists"):
        pipe.add(Step(name="make", command=["true"]))
    pipe.validate_dag()

    def local() -> None:
        pass

    with pytest.raises(PipelineError, match="must be a module-level function"):
        pipe.function()(local)


def test_load_reports_files_that_are_not_pipelines(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: p\nsteps: [\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_pipeline(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(PipelineError, match="must hold a mapping"):
        load_pipeline(tmp_path / "list.yaml")
    (tmp_path / "nopipe.py").write_text("x = 1\n")
    with pytest.raises(PipelineError, match="module-level `pipeline"):
        load_pipeline(tmp_path / "nopipe.py")
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(tmp_path / "missing.yaml")
    good = tmp_path / "ok.yaml"
    good.write_text("name: p\nsteps: [{name: a, command: [echo, hi]}]\n")
    assert load_pipeline(good).workdir == str(tmp_path.resolve())


def test_the_readme_pipeline_is_valid() -> None:
    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("# nightly.yaml\n", 1)[1].split("```", 1)[0]
    pipe = from_dict(yaml.safe_load(block))
    assert pipe.edges() == {("make-data", "train"), ("train", "evaluate"), ("make-data", "evaluate"),
                            ("evaluate", "deploy")}
    assert pipe.step("train").retry.on == ["infra"] and pipe.step("deploy").cache is False
