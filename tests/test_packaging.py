"""One distribution: the passes/ folder installs as onnxprune.passes, never as a bare `passes`;
the wheel holds the engine, op rules, criteria, passes and integrations, and the type marker."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_installed_package_exposes_no_top_level_passes(tmp_path):
    code = ("import importlib.util, onnxprune.passes; "
            "print(importlib.util.find_spec('passes') is None, onnxprune.passes.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "onnxprune.passes"]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("onnxprune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("onnxprune/oprules/conv.py", "onnxprune/criteria/magnitude.py", "onnxprune/passes/plan.py",
                 "onnxprune/core/dependency.py", "onnxprune/integrations/onnx_ir.py", "onnxprune/py.typed",
                 "onnxprune/training/trainer.py", "onnxprune/passes/finetune.py"):
        assert name in names
    assert not any(n.startswith("passes/") for n in names)
    assert not any(n.startswith(("tests/", "fixtures/", "benchmarks/")) for n in names)
