"""The onnx-ir pass and the Olive pass, run by the real libraries on a real model, give the
same model as the CLI with the same options."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from real_models import fetch

MODEL = "rapidocr_cls_ppocr_mobile_v2.onnx"  # Paddle export: weights in Constant nodes
OPTIONS = {"filters": 0.3, "importance": "l1", "round_to": 4}


@pytest.fixture(scope="module")
def cli_pruned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "cli.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(fetch(MODEL)), "--filters", "0.3", "--importance",
                           "l1", "--round-to", "4", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return onnx.load(str(out))


def _weights(model: onnx.ModelProto) -> dict:
    """Every constant by name (initializers and Constant nodes), as arrays."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def assert_same_model(a: onnx.ModelProto, b: onnx.ModelProto):
    """Same nodes and same weights, whether a weight is stored as an initializer or a Constant
    node (Olive's output writer turns Constant nodes into initializers)."""
    def nodes(m):
        return [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node if n.op_type != "Constant"]

    assert nodes(a) == nodes(b)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


@pytest.mark.slow
def test_onnx_ir_pass_in_a_pass_manager_gives_the_cli_model(cli_pruned):
    ir = pytest.importorskip("onnx_ir")
    from onnx_ir.passes import PassManager
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from onnxprune.integrations.onnx_ir import PrunePass, PrunePassResult

    source = ir.load(str(fetch(MODEL)))
    before = ir.to_proto(source)
    prune_pass = PrunePass(**OPTIONS)
    result = prune_pass(source)
    assert isinstance(result, PrunePassResult) and result.modified and result.model is not source
    assert result.report["summary"]["channels_removed"] > 0
    assert result.report["verification"]["onnxruntime"] == "passed"
    assert ir.to_proto(source) == before  # functional: the input model is left as it was
    assert_same_model(ir.to_proto(result.model), cli_pruned)
    # Beside the library's own passes, in its pass manager.
    managed = PassManager([RemoveUnusedNodesPass(), PrunePass(**OPTIONS)])(ir.load(str(fetch(MODEL))))
    assert_same_model(ir.to_proto(managed.model), cli_pruned)


def test_onnx_ir_pass_checks_its_options_when_made():
    pytest.importorskip("onnx_ir")
    from onnxprune import OptionError
    from onnxprune.integrations.onnx_ir import PrunePass

    with pytest.raises(OptionError, match="filters=1.5: must be in"):
        PrunePass(filters=1.5)
    with pytest.raises(OptionError, match="no_such_option"):
        PrunePass(no_such_option=1)


@pytest.mark.slow
def test_olive_workflow_runs_the_pass_beside_olives_own(cli_pruned, tmp_path):
    pytest.importorskip("olive")
    model = tmp_path / MODEL
    model.write_bytes(fetch(MODEL).read_bytes())
    # Olive sends telemetry unless told it runs in CI; nothing here may reach the network.
    code = f"""
import olive.workflows
from onnxprune.integrations.olive import package_config

def config(output, **more):  # Olive rewrites the dict it is given: a fresh one per run
    return {{"input_model": {{"type": "ONNXModel", "model_path": {str(model)!r}}},
             "passes": {{"prune": {{"type": "OnnxPrune", "filters": 0.3, "importance": "l1", "round_to": 4}}, **more}},
             "output_dir": output, "cache_dir": {str(tmp_path / "cache")!r}, "log_severity_level": 3}}

assert olive.workflows.run(config({str(tmp_path / "out")!r}), package_config=package_config()).has_output_model()
peephole = {{"type": "OnnxPeepholeOptimizer", "onnxoptimizer_optimize": False}}
chained = config({str(tmp_path / "chained")!r}, peephole=peephole)
assert olive.workflows.run(chained, package_config=package_config()).has_output_model()
"""
    env = dict(os.environ, CI="1", OLIVE_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_model(onnx.load(str(tmp_path / "out" / "model.onnx")), cli_pruned)
    report = (tmp_path / "out" / "onnxprune_report.json")
    assert report.exists() and '"channels_removed"' in report.read_text()
    chained = onnx.load(str(tmp_path / "chained" / "model.onnx"))
    onnx.checker.check_model(chained)
    assert sum(t.ByteSize() for t in chained.graph.initializer) < fetch(MODEL).stat().st_size
