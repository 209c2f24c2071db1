"""precision.yaml round trip, re-applying a plan to a re-exported model, and the doctor's report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tandem.errors import OptimizeError
from tandem.optimize.plan import (
    PrecisionPlan,
    node_keys,
    read_precision_yaml,
    resolve_nodes,
    write_precision_yaml,
)
from tandem.optimize.report import write_report
from tandem.optimize.types import (
    Fp32Node,
    NodeError,
    OutputError,
    PrecisionResult,
    SearchStep,
    Timing,
    Tolerance,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model() -> onnx.ModelProto:
    """x -> MatMul(W0) -> Relu -> MatMul(W1) -> Relu -> MatMul(W2) -> Add(Constant bias) -> y."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"W{i}") for i in range(3)]
    bias = numpy_helper.from_array(np.ones(4, np.float32), "bias_value")
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
        helper.make_node("Relu", ["a"], ["b"], name="relu0"),
        helper.make_node("MatMul", ["b", "W1"], ["c"], name="mm1"),
        helper.make_node("Relu", ["c"], ["d"], name="relu1"),
        helper.make_node("MatMul", ["d", "W2"], ["e"], name="mm2"),
        helper.make_node("Constant", [], ["bias"], name="const0", value=bias),
        helper.make_node("Add", ["e", "bias"], ["y"], name="add0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _rename_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A re-export: every node gets a new name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):
        node.name = f"/export/{node.op_type}_{i + 100}"
    return out


def _rename_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A re-export that also renames the weights (initializers and Constant outputs)."""
    out = _rename_nodes(model)
    new = {t.name: f"onnx::{t.name}_renamed" for t in out.graph.initializer}
    new.update({o: f"{o}_renamed" for n in out.graph.node if n.op_type == "Constant" for o in n.output})
    for t in out.graph.initializer:
        t.name = new[t.name]
    for node in out.graph.node:
        node.input[:] = [new.get(i, i) for i in node.input]
        node.output[:] = [new.get(o, o) for o in node.output]
    onnx.checker.check_model(out)
    return out


def _fp32_nodes(model: onnx.ModelProto, names: list[str]) -> list[Fp32Node]:
    """The doctor's way of filling Fp32Node: keys from node_keys."""
    out = []
    for name, (op, ordinal, weights) in zip(names, node_keys(model, names)):
        out.append(Fp32Node(name=name, op_type=op, reason="largest growth", error_before=0.123456789,
                            error_after=0.00123, ordinal=ordinal, weights=weights))
    return out


def _result(model: onnx.ModelProto) -> PrecisionResult:
    names = ["mm0", "relu0", "mm1", "relu1", "mm2", "const0", "add0"]
    errors = [0.01, 0.0, 0.03, 0.02, 0.2, 0.0, 0.19]
    node_errors = [
        NodeError(name=n, op_type=model.graph.node[i].op_type, index=i, error=errors[i],
                  growth=errors[i] - (errors[i - 1] if i else 0.0), candidate=model.graph.node[i].op_type == "MatMul")
        for i, n in enumerate(names)
    ]
    return PrecisionResult(
        target="int8-dynamic", provider="CPUExecutionProvider",
        tolerance=Tolerance(atol=1e-3, rtol=2e-2, stat="median"), met=True,
        fp32_nodes=_fp32_nodes(model, ["mm2", "add0"]), excluded_ops=["Softmax"],
        outputs=[OutputError(name="y", abs_err=0.000412345678, rel_err=0.0123, max_abs=0.05, passed=True,
                             cosine_mean=0.99991, cosine_min=0.9987)],
        node_errors=node_errors, candidates=3,
        search=[SearchStep(k=1, passed=False, worst=1.7, seconds=0.5), SearchStep(k=2, passed=True, worst=0.4,
                                                                                  seconds=0.52)],
        fp32_timing=Timing(batch=8, latency_ms=2.0, throughput=1000.0),
        timing=Timing(batch=8, latency_ms=1.0, throughput=2500.0),
        versions={"onnxruntime": "1.20.0", "onnx": onnx.__version__}, wall_s=3.25, instrumented_s=0.75,
        verified_fp32=True, note="kept 2 nodes in FP32",
    )


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return _model()


def test_node_keys_give_op_ordinal_and_weights(model: onnx.ModelProto) -> None:
    assert node_keys(model, ["mm0", "mm2", "relu1", "add0"]) == [
        ("MatMul", 0, ["W0"]), ("MatMul", 2, ["W2"]), ("Relu", 1, []), ("Add", 0, ["bias"]),
    ]
    with pytest.raises(OptimizeError, match="nope"):
        node_keys(model, ["nope"])


def test_yaml_round_trip(model: onnx.ModelProto, tmp_path: Path) -> None:
    result = _result(model)
    path = tmp_path / "precision.yaml"
    write_precision_yaml(result, path, model_path="model.onnx", source="torch:tiny")
    text = path.read_text()
    assert text.startswith("#") and "tandem optimize MODEL --plan precision.yaml" in text.splitlines()[1]
    data = yaml.safe_load(text)
    assert list(data)[:4] == ["target", "provider", "tolerance", "met"]
    assert data["tolerance"] == {"atol": 0.001, "rtol": 0.02, "check_error_stat": "median"}
    assert data["outputs"][0]["abs_err"] == 0.000412346  # 6 significant digits
    assert data["timing"]["speedup"] == 2.5 and data["timing"]["fp32"]["throughput"] == 1000.0
    assert data["search"]["verification_runs"] == 2 and len(data["search"]["steps"]) == 2
    assert (data["model"], data["source"], data["verified_fp32"]) == ("model.onnx", "torch:tiny", True)
    assert data["versions"]["onnxruntime"] == "1.20.0"

    plan = read_precision_yaml(path)
    assert isinstance(plan, PrecisionPlan)
    assert plan.target == "int8-dynamic" and plan.tolerance == result.tolerance
    assert plan.excluded_ops == ["Softmax"]
    assert [(n.name, n.op_type, n.ordinal, n.weights, n.reason) for n in plan.fp32_nodes] == [
        ("mm2", "MatMul", 2, ["W2"], "largest growth"), ("add0", "Add", 0, ["bias"], "largest growth"),
    ]
    assert plan.fp32_nodes[0].error_before == pytest.approx(0.123457) and plan.fp32_nodes[0].error_after == 0.00123


def test_resolve_by_name(model: onnx.ModelProto) -> None:
    nodes = _fp32_nodes(model, ["mm1", "add0"])
    nodes[0].ordinal = 0  # a wrong ordinal must not win over the name
    nodes[0].weights = ["W0"]  # nor wrong weights
    assert resolve_nodes(model, nodes) == (["mm1", "add0"], [])


def test_resolve_by_weights_after_renaming_nodes(model: onnx.ModelProto) -> None:
    nodes = _fp32_nodes(model, ["mm1", "add0"])
    nodes[0].ordinal = 0  # the weights, not the ordinal, must decide
    renamed = _rename_nodes(model)
    assert resolve_nodes(renamed, nodes) == (["/export/MatMul_102", "/export/Add_106"], [])


def test_resolve_by_ordinal_after_renaming_weights(model: onnx.ModelProto) -> None:
    nodes = _fp32_nodes(model, ["mm2", "relu1", "add0"])
    renamed = _rename_weights(model)
    assert resolve_nodes(renamed, nodes) == (["/export/MatMul_104", "/export/Relu_103", "/export/Add_106"], [])


def test_unmatched_entries_are_described(model: onnx.ModelProto) -> None:
    nodes = [
        Fp32Node(name="conv_gone", op_type="Conv", reason="", error_before=0.0, ordinal=0, weights=["K"]),
        Fp32Node(name="mm9", op_type="MatMul", reason="", error_before=0.0, ordinal=9),
        *_fp32_nodes(model, ["relu0"]),
    ]
    matched, unmatched = resolve_nodes(_rename_weights(model), nodes)
    assert matched == ["/export/Relu_101"]
    assert len(unmatched) == 2
    assert "conv_gone" in unmatched[0] and "Conv" in unmatched[0] and "K" in unmatched[0]
    assert "mm9" in unmatched[1] and "#9" in unmatched[1]


def test_a_model_node_is_matched_once(model: onnx.ModelProto) -> None:
    twice = _fp32_nodes(model, ["mm0"]) * 2
    assert resolve_nodes(model, twice) == (["mm0"], [twice[1].name + " (MatMul #0, weights: W0)"])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "precision.yaml"
    path.write_text(text)
    return path


def test_read_errors_name_the_problem(model: onnx.ModelProto, tmp_path: Path) -> None:
    with pytest.raises(OptimizeError, match="does not exist"):
        read_precision_yaml(tmp_path / "missing.yaml")
    with pytest.raises(OptimizeError, match="not valid YAML"):
        read_precision_yaml(_write(tmp_path, "target: [int8\nfp32_nodes: {"))
    with pytest.raises(OptimizeError, match="mapping"):
        read_precision_yaml(_write(tmp_path, "- a\n- b\n"))

    path = tmp_path / "good.yaml"
    write_precision_yaml(_result(model), path, model_path="m.onnx", source="onnx")
    good = yaml.safe_load(path.read_text())
    cases = [
        (lambda d: d.pop("target"), r"`target`"),
        (lambda d: d["tolerance"].pop("atol"), r"`tolerance\.atol`"),
        (lambda d: d["tolerance"].update(check_error_stat="p99"), r"`tolerance\.check_error_stat`"),
        (lambda d: d.update(fp32_nodes="mm0"), r"`fp32_nodes`"),
        (lambda d: d["fp32_nodes"][1].pop("op_type"), r"`fp32_nodes\[1\]\.op_type`"),
        (lambda d: d["fp32_nodes"][0].update(ordinal="two"), r"`fp32_nodes\[0\]\.ordinal`.*integer.*str"),
        (lambda d: d["fp32_nodes"][0].update(weights=[1, 2]), r"`fp32_nodes\[0\]\.weights`"),
        (lambda d: d["tolerance"].update(rtol=True), r"`tolerance\.rtol`"),
    ]
    for change, message in cases:
        data = yaml.safe_load(yaml.safe_dump(good))
        change(data)
        with pytest.raises(OptimizeError, match=message):
            read_precision_yaml(_write(tmp_path, yaml.safe_dump(data)))


def test_plan_without_optional_fields(tmp_path: Path, model: onnx.ModelProto) -> None:
    text = "target: fp16\ntolerance: {atol: 0.01, rtol: 0.1}\nfp32_nodes:\n- {name: mm1, op_type: MatMul}\n"
    path = _write(tmp_path, text)
    plan = read_precision_yaml(path)
    assert plan.tolerance == Tolerance(atol=0.01, rtol=0.1, stat="mean") and plan.excluded_ops == []
    assert plan.fp32_nodes[0].ordinal == -1  # no ordinal: never matched by position
    assert resolve_nodes(_rename_nodes(model), plan.fp32_nodes) == ([], ["mm1 (MatMul #-1, weights: none)"])


def test_write_report(model: onnx.ModelProto, tmp_path: Path) -> None:
    result = _result(model)
    md, png = write_report(result, tmp_path / "report", title="Precision report: tiny")
    assert (md.name, png.name) == ("report.md", "node_errors.png")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and 5_000 < len(data) < 300_000
    text = md.read_text()
    assert text.startswith("# Precision report: tiny")
    for piece in [
        "int8-dynamic", "CPUExecutionProvider", "median abs ≤ 0.001 or rel ≤ 0.02", "kept 2 nodes in FP32",
        "| output | abs err |", "| `y` | 0.0004123 | 0.0123 |",  # outputs table
        "| fp32 | 2 | 8 | 1000 |", "| int8-dynamic | 1 | 8 | 2500 |", "2.50×",  # timings
        "| `mm2` | MatMul | largest growth | 0.1235 → 0.00123 |", "| `add0` | Add |",  # FP32 nodes
        "| 1 | no | 1.7 | 0.50 |", "| 2 | yes | 0.4 | 0.52 |", "2 verification runs", "instrumented pass 0.8 s",
        "| node | op | error | growth |", "onnxruntime: 1.20.0", "![per-node error](node_errors.png)",
    ]:
        assert piece in text, piece
    ranking = text.split("by error growth")[1].split("## Versions")[0]
    order = [ranking.index(f"`{n}`") for n in ["add0", "mm2", "mm1", "mm0"]]
    assert order == sorted(order)  # by growth, descending


def test_report_without_measurements(tmp_path: Path) -> None:
    result = PrecisionResult(
        target="fp16", provider="CUDAExecutionProvider", tolerance=Tolerance(), met=False, fp32_nodes=[],
        excluded_ops=[], outputs=[], node_errors=[], candidates=0, search=[], note="no float nodes",
    )
    md, png = write_report(result, tmp_path, title="empty")
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = md.read_text()
    assert "**not met**" in text and "no float nodes" in text and "Throughput speedup over FP32: –" in text
