"""The fault tier: bad input, careless paths and interrupted runs, each refused or survived.

Every case asserts what the README promises: exit code 2 and one line on stderr naming the
flag, file, node or tensor at fault, never a traceback; the input and every other file that
was there before left byte for byte as they were; and where a model is written, it passes the
onnx checker and runs in onnxruntime with finite outputs wherever the input's are finite.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from textmodel import text_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny_resnet.onnx"


# -- helpers ----------------------------------------------------------------------------------

def run(*args) -> tuple[int, str, str]:
    """main() in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict:
    """Every regular file under `folder` with its bytes (links followed once, by path)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_refused(result, needle: str, before: dict | None = None, folder: Path | None = None):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and "[W]" not in out and "[C]" not in out
    if before is not None:
        assert snapshot(folder) == before, "a file was changed or created by a refused run"
    if folder is not None:
        assert not [p for p in folder.rglob(".onnxprune-*")], "staging files left behind"


def assert_valid_output(path: Path, original: Path | None = None):
    """Checker + onnxruntime pass; non-finite outputs only where the original has them."""
    import onnxruntime as ort

    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import concrete_input_shapes

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    shapes, _ = concrete_input_shapes(model, {})
    feeds = random_inputs(model, shapes, 7)
    want = None
    if original is not None:
        try:
            want = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)
        except Exception:  # the input itself does not run (a custom op, say): the checker is all there is
            return
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for i, value in enumerate(got):
        value = np.asarray(value)
        if value.dtype.kind != "f":
            continue
        finite_before = np.ones(value.shape, bool) if want is None else np.isfinite(np.asarray(want[i]))
        assert np.isfinite(value)[finite_before].all(), f"output {i} has NaN/inf where the original is finite"


@pytest.fixture
def work(tmp_path):
    model = tmp_path / "in.onnx"
    shutil.copy(FIXTURE, model)
    return tmp_path, model


def _mlp(hidden=8, w1=None):
    return text_model("""
    g (float[2,4] x) => (float[2,3] y) {
      h = MatMul(x, W1)
      r = Relu(h)
      y = MatMul(r, W2)
    }""", {"W1": (4, hidden) if w1 is None else w1, "W2": (hidden, 3)})


# -- special files ----------------------------------------------------------------------------

def test_input_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.onnx"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, needle in ((fifo, "FIFO"), (Path("/dev/zero"), "character device"), (sock_path, "socket"),
                             (tmp_path, "directory")):
            # a subprocess with a timeout: a regression would block (FIFO) or eat memory (/dev/zero)
            proc = subprocess.run([sys.executable, "-m", "onnxprune", str(path), "--filters", "0.3"],
                                  capture_output=True, text=True, timeout=120)
            assert_refused((proc.returncode, proc.stdout, proc.stderr), needle)
    finally:
        sock.close()


def _special_targets(tmp_path: Path) -> list[tuple[Path, str]]:
    fifo = tmp_path / "out_fifo.json"
    os.mkfifo(fifo)
    folder = tmp_path / "out_dir.json"
    folder.mkdir()
    targets = [(fifo, "FIFO"), (folder, "directory")]
    device = tmp_path / "null_device.json"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null, ours to lose
        targets.append((device, "character device"))
    except (PermissionError, OSError):
        pass  # not root: the FIFO and the folder stand for special files
    return targets


@pytest.mark.parametrize("flag", ["-o", "--report", "--plan"])
def test_outputs_never_replace_special_files(work, flag):
    tmp_path, model = work
    place = tmp_path / "special"
    place.mkdir()
    for target, needle in _special_targets(place):
        before = snapshot(tmp_path)
        kind = os.stat(target).st_mode
        args = [model, "--filters", "0.3", flag, target]
        if flag != "-o":
            args += ["-o", tmp_path / "out.onnx"]
        assert_refused(run(*args), needle, before, tmp_path)
        assert os.stat(target).st_mode == kind, "the special file was replaced"


def test_sensitivity_outputs_never_replace_special_files(work):
    tmp_path, model = work
    (tmp_path / "s").mkdir()
    for target, needle in _special_targets(tmp_path / "s"):
        before = snapshot(tmp_path)
        assert_refused(run("sensitivity", model, "--table", target, "--max-groups", "1"), needle, before, tmp_path)


# -- paths that alias each other --------------------------------------------------------------

def _external_model(folder: Path) -> Path:
    folder.mkdir()
    onnx.save(onnx.load(str(FIXTURE)), str(folder / "model.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    return folder / "model.onnx"


def test_no_output_lands_on_a_file_the_run_reads_or_on_another_output(work):
    tmp_path, model = work
    ext = _external_model(tmp_path / "ext")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    plan = tmp_path / "plan.json"
    assert run(model, "--filters", "0.3", "--plan", plan, "-o", tmp_path / "first.onnx")[0] == 0
    (tmp_path / "sub").mkdir()
    os.symlink(model, tmp_path / "link.onnx")
    os.symlink(model, tmp_path / "link.json")
    os.link(model, tmp_path / "hard.onnx")
    cases = [
        ([model, "--filters", "0.3", "--report", model], "--report"),
        ([model, "--filters", "0.3", "--plan", model], "--plan"),
        ([model, "--filters", "0.3", "-o", model], "input model"),
        ([model, "--filters", "0.3", "-o", tmp_path / "sub" / ".." / "in.onnx"], "input model"),
        ([model, "--filters", "0.3", "-o", tmp_path / "link.onnx"], "input model"),
        ([model, "--filters", "0.3", "-o", tmp_path / "hard.onnx"], "input model"),
        ([tmp_path / "link.onnx", "--filters", "0.3", "-o", model], "input model"),
        ([ext, "--filters", "0.3", "-o", ext.parent / "weights.bin"], "external data"),
        ([ext, "--filters", "0.3", "--report", ext.parent / "weights.bin"], "external data"),
        ([model, "--filters", "0.3", "--report", tmp_path / "o.onnx", "-o", tmp_path / "o.onnx"], "same file"),
        ([model, "--filters", "0.3", "--report", tmp_path / "r.json", "--plan", tmp_path / "r.json"], "same file"),
        ([model, "--apply-plan", plan, "--plan", plan], "--apply-plan"),
        ([model, "--filters", "0.3", "--calib", calib, "-o", calib], "--calib"),
        ([model, "--filters", "0.3", "--calib", calib, "--report", calib], "--calib"),
        (["sensitivity", model, "--table", model], "--table"),
        (["sensitivity", model, "--table", tmp_path / "link.json"], "model"),
    ]
    before = snapshot(tmp_path)
    for args, needle in cases:
        assert_refused(run(*args), needle, before, tmp_path)


def test_relative_paths_are_compared_by_what_they_point_to(work, monkeypatch):
    tmp_path, model = work
    (tmp_path / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "deeper")
    before = snapshot(tmp_path)
    assert_refused(run("../in.onnx", "--filters", "0.3", "--report", "./../in.onnx"), "input model", before, tmp_path)


# -- non-finite values ------------------------------------------------------------------------

def test_calibration_data_with_nan_is_refused_naming_file_input_and_sample(work):
    tmp_path, model = work
    data = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    data[11, 1, 4, 5] = np.nan
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data)
    before = snapshot(tmp_path)
    code, out, err = run(model, "--filters", "0.3", "--calib", calib, "--recover", "bias", "-o", tmp_path / "o.onnx")
    assert_refused((code, out, err), "NaN/inf", before, tmp_path)
    # the fixture's batch is fixed at 1: one sample per batch, named by its index in the file
    assert "calib.npz" in err and "input 'input'" in err and "from sample 11" in err


def test_allowed_nonfinite_calibration_never_yields_nonfinite_weights(work):
    tmp_path, model = work
    data = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    data[:, :, 0, 0] = np.inf
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data)
    out = tmp_path / "o.onnx"
    code, stdout, err = run(model, "--filters", "0.3", "--calib", calib, "--allow-nonfinite", "--recover",
                            "bias,lsq,bn", "-o", out)
    assert code in (0, 2), err
    if code == 0:
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer]
        assert all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f")
        assert_valid_output(out, model)
        assert "max |diff| inf" not in stdout


def test_model_whose_outputs_are_all_nan_is_not_called_good(tmp_path):
    w1 = np.full((4, 8), np.nan, np.float32)
    path = tmp_path / "nan.onnx"
    onnx.save(_mlp(w1=w1), str(path))
    before = snapshot(tmp_path)
    assert_refused(run(path, "--filters", "0.5", "-o", tmp_path / "o.onnx"), "initializer 'W1' holds NaN",
                   before, tmp_path)


def test_a_candidate_with_new_nonfinite_outputs_fails_the_check():
    from onnxprune.core.verify import Checker

    model = _mlp()
    broken = _mlp()
    w1 = numpy_helper.to_array(broken.graph.initializer[0]).copy()
    w1[0, 0] = np.inf
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    checker = Checker(model, {"x": [2, 4]}, seed=0)
    assert checker.failure(model) is None
    assert "NaN/inf where the original's is finite" in checker.failure(broken)
    assert checker.verification(broken).ok is False


# -- malformed models and user mistakes: exit 2, never "internal error" ----------------------

def _broken(kind: str) -> onnx.ModelProto:
    m = _mlp()
    if kind == "cycle":
        m.graph.node[0].input[0] = "y"
    elif kind == "missing":
        m.graph.node[1].input[0] = "nowhere"
    elif kind == "duplicate":
        m.graph.node[1].output[0] = "h"
    elif kind == "short":
        m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    elif kind == "no data":
        m.graph.initializer[1].ClearField("raw_data")
    return m


@pytest.mark.parametrize("kind,needle", [
    ("cycle", "cycle"), ("missing", "'nowhere'"), ("duplicate", "'h' has two producers"),
    ("short", "'W1': declares shape [4, 8] (32 values) but its data holds 31"),
    ("no data", "'W2': declares shape [8, 3] but holds no data"),
])
def test_malformed_graphs_are_named_as_input_faults(tmp_path, kind, needle):
    path = tmp_path / "bad.onnx"
    onnx.save(_broken(kind), str(path))
    before = snapshot(tmp_path)
    result = run(path, "--filters", "0.5", "-o", tmp_path / "o.onnx")
    assert_refused(result, needle, before, tmp_path)
    assert "verification" not in result[2]


def test_unsorted_nodes_are_sorted_and_said(tmp_path):
    m = _mlp()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    path, out = tmp_path / "unsorted.onnx", tmp_path / "o.onnx"
    onnx.save(m, str(path))
    code, stdout, err = run(path, "--filters", "0.5", "-o", out)
    assert code == 0, err
    assert "not in topological order" in stdout
    assert_valid_output(out, path)


def test_missing_and_short_external_data(tmp_path):
    ext = _external_model(tmp_path / "ext")
    data = ext.parent / "weights.bin"
    before_bytes = data.read_bytes()
    data.write_bytes(before_bytes[:100])
    assert_refused(run(ext, "--filters", "0.3", "-o", tmp_path / "o.onnx"), "weights.bin holds 100 bytes")
    data.unlink()
    assert_refused(run(ext, "--filters", "0.3", "-o", tmp_path / "o.onnx"), "no such file")


@pytest.mark.parametrize("args,needle", [
    (["--layers", "nan"], "--layers"), (["--layers", "inf"], "--layers"), (["--layers", "-1"], "--layers"),
    (["--layers", "1.5"], "--layers"), (["--filters", "nan"], "--filters"), (["--filters", "0.3", "--seed", "-5"],
                                                                             "--seed"),
    (["--filters", "0.3", "--seed", "99999999999"], "--seed"), (["--filters", "0.3", "--round-to", "-8"], "--round-to"),
    (["--filters", "0.3", "--plan", "-"], "--plan"),
])
def test_bad_numbers_are_usage_errors(work, args, needle):
    tmp_path, model = work
    before = snapshot(tmp_path)
    assert_refused(run(model, *args), needle, before, tmp_path)


def test_unwritable_places_are_refused_before_any_work(work):
    tmp_path, model = work
    before = snapshot(tmp_path)
    if Path("/proc").is_dir():
        assert_refused(run(model, "--filters", "0.3", "-o", "/proc/x.onnx"), "cannot write in /proc")
    assert_refused(run(model, "--filters", "0.3", "-o", tmp_path / "no" / "such" / "dir.onnx"), "does not exist",
                   before, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    if not immutable:
        locked.chmod(0o555)
        if os.access(locked, os.W_OK):  # root without chattr: nothing here can make a folder read-only
            pytest.skip("cannot make a read-only folder here")
    try:
        assert_refused(run(model, "--filters", "0.3", "--report", locked / "r.json", "-o", tmp_path / "o.onnx"),
                       "cannot write in")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)])
        locked.chmod(0o755)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("plan,needle", [
    ([1, 2], "not an onnxprune plan"),
    ({"format": "onnxprune-plan/1", "groups": [{"key": "a", "channels": 8, "removed": ["x"]}]}, "integer"),
    ({"format": "onnxprune-plan/1", "groups": [{"key": "a", "channels": 8, "removed": [1.5]}]}, "integer"),
    ({"format": "onnxprune-plan/1", "groups": [{"key": "a", "channels": "8", "removed": [1]}]}, "positive integer"),
    ({"format": "onnxprune-plan/1", "groups": {"key": "a"}}, "must be a list"),
    ({"format": "onnxprune-plan/1", "groups": [["a", 8]]}, "group entry 1"),
])
def test_malformed_plan_files(work, plan, needle):
    tmp_path, model = work
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    before = snapshot(tmp_path)
    assert_refused(run(model, "--apply-plan", path, "-o", tmp_path / "o.onnx"), needle, before, tmp_path)


def test_conflicting_requests_are_refused(work):
    tmp_path, model = work
    plan = tmp_path / "plan.json"
    assert run(model, "--filters", "0.3", "--plan", plan, "--dry-run")[0] == 0
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.zeros((2, 3, 32, 32), np.float32))
    before = snapshot(tmp_path)
    assert_refused(run(model, "--apply-plan", plan, "--filters", "0.5", "-o", tmp_path / "o.onnx"), "drop --filters",
                   before, tmp_path)
    assert_refused(run(model, "--filters", "0.3", "--calib", calib, "--calib-images", "size=32x32",
                       "--importance", "act", "-o", tmp_path / "o.onnx"), "--calib-images", before, tmp_path)


def test_models_too_large_for_protobuf_or_memory(tmp_path, monkeypatch):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:
        f.truncate(2**31)  # sparse: costs no disk
    assert_refused(run(huge, "--filters", "0.3"), "above the 2 GiB")
    from onnxprune.core import modelio

    monkeypatch.setattr(modelio, "available_memory", lambda: 1000)
    small = tmp_path / "m.onnx"
    shutil.copy(FIXTURE, small)
    assert_refused(run(small, "--filters", "0.3"), "of memory available")


def test_a_full_disk_is_a_one_line_error(work, monkeypatch):
    from onnxprune.core import files

    tmp_path, model = work
    before = snapshot(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 10))
    assert_refused(run(model, "--filters", "0.3", "-o", tmp_path / "o.onnx"), "needs about", before, tmp_path)


# -- runs that would change nothing say why ---------------------------------------------------

def _qoperator_model(tmp_path: Path) -> Path:
    quantization = pytest.importorskip("onnxruntime.quantization")
    batches = iter([{"input": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)}
                    for i in range(2)])

    class Reader(quantization.CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    out = tmp_path / "qop.onnx"
    quantization.quantize_static(str(FIXTURE), str(out), Reader(), quant_format=quantization.QuantFormat.QOperator)
    return out


def test_runs_that_remove_nothing_say_why_in_the_table(work):
    tmp_path, model = work
    cases = [
        ([model, "--heads", "0.5"], "no attention heads"),
        ([model, "--filters", "0.3", "--exclude", "*"], "excluded by --exclude '*'"),
        ([model, "--filters", "0.3", "--round-to", "1024"], "--round-to 1024"),
        ([model, "--filters", "0.01"], "= 0 channels"),
        ([_qoperator_model(tmp_path), "--filters", "0.3"], "QOperator"),
    ]
    for args, needle in cases:
        code, out, err = run(*args, "-o", tmp_path / "o.onnx")
        assert code == 0, err
        lines = [l for l in out.splitlines() if l.startswith("nothing removed:")]
        assert len(lines) == 1 and needle in lines[0], out
        assert_valid_output(tmp_path / "o.onnx")


# -- output details ---------------------------------------------------------------------------

def test_report_to_stdout_and_table_units(work, monkeypatch):
    tmp_path, model = work
    monkeypatch.chdir(tmp_path)
    code, out, err = run(model, "--filters", "0.3", "--report", "-", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    report = json.loads(out)
    assert report["summary"]["channels_removed"] > 0
    assert not (tmp_path / "-").exists()
    assert "KiB" in err and " KB" not in err and "on outputs up to" in err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(work, umask, expected):
    tmp_path, model = work
    out, report, plan = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "p.json"
    old = os.umask(umask)
    try:
        assert run(model, "--filters", "0.3", "-o", out, "--report", report, "--plan", plan)[0] == 0
    finally:
        os.umask(old)
    assert {_mode(p) for p in (out, report, plan)} == {expected}


def test_a_replaced_file_keeps_its_mode(work):
    tmp_path, model = work
    report = tmp_path / "r.json"
    report.write_text("{}")
    report.chmod(0o640)
    assert run(model, "--filters", "0.3", "--dry-run", "--report", report)[0] == 0
    assert _mode(report) == 0o640 and json.loads(report.read_text())["summary"]


# -- interrupted writes -----------------------------------------------------------------------

def _big_model(path: Path, hidden: int = 4096) -> None:
    """Two hidden x hidden MatMuls: 128 MB, enough for a write that can be caught halfway."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
        [numpy_helper.from_array(rng.standard_normal((hidden, hidden), dtype=np.float32), name)
         for name in ("W1", "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _interrupt_during_write(src: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a run and send `sig` as soon as its staging folder appears next to `out`."""
    # SIGINT at its default in the run, as in a terminal: a suite started in the background of
    # a shell without job control inherits it ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", str(src), "--filters", "0.3", "--no-verify",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    prefix = f".onnxprune-{proc.pid}-"
    deadline = time.monotonic() + 600
    caught = False
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(prefix) and p.is_dir() for p in out.parent.iterdir()):
            proc.send_signal(sig)
            caught = True
            break
        time.sleep(0.0005)
    stdout, stderr = proc.communicate(timeout=600)
    assert caught, f"the run ended before its write could be interrupted: {stderr}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_an_interrupted_write_leaves_the_old_output_or_none_and_no_staging(tmp_path, sig):
    src = tmp_path / "big.onnx"
    _big_model(src)
    src_bytes = src.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.pruned.onnx"
    out.write_bytes(b"an older output")
    proc = _interrupt_during_write(src, out, sig)
    assert src.read_bytes() == src_bytes
    assert out.read_bytes() == b"an older output" or assert_valid_output(out) is None
    staged = [p for p in out_dir.iterdir() if p.name.startswith(".onnxprune-")]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert staged, "the kill should have left a staging folder for the next run to clean"
        # The next run that writes into this folder removes what the killed one left.
        code, _, err = run(FIXTURE, "--filters", "0.3", "--no-verify", "-o", out_dir / "next.onnx")
        assert code == 0, err
        assert not [p for p in out_dir.iterdir() if p.name.startswith(".onnxprune-")]
    else:
        assert proc.returncode in (128 + sig, 130), proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not staged


def test_staging_of_a_live_run_is_left_alone(tmp_path):
    from onnxprune.core.files import sweep_stale_staging

    live = tmp_path / f".onnxprune-{os.getppid()}-abcd1234"  # a process that exists
    live.mkdir()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    dead = tmp_path / f".onnxprune-{dead_pid}-abcd1234"
    dead.mkdir()
    (dead / "partial.onnx").write_bytes(b"half")
    assert sweep_stale_staging(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


# -- random malformed graphs ------------------------------------------------------------------

FUZZ_CASES = 240
FUZZ_REQUESTS = (["--filters", "0.5"], ["--heads", "0.5", "--neurons", "0.5"], ["--layers", "1", "--filters", "0.3"])


def test_fuzzed_graphs_are_refused_or_pruned_into_valid_models(tmp_path):
    """Graphs from the op rules' tests, broken at random: each run exits 0 with a valid model,
    or 2 with one line; never 1 (an internal error), never a traceback, never a changed input."""
    from fuzz_graphs import mutated, seed_models

    seeds = seed_models()
    assert len(seeds) >= 40, "the op-rule tests should provide the seed graphs"
    outcomes = {0: 0, 2: 0}
    for case in range(FUZZ_CASES):
        label, model = seeds[case % len(seeds)]
        what, data = mutated(model, case)
        path, out = tmp_path / f"case{case}.onnx", tmp_path / f"case{case}.pruned.onnx"
        path.write_bytes(data)
        request = FUZZ_REQUESTS[case % len(FUZZ_REQUESTS)]
        code, stdout, err = run(path, *request, "-o", out)
        where = f"case {case} ({label}, {what}, {' '.join(request)})"
        assert code in (0, 2), f"{where}: exit {code}: {err}"
        assert "Traceback" not in err and "[W]" not in stdout and "[C]" not in stdout, where
        assert path.read_bytes() == data, f"{where}: the input was changed"
        if code == 2:
            assert len(err.strip().splitlines()) == 1, f"{where}: {err}"
            assert not out.exists()
        else:
            assert_valid_output(out, path)
        outcomes[code] += 1
        path.unlink()
        out.unlink(missing_ok=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxprune-")]
    assert outcomes[0] and outcomes[2], outcomes  # both kinds of outcome were exercised
