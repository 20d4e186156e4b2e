"""Quantize the pruned model for deployment: INT8 through onnxruntime.quantization, or FP16.

Runs last, after pruning, recovery, fine-tuning and measuring, so the report holds the
original, the pruned and the pruned+quantized model side by side. int8 is static (QDQ:
QuantizeLinear/DequantizeLinear around each op, the form TensorRT and onnxruntime's int8 kernels
take), its activation ranges from the tool's calibration batches (MinMax, Entropy measured here,
or Percentile), or dynamic (weights int8, activations quantized at run time): int8_mode chooses,
static for models with convolutions, dynamic for the others and without calibration data.
Weights are quantized per output channel where the opset allows (13 and newer); an older model
is converted to opset 13 first, since per-channel DequantizeLinear does not exist before;
onnxruntime's pre-processing folds BatchNorms into convolutions before quantizing. `fp16`
converts float weights and activations to float16 and keeps the inputs and outputs float32.

The quantized model must load in onnxruntime and run on the verification inputs; how far its
outputs are from the original's is reported next to the pruned model's, with onnxruntime's int8
kernels and computed exactly (optimizations off), since on x86 CPUs without VNNI the kernels
saturate 8-bit products and lose what the model does not.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.core.errors import OnnxPruneError, OptionError
from onnxprune.core.metrics import timed_runs
from onnxprune.core.modelio import model_bytes
from onnxprune.core.progress import progress_bar, stage
from onnxprune.core.runtime import quiet_tools
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, choice, optional_choice, setting

FORMATS = ("int8", "uint8", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MODES = ("auto", "static", "dynamic")
CONVOLUTIONS = ("Conv", "ConvTranspose")
PER_CHANNEL_OPSET = 13
QUANTIZE_SAMPLES = 256  # calibration samples the activation ranges are measured on
KERNEL_LOSS = 0.01  # output cosine lost to onnxruntime's int8 kernels (against exact) worth a note


@dataclass
class QuantizeSettings:
    quantize: str | None = setting(None, check=optional_choice(FORMATS), cli=Flag(
        "--quantize", "Quantize the result: int8 or uint8 (static QDQ calibrated on --calib, per channel; dynamic "
        "without --calib) or fp16. The report compares original, pruned and quantized.", choices=lambda: FORMATS))
    quant_calibration: str = setting("minmax", check=choice(CALIBRATION_METHODS), cli=Flag(
        "--quant-calibration", "How static quantization sets activation ranges from --calib.",
        choices=lambda: CALIBRATION_METHODS, show_default=True))
    quant_mode: str = setting("auto", check=choice(MODES), cli=Flag(
        "--quant-mode", "int8 static (QDQ, activation ranges from --calib) or dynamic (activations quantized at "
        "run time); auto: static for models with convolutions, dynamic for the others (transformers, MLPs: "
        "onnxruntime runs their dynamic int8 faster on CPU) and without --calib. --target tensorrt and "
        "ort-mobile quantize statically.", choices=lambda: MODES, show_default=True))
    quant_reduce_range: bool = setting(False, cli=Flag(
        "--quant-reduce-range", "int8 weights in 7 bits, which onnxruntime's int8 kernels compute exactly on x86 "
        "CPUs without VNNI (where 8-bit products saturate); set by --target cpu.", is_flag=True))

    @property
    def requested(self) -> bool:
        return self.quantize is not None

    def cross_check(self) -> None:
        if self.quant_mode != "auto" and self.quantize not in ("int8", "uint8"):
            raise OptionError("quant_mode", self.quant_mode, "applies to {quantize} int8 or uint8")
        if self.quant_reduce_range and self.quantize not in ("int8", "uint8"):
            raise OptionError("quant_reduce_range", True, "applies to {quantize} int8 or uint8")


def int8_mode(settings: QuantizeSettings, model: onnx.ModelProto, calibrated: bool, target: str | None
              ) -> tuple[str, str]:
    """'static' or 'dynamic' for this model, and why."""
    if settings.quant_mode != "auto":
        return settings.quant_mode, f"--quant-mode {settings.quant_mode}"
    if not calibrated:
        return "dynamic", "no --calib: activations are quantized at run time"
    if target in ("tensorrt", "ort-mobile"):
        return "static", f"--target {target} runs static QDQ"
    if any(node.op_type in CONVOLUTIONS for node in model.graph.node):
        return "static", "convolutions: static QDQ"
    return "dynamic", ("no convolutions: dynamic int8, which onnxruntime's CPU kernels run faster than static QDQ "
                       "for matrix products (--quant-mode static for QDQ)")


class Quantize(Pass):
    name = "quantize"

    def __init__(self, settings: QuantizeSettings, latency_runs: int = 20, latency_budget_s: float | None = 10.0,
                 target: str | None = None, val=None, labels: str | None = None, image_spec=None):
        self.settings = settings
        self.target = target  # --target tensorrt: int8 with every zero point 0 (all TensorRT takes)
        self.latency_runs = latency_runs
        self.latency_budget_s = latency_budget_s
        # --val data (with --labels): the three models' top-1 accuracy on it
        self.val, self.labels, self.image_spec = val, labels, image_spec

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        from onnxprune.core.runtime import require_runtime

        require_runtime("quantizing")
        s = self.settings
        notes: list[str] = []
        symmetric = self.target == "tensorrt"
        if s.quantize == "fp16":
            quantized, how = _to_fp16(model), {"format": "fp16"}
            recipe = None
        else:
            mode, why = int8_mode(s, model, context.calibration is not None, self.target)
            # 7-bit weights: x86 CPUs without VNNI saturate onnxruntime's 8-bit products
            recipe = Int8Recipe(s.quantize, mode, s.quant_calibration, symmetric=symmetric, float_biases=symmetric,
                                reduce_range=s.quant_reduce_range or self.target == "cpu")
            quantized, how = _to_int8(model, recipe, context.calibration, notes)
            how["mode_reason"] = why
        sessions = _Sessions(context, model, quantized)
        try:
            compared = self._compare(context, sessions)
        except OnnxPruneError as exc:
            if recipe is None or recipe.mode == "dynamic" or recipe.float_biases:
                raise
            # onnxruntime's int32 biases go wrong on some exports (biases shaped [1, C]): keep them float
            recipe = dataclasses.replace(recipe, float_biases=True)
            quantized, how = _to_int8(model, recipe, context.calibration, notes)
            how["mode_reason"] = why
            sessions = _Sessions(context, model, quantized)
            compared = self._compare(context, sessions)
            notes.append(f"{str(exc)[:160]}; quantized again with float biases, which runs")
        fidelity = compared.get("fidelity") or {}
        kernels, exact = (fidelity.get("quantized") or {}).get("cosine"), \
            (fidelity.get("quantized_exact") or {}).get("cosine")
        if kernels is not None and exact is not None and kernels < exact - KERNEL_LOSS:
            notes.append(f"onnxruntime's int8 kernels on this CPU lose precision the quantized model does not have "
                         f"(output cosine {kernels:.4f} with them, {exact:.4f} computed exactly): x86 CPUs without "
                         "VNNI saturate 8-bit products; --quant-reduce-range (set by --target cpu) quantizes weights "
                         "to 7 bits, which they run exactly, and GPUs, TensorRT and VNNI CPUs run the model as "
                         "computed exactly")
        report = {**how, "file_bytes": {"original": context.before["file_bytes"],
                                        "pruned": context.report.get("file_bytes", {}).get("after"),
                                        "quantized": model_bytes(quantized)}}
        report.update(compared)
        if self.val is not None:
            report["accuracy"] = self._accuracy(context, model, sessions)
        latency = report.get("latency_ms")
        if latency and latency["quantized"] > 1.1 * latency["pruned"]:
            notes.append(f"the quantized model runs slower than the pruned float one here ({latency['quantized']:g} "
                         f"against {latency['pruned']:g} ms): onnxruntime's int8 kernels pay off on CPUs with VNNI "
                         "and on GPUs/TensorRT; measure on the target")
        context.notes.extend(f"quantize: {note}" for note in dict.fromkeys(notes))
        return PassResult(quantized, {"quantization": report, "notes": list(context.notes)})

    def _compare(self, context: Context, sessions: _Sessions) -> dict:
        """Outputs of the pruned and quantized models against the original's on the verification
        inputs, and the three models' latency (where the run verified in onnxruntime)."""
        checker = context.checker
        if checker is None or checker.feeds is None or checker.outputs is None:
            return {"fidelity": None}
        try:
            got = sessions["quantized"].run(None, checker.feeds)
        except Exception as exc:  # onnxruntime's own error types
            raise OnnxPruneError(f"the quantized model does not run in onnxruntime ({str(exc).splitlines()[0]})") \
                from None
        fidelity = {name: _closeness(checker.outputs, got if name == "quantized" else
                                     sessions[name].run(None, checker.feeds))
                    for name in ("pruned", "quantized", "quantized_exact")}
        out = {"fidelity": fidelity}
        if self.latency_runs:
            out["latency_ms"] = {name: round(timed_runs(sessions[name], checker.feeds, self.latency_runs,
                                                        budget_s=self.latency_budget_s)[0], 4)
                                 for name in ("original", "pruned", "quantized")}
            out["latency_measured"] = {"input_shapes": context.shapes, "guessed_dims": list(context.guessed)}
        return out

    def _accuracy(self, context: Context, pruned: onnx.ModelProto, made: _Sessions) -> dict:
        """Top-1 accuracy of the original, pruned and quantized models on the --val data (the
        first output's argmax against the labels), or the cosine of their outputs with the
        original's where the data has no labels."""
        from onnxprune.training.data import DEFAULT_LABELS, load_training_data

        data = load_training_data(self.val, pruned, labels=self.labels or DEFAULT_LABELS, image_spec=self.image_spec)
        names = [name for name in ("original", "pruned", "quantized") if made.has(name)]
        if self.settings.quantize != "fp16":
            names.append("quantized_exact")
        sessions = {name: made[name] for name in names}
        correct = {name: 0 for name in sessions}
        cosines = {name: [] for name in sessions}
        samples = 0
        for feed, labels in data.epoch(0, context.seed, shuffle=False):
            first = {name: np.asarray(sess.run(None, feed)[0]) for name, sess in sessions.items()}
            count = len(next(iter(feed.values())))
            samples += count
            for name, scores in first.items():
                if labels is not None:
                    correct[name] += int((scores.reshape(count, -1).argmax(axis=1) == np.asarray(labels)).sum())
                if "original" in first:
                    cosines[name].append(_closeness([first["original"]], [scores])["cosine"])
        out = {"data": data.description, "samples": samples}
        if data.has_labels:
            out["top1"] = {name: round(correct[name] / samples, 6) for name in sessions}
        else:
            out["cosine"] = {name: round(min(values), 6) for name, values in cosines.items() if values}
        return out


