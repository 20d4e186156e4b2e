"""The command line: the main job, reports and plans, and one-line errors for bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny_resnet.onnx"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "tiny.onnx"
    shutil.copy(FIXTURE, path)
    return path


def test_main_job_writes_pruned_model_next_to_input(model):
    before = model.read_bytes()
    proc = run_cli(model, "--filters", "0.3")
    assert proc.returncode == 0, proc.stderr
    out = model.with_name("tiny.pruned.onnx")
    assert out.exists() and out.stat().st_size < model.stat().st_size
    assert model.read_bytes() == before
    for label in ("params", "MACs", "file size", "ORT latency", "groups:"):
        assert label in proc.stdout


def test_report_plan_and_apply_plan_round_trip(model, tmp_path):
    report, plan, out1, out2 = (tmp_path / n for n in ("r.json", "p.json", "a.onnx", "b.onnx"))
    proc = run_cli(model, "--filters", "0.4", "-o", out1, "--report", report, "--plan", plan, "--importance", "l1")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    for key in ("params", "macs", "file_bytes", "latency_ms"):
        assert set(data[key]) == {"before", "after"}
        assert data[key]["after"] <= data[key]["before"] or key == "latency_ms"
    assert data["groups"] and all({"members", "channels_before", "channels_after", "removed"} <= set(g) for g in data["groups"])
    assert all({"reason", "nodes"} <= set(s) for s in data["skipped"])
    assert data["criterion"] == "l1"
    proc = run_cli(model, "--apply-plan", plan, "-o", out2)
    assert proc.returncode == 0, proc.stderr
    assert out1.read_bytes() == out2.read_bytes()


def test_dry_run_writes_no_model(model):
    proc = run_cli(model, "--filters", "0.3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not model.with_name("tiny.pruned.onnx").exists()


@pytest.mark.parametrize("args,needle", [
    (["--filters", "1.5"], "--filters"),
    (["--filters", "-0.1"], "--filters"),
    (["--filters", "abc"], "--filters"),
    (["--filters", "0.3", "--importance", "magic"], "--importance"),
    (["--filters", "0.3", "--round-to", "0"], "--round-to"),
    (["--filters", "0.3", "--input-shape", "input:1,x"], "--input-shape"),
    (["--filters", "0.3", "--input-shape", "nope:1,3,32,32"], "nope"),
    ([], "--filters"),
    (["--filters", "0.3", "--bogus"], "--bogus"),
])
def test_bad_flags_give_one_line_and_nonzero_exit(model, args, needle):
    proc = run_cli(model, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not model.with_name("tiny.pruned.onnx").exists()


def test_bad_files(tmp_path, model):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a model at all" * 10)
    cases = [(junk, "not an ONNX model"), (tmp_path / "missing.onnx", "no such file"), (tmp_path, "directory")]
    for path, needle in cases:
        proc = run_cli(path, "--filters", "0.3")
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
    assert junk.read_bytes().startswith(b"\x00\xffnot")


def test_refuses_to_overwrite_input(model):
    before = model.read_bytes()
    proc = run_cli(model, "--filters", "0.3", "-o", model)
    assert proc.returncode != 0 and "overwrite" in proc.stderr
    assert model.read_bytes() == before


def test_input_shape_fixes_dynamic_dims(tmp_path):
    import onnx

    m = onnx.load(str(FIXTURE))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dyn.onnx"
    onnx.save(m, str(path))
    proc = run_cli(path, "--filters", "0.3", "--input-shape", "input:2,3,32,32", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["input_shapes"] == {"input": [2, 3, 32, 32]}


def test_model_from_a_newer_onnx_is_refused_in_one_line(tmp_path):
    import onnx

    m = onnx.load(str(FIXTURE))
    m.ir_version = 99
    path = tmp_path / "future.onnx"
    onnx.save(m, str(path))
    proc = run_cli(path, "--filters", "0.3")
    assert proc.returncode == 2 and "IR version 99" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_binary_plan_file_is_a_one_line_error(tmp_path, capsys):
    from onnxprune.cli import main

    bad = tmp_path / "plan.json"
    bad.write_bytes(bytes(range(256)))
    assert main(["fixtures/tiny_resnet.onnx", "--apply-plan", str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxprune: error: --apply-plan") and err.count("\n") == 1
