"""Hand the result over to a back end: `--target tensorrt | ort-mobile | cpu`.

A preset sets what its back end wants before pruning (the channel multiple every group keeps,
the kind of int8 quantization) and, as the last pass, checks the model it hands over and says
what it could not do:

- every channel group's width: a multiple of the back end's channel block, or why not (a group
  left whole, excluded or not prunable keeps the width the model came with);
- static input dims: with `--input-shape` the given dims are written into the model (TensorRT
  builds an engine for fixed shapes, mobile NPUs take only those), otherwise dynamic inputs are
  named;
- tensorrt: int8 only as symmetric QDQ (every zero point 0; TensorRT takes nothing else), and
  `polygraphy check lint` over the result where polygraphy is installed;
- ort-mobile: the model converted to onnxruntime's `.ort` format, with the required-operators
  config a reduced mobile build of onnxruntime is made from (written beside the output);
- cpu: int8 weights in 7 bits (onnxruntime's kernels saturate 8-bit products on x86 CPUs without
  VNNI); the pruned model's latency against the original's (measured by Measure) is recorded, and
  a slower result is said.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.core.errors import OnnxPruneError, OptionError
from onnxprune.core.modelio import EXTERNAL_DATA_THRESHOLD, payload_bytes
from onnxprune.core.plan import channel_step
from onnxprune.core.progress import stage
from onnxprune.core.runtime import quiet_tools
from onnxprune.core.shapes import fix_input_shapes, graph_inputs, static_copy
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, optional_choice, setting

TARGETS = ("tensorrt", "ort-mobile", "cpu")
LINT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Preset:
    round_to: int  # the channel multiple for float kernels
    round_to_int8: int  # ... and with --quantize int8/uint8
    why: str


PRESETS = {
    "tensorrt": Preset(8, 16, "TensorRT's tensor-core kernels take channel counts in multiples of 8 in FP16 and "
                              "16 in INT8"),
    "ort-mobile": Preset(8, 8, "XNNPACK's ARM kernels, which onnxruntime mobile runs convolutions and matrix "
                               "products on, compute output channels in tiles of 8"),
    "cpu": Preset(8, 8, "onnxruntime's blocked (NCHWc) convolution kernels work on blocks of 8 channels on AVX2 "
                        "(16 on AVX-512); other counts are padded or run on the slower plain path"),
}


@dataclass
class TargetSettings:
    target: str | None = setting(None, check=optional_choice(TARGETS), cli=Flag(
        "--target", "Prepare the result for a back end: channel counts in the multiples it runs fast (unless "
        "--round-to is given), its kind of int8 with --quantize, static dims from --input-shape, and its checks "
        "(tensorrt: symmetric QDQ, polygraphy lint; ort-mobile: also writes OUTPUT.ort and its required-operators "
        "config; cpu: latency against the original). What it cannot do is said in the report.",
        choices=lambda: TARGETS))

    @property
    def requested(self) -> bool:
        return self.target is not None


def preset_round_to(target: str | None, round_to: int, quantize: str | None) -> int:
    """The channel multiple a run keeps: --round-to when given (above 1), else the preset's."""
    if target is None or round_to > 1:
        return round_to
    preset = PRESETS[target]
    return preset.round_to_int8 if quantize in ("int8", "uint8") else preset.round_to


def check_target_options(target: str | None, quantize: str | None, calibrated: bool, quant_mode: str = "auto"
                         ) -> None:
    if target != "tensorrt" or quantize is None:
        return
    if quant_mode == "dynamic":
        raise OptionError("quant_mode", "dynamic", "TensorRT runs static QDQ int8 only")
    if quantize == "uint8":
        raise OptionError("quantize", "uint8", "TensorRT takes int8 with every zero point 0 (symmetric); "
                          "give --quantize int8 with --target tensorrt")
    if quantize == "int8" and not calibrated:
        raise OptionError("quantize", "int8", "TensorRT takes static QDQ int8, whose activation ranges need "
                          "{calib} data (without it quantization is dynamic, which TensorRT does not run)")


