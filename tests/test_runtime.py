"""Working with whichever onnxruntime flavour is installed, or none."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxprune.core import runtime
from onnxprune.core.errors import RuntimeMissing

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_resnet.onnx"


@pytest.fixture
def no_onnxruntime(tmp_path):
    """A PYTHONPATH entry whose `onnxruntime` fails to import, as if none were installed."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('onnxruntime is not installed')\n")
    return str(shadow.parent)


def test_pruning_by_magnitude_needs_no_runtime(tmp_path, no_onnxruntime):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(FIXTURE), "--filters", "0.3", "-o", str(out),
                           "--report", str(report)], capture_output=True, text=True,
                          env={"PYTHONPATH": no_onnxruntime, "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["runtime"] == "none"
    assert data["verification"]["checker"] == "passed" and data["verification"]["onnxruntime"] == "not run"
    assert any("no onnxruntime" in n for n in data["notes"])
    assert "latency_ms" not in data and out.exists()


def test_missing_runtime_error_names_the_extras(monkeypatch):
    monkeypatch.setattr(runtime, "_import_ort", lambda: None)
    with pytest.raises(RuntimeMissing, match=r"onnxprune\[ort\]"):
        runtime.require_runtime("measuring latency")
    with pytest.raises(RuntimeMissing, match=r"onnxprune\[training\]"):
        runtime.import_training_api()


def test_plain_onnxruntime_is_not_mistaken_for_the_training_flavour():
    pytest.importorskip("onnxruntime")
    try:
        import onnxruntime.training  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeMissing, match="force-reinstall|onnxruntime-training"):
            runtime.import_training_api()
    else:
        pytest.skip("the training flavour is installed here")


@pytest.mark.parametrize("name", ["taylor", "fisher", "obd"])
def test_gradient_criteria_without_the_training_flavour_fail_at_once(tmp_path, monkeypatch, name):
    """Gradient criteria take gradients through onnxruntime-training: without it the run stops
    before any analysis, in one line naming the criterion and the extra."""
    import numpy as np

    import onnxprune

    monkeypatch.setattr(runtime, "_import_ort", lambda: None)
    np.savez(tmp_path / "c.npz", input=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(RuntimeMissing, match=rf"--importance {name} takes gradients: .*onnxprune\[training\]") as info:
        onnxprune.prune(str(FIXTURE), filters=0.3, importance=name, calib=str(tmp_path / "c.npz"))
    assert "\n" not in str(info.value)
    # without calibration data it falls back to l2 and says so, as the data criteria do
    result = onnxprune.prune(str(FIXTURE), filters=0.3, importance=name, latency_runs=0)
    assert any(f"--importance {name}: no calibration data" in note for note in result.report["notes"])