def _closeness(reference: list, outputs: list) -> dict:
    """Largest |difference| relative to the reference's largest |value|, and the cosine, over
    the float outputs."""
    worst, cosines = 0.0, []
    for a, b in zip(reference, outputs):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind != "f" or a.shape != b.shape:
            continue
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        scale = np.abs(a).max() if a.size else 0.0
        worst = max(worst, float(np.abs(a - b).max() / scale) if scale > 0 else 0.0)
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        cosines.append(float(a @ b / norms) if norms > 0 else 1.0)
    return {"max_rel_diff": round(worst, 6), "cosine": round(min(cosines), 6) if cosines else None}


class _Sessions:
    """onnxruntime sessions of the original, pruned and quantized models (and the quantized one
    run exactly), each made once per quantization, when first asked for; the original's is the
    verification's where it ran."""

    def __init__(self, context: Context, pruned: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
        self._models = {"original": context.reference, "pruned": pruned, "quantized": quantized}
        checker = context.checker
        self._made = {"original": checker.session} if checker is not None and checker.session is not None else {}

    def has(self, name: str) -> bool:
        return name in self._made or self._models.get(name) is not None

    def __getitem__(self, name: str):
        if name not in self._made:
            from onnxprune.core.verify import session

            self._made[name] = _exact_session(self._models["quantized"]) if name == "quantized_exact" \
                else session(self._models[name])
        return self._made[name]


def _exact_session(quantized: onnx.ModelProto):
    """A session that runs QuantizeLinear/DequantizeLinear as written, in float, with no graph
    optimization fusing them into int8 kernels: the quantized model's own arithmetic."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Int8Recipe:
    fmt: str  # int8 or uint8 activations
    mode: str  # static or dynamic
    method: str  # calibration method (static)
    symmetric: bool = False  # zero points 0, MatMul weights per output column (TensorRT)
    float_biases: bool = False  # biases stay float rather than int32
    reduce_range: bool = False  # 7-bit weights (exact on x86 CPUs without VNNI)


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert_float_to_float16(copy, keep_io_types=True)


def _to_int8(model: onnx.ModelProto, recipe: Int8Recipe, calibration, notes: list[str]):
    """The model quantized by onnxruntime.quantization as `recipe` says, and the report's
    description of it."""
    from onnxruntime import quantization as q

    fmt, method = recipe.fmt, recipe.method
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    work = model
    if opset < PER_CHANNEL_OPSET:
        try:
            work = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
            notes.append(f"opset {opset} converted to {PER_CHANNEL_OPSET} for per-channel weights")
        except Exception as exc:  # the converter raises several types
            notes.append(f"opset {opset} could not be converted to {PER_CHANNEL_OPSET} ({str(exc).splitlines()[0]}): "
                         "weights quantized per tensor")
    per_channel = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0) >= PER_CHANNEL_OPSET
    activations = q.QuantType.QUInt8 if fmt == "uint8" else q.QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="onnxprune-quant-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "quantized.onnx"
        onnx.save(work, str(src))
        _pre_process(src, notes)
        if recipe.mode == "dynamic":
            with quiet_tools(), stage("int8 dynamic quantization"):
                q.quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=q.QuantType.QInt8,
                                   reduce_range=recipe.reduce_range)
            how = {"format": f"{fmt} dynamic", "per_channel": per_channel, "reduce_range": recipe.reduce_range,
                   "calibration": None}
            if calibration is None:
                notes.append("no --calib: dynamic quantization (weights int8, activations quantized at run time)")
        else:
            reader = _reader(q.CalibrationDataReader, calibration, QUANTIZE_SAMPLES)
            methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                       "percentile": q.CalibrationMethod.Percentile}
            # TensorRT: int8 Q/DQ only, zero points 0; biases stay float (it fuses them itself)
            extra = {"ActivationSymmetric": True, "WeightSymmetric": True,
                     "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}} if recipe.symmetric else {}
            if recipe.float_biases:
                extra["QuantizeBias"] = False
            if method == "entropy":  # ranges measured here; onnxruntime's quantizer takes them as overrides
                ranges = _entropy_ranges(src, calibration, Path(tmp), symmetric=recipe.symmetric)
                extra["TensorQuantOverrides"] = {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                                 for name, (lo, hi) in ranges.items()}

            def quantize(options: dict) -> None:
                with quiet_tools(), stage("int8 static quantization"):
                    q.quantize_static(str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ,
                                      per_channel=per_channel, weight_type=q.QuantType.QInt8,
                                      activation_type=activations,
                                      calibrate_method=methods["minmax" if method == "entropy" else method],
                                      reduce_range=recipe.reduce_range, extra_options=options)

            try:
                quantize(extra)
            except ValueError as exc:
                # onnxruntime's widening of weight scales for int32 biases fails on biases that
                # are not 1-D (tf2onnx writes [1, C]); without that step the biases still quantize
                reader = _reader(q.CalibrationDataReader, calibration, QUANTIZE_SAMPLES)
                try:
                    quantize({**extra, "QDQDisableWeightAdjustForInt32Bias": True})
                except Exception as again:  # its calibration and quantizers raise several types
                    raise OnnxPruneError(f"--quantize: onnxruntime's quantizer fails on this model "
                                         f"({str(again).splitlines()[0][:200]})") from None
                notes.append(f"onnxruntime's weight-scale adjustment for int32 biases failed "
                             f"({str(exc).splitlines()[0][:120]}); quantized without it")
            how = {"format": f"{fmt} QDQ" + (" symmetric" if recipe.symmetric else ""), "per_channel": per_channel,
                   "float_biases": recipe.float_biases, "reduce_range": recipe.reduce_range,
                   "calibration": {"samples": reader.samples, "method": method}}
        quantized = onnx.load(str(dst))
    return quantized, how


ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


def _entropy_ranges(src: Path, calibration, folder: Path, symmetric: bool) -> dict[str, tuple[float, float]]:
    """Activation ranges that minimise the KL divergence between each tensor's histogram and its
    8-bit quantization, over 2048 bins searched for a 128-level window. (onnxruntime's
    quantize_static keeps its entropy calibrator at 128 bins for 128 levels, where the only
    candidate range is the full one: the same as minmax.)"""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(str(src), None, augmented_model_path=str(folder / "augmented.onnx"),
                                   calibrate_method=q.CalibrationMethod.Entropy,
                                   extra_options={"symmetric": symmetric, "num_bins": ENTROPY_BINS,
                                                  "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    with quiet_tools():
        calibrator.collect_data(_reader(q.CalibrationDataReader, calibration, QUANTIZE_SAMPLES,
                                        "int8 entropy histograms"))
        tensors = calibrator.compute_data()
    ranges = {}
    for name in tensors:
        low, high = tensors[name].range_value
        ranges[name] = (float(np.asarray(low).ravel()[0]), float(np.asarray(high).ravel()[0]))
    return ranges


def _reader(base, calibration, limit: int, desc: str = "int8 calibration"):
    """onnxruntime.quantization's CalibrationDataReader over the tool's calibration batches, at
    most `limit` samples, with a progress bar in samples; `.samples` counts what it gave."""

    class Reader(base):
        def __init__(self) -> None:
            self.batches = iter(calibration)
            self.samples = 0
            self.bar = None  # shown from the first batch asked for

        def get_next(self):
            if self.bar is None:
                known = getattr(calibration, "limit", None)
                self.bar = progress_bar(desc, total=min(limit, known) if known else None, unit="sample")
            feed = next(self.batches, None) if self.samples < limit else None
            if feed is None:
                self.bar.close()
                return None
            count = len(next(iter(feed.values())))
            self.samples += count
            self.bar.update(count)
            return feed

    return Reader()


def _pre_process(path: Path, notes: list[str]) -> None:
    """onnxruntime's quantization pre-processing in place: its basic graph optimizations (a
    BatchNormalization after a Conv folded in, so it is not quantized apart) and shape
    inference. Where it fails, the model is quantized as it is, and a note says so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    done = path.with_name("preprocessed.onnx")
    try:
        with quiet_tools():
            quant_pre_process(str(path), str(done), skip_symbolic_shape=True)
    except Exception as exc:  # its optimizer and shape inference raise several types
        notes.append(f"pre-processing skipped ({str(exc).splitlines()[0][:200]})")
        return
    done.replace(path)