class HandOver(Pass):
    """The last pass: checks and converts for `settings.target` (see the module docstring).
    `round_to` is the channel multiple the run used (preset_round_to)."""

    name = "handover"

    def __init__(self, settings: TargetSettings, round_to: int) -> None:
        self.settings = settings
        self.round_to = round_to

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        target = self.settings.target
        preset = PRESETS[target]
        notes: list[str] = []
        report: dict = {"name": target, "round_to": self.round_to, "why": preset.why}
        report["widths"] = self._widths(context, notes)
        given = dict(context.input_shapes)
        if given:
            model = bake_input_dims(context.own(model), given)
            report["static_dims"] = given
        dynamic = dynamic_inputs(model)
        report["dynamic_inputs"] = dynamic
        if dynamic and target != "cpu":
            notes.append(f"input(s) {', '.join(f'{k} {v}' for k, v in dynamic.items())} stay dynamic: "
                         + ("TensorRT needs an optimization profile for them" if target == "tensorrt" else
                            "mobile NPUs (NNAPI, CoreML) run only fixed dims")
                         + "; give --input-shape NAME:D1,D2,... to write fixed dims into the model")
        if given:
            self._still_runs(model, context)
        if target == "tensorrt":
            report["qdq"] = tensorrt_qdq(model)
            if report["qdq"]["asymmetric"]:
                notes.append(f"{report['qdq']['asymmetric']} QuantizeLinear/DequantizeLinear node(s) have a zero "
                             "point that is not int8 0, which TensorRT does not take")
            report["lint"] = lint(model, context.shapes)
            if report["lint"].get("skipped"):
                notes.append(f"lint skipped: {report['lint']['skipped']}")
            elif not report["lint"]["passed"]:
                notes.append(f"polygraphy lint found {len(report['lint']['errors'])} error(s), e.g. "
                             f"{report['lint']['errors'][0]}")
        if target == "ort-mobile":
            files, report["ort_format"] = ort_format(model)
            context.files.update(files)
        if target == "cpu":
            latency = context.report.get("latency_ms")
            report["latency_ms"] = latency
            if latency is None:
                notes.append("latency was not measured (--no-verify): run without it to check the result is faster")
        context.notes.extend(f"target {target}: {note}" for note in notes)
        return PassResult(model, {"target": report, "notes": list(context.notes)}, modified=bool(given))

    def _widths(self, context: Context, notes: list[str]) -> dict | None:
        """Each channel group's width after the run against the back end's multiple."""
        plan, analysis = context.plan, context.analysis
        if plan is None or analysis is None or self.round_to <= 1:
            return None
        off = []
        for d in plan.decisions:
            kept = d.group.channels - len(d.removed)
            step = channel_step(analysis, d.group, self.round_to)
            if kept % step:
                why = "kept whole: the model's width (no channels asked, or the full width is the nearest " \
                    "multiple)" if not len(d.removed) else "the rounding could not reach a multiple"
                off.append({"key": d.key, "kind": d.group.kind, "channels": d.group.channels, "kept": kept,
                            "why": why})
        for s in plan.skipped:
            if s["kind"] not in ("heads", "head_dim") and s["channels"] % self.round_to:
                off.append({"key": s["key"], "kind": s["kind"], "channels": s["channels"], "kept": s["channels"],
                            "why": f"not pruned: {s['reason']}"})
        total = len(plan.decisions) + len(plan.skipped)
        prunable = [o for o in off if not o["why"].startswith("not pruned")]
        if prunable:  # the groups the tool does not prune keep the model's widths, for better or worse
            first = prunable[0]
            notes.append(f"{len(prunable)} of {len(plan.decisions)} prunable channel group(s) are not multiples of "
                         f"{self.round_to} wide (e.g. {first['key']!r}, {first['kept']} {first['kind']}: "
                         f"{first['why']}); the report's target.widths lists them")
        return {"groups": total, "multiple_of": self.round_to, "not_multiples": off}

    def _still_runs(self, model: onnx.ModelProto, context: Context) -> None:
        """The model with its dims written in must still load and run at those dims."""
        checker = context.checker
        if checker is None or checker.feeds is None:
            return
        from onnxprune.core.verify import session

        try:
            session(model).run(None, checker.feeds)
        except Exception as exc:  # onnxruntime's own error types
            raise OnnxPruneError(f"--input-shape: the model with those dims written in does not run in onnxruntime "
                                 f"({str(exc).splitlines()[0]})") from None


def bake_input_dims(model: onnx.ModelProto, dims: dict) -> onnx.ModelProto:
    """`model` (changed in place) with the given input dims written in, its outputs' dims
    inferred where they were names, and stored shapes that no longer hold dropped."""
    fix_input_shapes(model, dims)
    inferred = {o.name: o.type for o in static_copy(model, dims).graph.output}
    for output in model.graph.output:
        shape = output.type.tensor_type.shape
        if any(not d.HasField("dim_value") for d in shape.dim) and output.name in inferred:
            output.type.CopyFrom(inferred[output.name])
    kept = [vi for vi in model.graph.value_info
            if all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def dynamic_inputs(model: onnx.ModelProto) -> dict:
    """{input name: dims} for the graph inputs with a dim that is a name or unknown."""
    out = {}
    for vi in graph_inputs(model):
        if not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in vi.type.tensor_type.shape.dim]
        if any(isinstance(d, str) for d in dims):
            out[vi.name] = dims
    return out


