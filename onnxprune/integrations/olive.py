"""onnxprune as an Olive pass: `OnnxPrune`, configured with the keyword options of
onnxprune.prune(), chains with Olive's own ONNX passes in a workflow.

Olive finds third-party passes through a package config; `package_config()` is Olive's own
with this pass added (a package config replaces Olive's, so its passes must stay in it):

    import olive.workflows
    from onnxprune.integrations.olive import package_config

    config = {
        "input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
        "passes": {"prune": {"type": "OnnxPrune", "filters": 0.3},
                   "peephole": {"type": "OnnxPeepholeOptimizer"}},
        "output_dir": "out",
    }
    output = olive.workflows.run(config, package_config=package_config())
    assert output.has_output_model()  # Olive does not raise when a pass fails

With `olive run --config workflow.json --package-config pkg.json`, write pkg.json with
`python -m onnxprune.integrations.olive pkg.json`. The pruned model's folder also holds the
report (`onnxprune_report.json`), carried to the workflow's output. Olive caches pass
results by configuration, not by code: clean its cache after upgrading onnxprune.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Union

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from ..api import PruneOptions, prune
from ..core.modelio import save_model
from ..settings import info

REPORT_NAME = "onnxprune_report.json"
MODULE_PATH = "onnxprune.integrations.olive.OnnxPrune"

# The Python types of prune()'s options, as Olive's typed configuration declares them.
_TYPES = {"float": float, "float | None": Optional[float], "int": int, "int | None": Optional[int], "bool": bool,
          "str": str, "str | None": Optional[str], "tuple": list[str], "dict": dict[str, list[int]],
          "dict | None": Optional[Union[str, dict]], "object": Optional[str]}
# Options whose tuple values Olive's JSON gives as lists.
_SEQUENCES = ("exclude", "drop_layers", "recover")


class OnnxPrune(Pass):
    """Structured pruning (filters, neurons, heads, layers), verified, with a report."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        params = {}
        for f in dataclasses.fields(PruneOptions):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flag = info(f).cli
            params[f.name] = PassConfigParam(type_=_TYPES.get(str(f.type), Any),
                                             default_value=list(default) if isinstance(default, tuple) else default,
                                             description=flag.help if flag is not None else None)
        return params

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(PruneOptions)}
        for name in _SEQUENCES:
            if isinstance(options[name], list):
                options[name] = tuple(options[name])
        result = prune(model.model_path, **options)
        folder = Path(output_model_path)
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(model.model_path).name
        save_model(result.model, folder / name)
        report = folder / REPORT_NAME
        report.write_text(json.dumps(result.report, indent=2))
        attributes = dict(model.model_attributes or {})
        attributes["additional_files"] = sorted({*attributes.get("additional_files", []), str(report)})
        return ONNXModelHandler(model_path=str(folder), onnx_file_name=name, model_attributes=attributes)


def package_config() -> dict:
    """Olive's package config with OnnxPrune added, for olive.workflows.run(package_config=...)."""
    from olive.package_config import OlivePackageConfig

    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config.setdefault("passes", {})["OnnxPrune"] = {"module_path": MODULE_PATH}
    return config


if __name__ == "__main__":  # pragma: no cover - `python -m onnxprune.integrations.olive pkg.json`
    Path(sys.argv[1]).write_text(json.dumps(package_config(), indent=2))
