"""Small test models written in ONNX text syntax, with random weights filled in."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def text_model(graph_text: str, weights: dict, opset: int = 17, ir_version: int = 8, seed: int = 0,
               domains: dict | None = None) -> onnx.ModelProto:
    """`weights` maps initializer names to a shape (random normal), or ("positive", shape), or an array.
    `domains` adds opset imports for other domains, e.g. {"com.microsoft": 1}."""
    imports = ", ".join(f'"{d}" : {v}' for d, v in {"": opset, **(domains or {})}.items())
    header = f'<ir_version: {ir_version}, opset_import: [{imports}]>\n'
    model = onnx.parser.parse_model(header + graph_text)
    rng = np.random.default_rng(seed)
    for name, spec in weights.items():
        if isinstance(spec, np.ndarray):
            value = spec
        elif isinstance(spec, tuple) and spec and spec[0] == "positive":
            value = (np.abs(rng.standard_normal(spec[1])) + 0.5).astype(np.float32)
        else:
            value = (rng.standard_normal(spec) * 0.5).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model)
    return model


def skipped_reasons(result) -> list[str]:
    return [s["reason"] for s in result.plan.skipped]