def tensorrt_qdq(model: onnx.ModelProto) -> dict:
    """QuantizeLinear/DequantizeLinear nodes, and how many have a zero point that is not 0 or
    a type other than int8 (TensorRT takes symmetric int8 only)."""
    constants = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    asymmetric = 0
    for node in nodes:
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:
            continue
        values = onnx.numpy_helper.to_array(zero)
        if values.dtype != np.int8 or np.any(values != 0):
            asymmetric += 1
    return {"nodes": len(nodes), "asymmetric": asymmetric}


def lint(model: onnx.ModelProto, shapes: dict) -> dict:
    """`polygraphy check lint` on the model at the run's input dims: {'passed', 'errors',
    'warnings'}, or {'skipped': why} where polygraphy is not installed or cannot run."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return {"skipped": "polygraphy is not installed (pip install polygraphy)"}
    if payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        return {"skipped": "the model is larger than 2 GB, which the lint cannot load in one file"}
    runner = ("import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())")
    with tempfile.TemporaryDirectory(prefix="onnxprune-lint-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "lint.json"
        onnx.save(model, str(path))
        command = [sys.executable, "-c", runner, "check", "lint", str(path), "-o", str(out), "--silent"]
        if shapes:
            command += ["--input-shapes", *(f"{name}:{list(dims)}".replace(" ", "") for name, dims in shapes.items())]
        try:
            with stage("polygraphy lint"):
                proc = subprocess.run(command, capture_output=True, text=True, timeout=LINT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"skipped": f"polygraphy lint took longer than {LINT_TIMEOUT_S} s"}
        if not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"skipped": f"polygraphy lint did not run ({tail[0][:200]})"}
        found = json.loads(out.read_text())
    entries = found.get("lint_entries", found.get("linting_entries", []))
    errors = [_lint_message(e) for e in entries if e.get("level") == "error"]
    return {"tool": "polygraphy check lint", "passed": not errors, "errors": errors,
            "warnings": sum(1 for e in entries if e.get("level") == "warning"),
            "nodes_failing": len(found.get("summary", {}).get("failing", []))}


def _lint_message(entry: dict) -> str:
    nodes = entry.get("nodes") or []
    text = " ".join(str(entry.get("message", "")).split())[:300]
    return f"{', '.join(nodes[:3])}: {text}" if nodes else text


ORT_SUFFIX = ".ort"
CONFIG_SUFFIX = ".required_operators.config"


def ort_format(model: onnx.ModelProto) -> tuple[dict, dict]:
    """The model in onnxruntime's .ort format (optimized as onnxruntime mobile runs it, the
    'Fixed' style) and its required-operators config: ({suffix: bytes}, report)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        raise OnnxPruneError("--target ort-mobile: the model is larger than 2 GB, more than the .ort format holds")

    with tempfile.TemporaryDirectory(prefix="onnxprune-ort-") as tmp:
        source, out = Path(tmp) / "model.onnx", Path(tmp) / "out"
        onnx.save(model, str(source))
        try:
            with quiet_tools(), stage("conversion to .ort"):
                convert_onnx_models_to_ort(source, out, optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:  # the converter raises several types
            raise OnnxPruneError(f"--target ort-mobile: the model does not convert to the .ort format "
                                 f"({str(exc).splitlines()[0]})") from None
        ort_file = out / "model.ort"
        configs = list(out.glob("*.config"))
        if not ort_file.exists() or not configs:
            raise OnnxPruneError("--target ort-mobile: onnxruntime's converter wrote no .ort model")
        data = ort_file.read_bytes()
        operators = [line for line in configs[0].read_text().splitlines() if line and not line.startswith("#")]
    config = "# operators the .ort model beside this file needs (onnxruntime's reduced-build config)\n" + \
        "\n".join(operators) + "\n"
    _check_ort_runs(data)
    report = {"bytes": len(data), "optimization": "Fixed", "required_operators": operators}
    return {ORT_SUFFIX: data, CONFIG_SUFFIX: config.encode()}, report


def _check_ort_runs(data: bytes) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise OnnxPruneError(f"--target ort-mobile: the .ort model does not load ({str(exc).splitlines()[0]})") \
            from None
