"""The main job as a function: `prune(model, **options)` builds the pruning pipeline from the
options and runs it. The options are the settings of the passes it uses, flattened into one
PruneOptions (see settings.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .core.criteria import criterion
from .core.dependency import Analysis
from .core.disk_weights import has_disk_weights
from .core.errors import OptionError
from .core.files import write_files
from .core.modelio import save_model
from .core.plan import Plan
from .core.validate import load_input
from .core.verify import Verification
from .passes.analyze import Analyze
from .passes.calibration import CalibrationSettings, LoadCalibration
from .passes.channels import RemoveChannels
from .passes.finetune import (
    FineTune,
    FineTuneSettings,
    compose_origins,
    kept_channels_of,
)
from .passes.gradual import GradualPruning, GradualSettings
from .passes.handover import HandOver, TargetSettings, check_target_options, preset_round_to
from .passes.iterative import IterativePruning, IterativeSettings
from .passes.latency import LatencySettings, TargetLatency
from .passes.layers import LayerSettings, RemoveLayers
from .passes.measure import Measure, MeasureSettings
from .passes.plan import PlanChannels, PlanSettings
from .passes.quantize import Quantize, QuantizeSettings
from .passes.recovery import Recover, RecoverySettings
from .passes.sparsity import Sparsify, SparsitySettings, StoreSparse
from .passes.validate import InputSettings, ValidateInput
from .passes.verify import Verify, VerifySettings
from .pipeline import Context, Pipeline
from .settings import checked, combine, stage
from .sparsity.sparsify import GRADIENT_METHODS
from .training.gradients import require_gradients

# The stages of a prune, in pipeline order; their settings make up PruneOptions.
STAGES = (InputSettings, CalibrationSettings, LayerSettings, PlanSettings, RecoverySettings, SparsitySettings,
          VerifySettings, FineTuneSettings, MeasureSettings, QuantizeSettings, TargetSettings, LatencySettings,
          IterativeSettings, GradualSettings)

PruneOptions = combine("PruneOptions", STAGES, doc="""Every option of prune(), one field per setting of its passes:
InputSettings (input_shapes, seed), CalibrationSettings (calib, image_spec, calib_limit, allow_nonfinite, calib_mask),
LayerSettings (layers, drop_layers, layer_importance), PlanSettings (filters, neurons, heads, head_dim, hidden,
hidden_layernorm, zero_channels, importance, round_to, global_rank, exclude, plan, target_macs, target_params,
min_keep, sensitivity), RecoverySettings (recover), SparsitySettings (sparsity, pattern, sparsity_method,
layer_sparsity, sparse_storage), VerifySettings (verify), FineTuneSettings (finetune, val, labels, loss, teacher,
temperature, kd_alpha, epochs, steps, batch_size, lr, weight_decay, lr_schedule, warmup, clip_grad, batchnorm,
unfold_bn, train_output, train_images, train_limit, regularize, reg_strength, keep_zeros, checkpoint, resume),
MeasureSettings (latency_runs, latency_budget_s), QuantizeSettings (quantize, quant_calibration, quant_mode,
quant_reduce_range), TargetSettings (target), LatencySettings (target_latency), IterativeSettings (iterative,
rewind), GradualSettings (schedule, mask_by). Each is declared, with its check and CLI flag, in its pass's file
under passes/.""")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan | None
    analysis: Analysis | None
    verification: Verification
    report: dict
    # Files that go beside the model, {suffix: bytes}: --target ort-mobile's .ort model and its
    # required-operators config (written by save() as PATH without .onnx + suffix).
    files: dict = dataclasses.field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the pruned model atomically (with external data when large), and the files that
        go beside it. A model whose weights stayed on disk (weights='disk') can only be written
        this way: its weights are read, sliced and written one at a time."""
        out = save_model(self.model, path)
        write_beside(out, self.files)
        return out


def beside(path: str | Path, suffix: str) -> Path:
    """Where a file that goes with the model at `path` is written: model.onnx -> model.ort."""
    path = Path(path)
    return path.with_name((path.stem if path.suffix == ".onnx" else path.name) + suffix)


def write_beside(path: str | Path, files: dict) -> list[Path]:
    """Write {suffix: bytes} beside the model at `path`, atomically, all or none."""
    if not files:
        return []
    targets = [beside(path, suffix) for suffix in files]

    def write(staged: list[Path]) -> None:
        for staged_path, data in zip(staged, files.values()):
            staged_path.write_bytes(data)

    return write_files(targets, write, needed_bytes=sum(len(d) for d in files.values()))


def weights_mode(options) -> str:
    """Where the external data of a model read from a path stays for this run (read_model):
    options that run the model (calibration, recovery, fine-tuning, sensitivity, latency
    search) or rewrite weights value by value (sparsity) need the weights in memory."""
    needs = [flag for flag, given in (("calib", options.calib is not None), ("recover", bool(options.recover)),
                                      ("sparsity", stage(options, SparsitySettings).requested),
                                      ("finetune", options.finetune is not None),
                                      ("sensitivity", options.sensitivity is not None),
                                      ("target_latency", options.target_latency is not None),
                                      ("quantize", options.quantize is not None),
                                      ("target", options.target in ("tensorrt", "ort-mobile"))) if given]
    if not needs:
        return options.weights
    if options.weights == "disk":
        why = "rewrites weights value by value" if needs[0] == "sparsity" else "runs the model"
        raise OptionError("weights", "disk", f"{{{needs[0]}}} {why}, which needs the weights in memory")
    return "memory"


def options_from(options=None, **kwargs):
    """Checked PruneOptions from an options object and/or keyword overrides; OptionError names
    the option at fault (an unknown keyword too)."""
    known = {f.name for f in dataclasses.fields(PruneOptions)}
    for key in kwargs:
        if key not in known:
            raise OptionError(key, None, "unknown option")
    if options is not None and not isinstance(options, PruneOptions):
        raise OptionError("options", None, f"expected PruneOptions, got {type(options).__name__}")
    options = dataclasses.replace(options or PruneOptions(), **kwargs)
    for cls in STAGES:
        settings = checked(stage(options, cls))
        if hasattr(settings, "cross_check"):
            settings.cross_check()
        options = dataclasses.replace(options, **{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})
    if options.val is not None and options.finetune is None and options.quantize is None:
        raise OptionError("val", options.val, "applies to fine-tuning and quantization: give {finetune} DATA or "
                          "{quantize}")
    if options.quant_mode == "static" and options.calib is None:
        raise OptionError("quant_mode", "static", "needs {calib} data: the activation ranges are measured on it")
    check_target_options(options.target, options.quantize, options.calib is not None, options.quant_mode)
    if options.target is not None:
        for name in ("iterative", "target_latency"):
            if getattr(options, name) not in (None, 1):
                raise OptionError("target", options.target, f"does not combine with {{{name}}} yet (prune with "
                                  "--round-to N, then run again with --target)")
        round_to = preset_round_to(options.target, options.round_to, options.quantize)
        source = "--round-to" if round_to == options.round_to else f"--target {options.target}"
        options = dataclasses.replace(options, round_to=round_to, round_to_source=source)
    targets = (options.target_macs, options.target_params, options.target_latency)
    if options.sensitivity is not None and options.sensitivity.sparsity:  # a table of layers made sparse
        sparsity = stage(options, SparsitySettings)
        if any(t is not None for t in targets) or not sparsity.requested or sparsity.pattern.kind == "nm":
            raise OptionError("sensitivity", None, "was measured on weight sparsity (sensitivity --sparsity): it "
                              "allocates {sparsity} R, unstructured or in blocks, among the layers")
        for name in ("global_rank", "schedule"):
            if getattr(options, name) not in (False, "oneshot"):
                raise OptionError("sensitivity", None, f"sets each layer's sparsity; drop {{{name}}}")
    elif options.sensitivity is not None and all(t is None for t in targets):
        raise OptionError("sensitivity", None, "give {target_macs}, {target_params} or {target_latency} to allocate "
                          "with it")
    if options.schedule != "oneshot":
        if options.finetune is None:
            raise OptionError("schedule", options.schedule, "needs {finetune} data: channels or weights are masked "
                              "during fine-tuning")
        sparsity = stage(options, SparsitySettings)
        if sparsity.requested:
            if stage(options, PlanSettings).channels_requested:
                raise OptionError("schedule", options.schedule, "masks channels or weights ({sparsity}) during "
                                  "fine-tuning, not both in one run (prune channels first, then run again)")
            if sparsity.pattern.kind == "nm":
                raise OptionError("schedule", options.schedule, f"{sparsity.pattern} has no intermediate sparsity: "
                                  "sparsify at once and fine-tune (the zeros are held while training)")
            if sparsity.layer_sparsity:
                raise OptionError("schedule", options.schedule, "reaches one sparsity in every layer; "
                                  "{layer_sparsity} applies to one-shot sparsity")
            if sparsity.sparsity_method != "magnitude":
                raise OptionError("schedule", options.schedule, f"zeroes weights as they train, by magnitude or "
                                  f"movement ({{mask_by}}); {{sparsity_method}} {sparsity.sparsity_method} chooses "
                                  "once (drop one)")
        for name in ("layers", "drop_layers", "plan", "target_latency", "recover", "iterative"):
            if getattr(options, name) not in (None, 0, 0.0, (), False, 1):
                raise OptionError("schedule", options.schedule, f"does not combine with {{{name}}} yet")
    if options.iterative > 1:
        if options.finetune is None:
            raise OptionError("iterative", options.iterative, "needs {finetune} data: the rounds alternate pruning "
                              "and fine-tuning")
        for name in ("layers", "drop_layers", "plan", "target_latency"):
            if getattr(options, name) not in (None, 0, 0.0, (), False):
                raise OptionError("iterative", options.iterative, f"does not combine with {{{name}}}")
    elif options.rewind:
        raise OptionError("rewind", True, "applies to {iterative} rounds (give K > 1)")
    if options.target_latency is not None and (options.target_macs is not None or options.target_params is not None):
        raise OptionError("target_latency", options.target_latency, "give it, {target_macs} or {target_params}, "
                          "one of them")
    if options.recover and not stage(options, PlanSettings).channels_requested:
        alone = "{layers}" if stage(options, LayerSettings).requested else \
            "{sparsity}" if stage(options, SparsitySettings).requested else None
        if alone is not None:
            raise OptionError("recover", ",".join(options.recover), f"compensates removed channels; {alone} alone "
                              "removes none (give a channel ratio too, or drop it)")
    if stage(options, SparsitySettings).requested:
        for name in ("iterative", "target_latency"):
            if getattr(options, name) not in (None, 0, 1):
                raise OptionError("sparsity", options.sparsity, f"does not combine with {{{name}}} yet")
    return options


def pruning_pipeline(options) -> Pipeline:
    """The passes that carry out `options` (checked PruneOptions), in order."""
    plan_settings, layer_settings = stage(options, PlanSettings), stage(options, LayerSettings)
    passes = [ValidateInput(stage(options, InputSettings)),
              LoadCalibration(stage(options, CalibrationSettings), labels=options.labels)]
    if layer_settings.requested:
        passes.append(RemoveLayers(layer_settings))
    sparsity = stage(options, SparsitySettings)
    channels = plan_settings.channels_requested or not (layer_settings.requested or sparsity.requested)
    gradual = options.schedule == "cubic"
    if channels:
        chosen = criterion(plan_settings.importance)
        if getattr(chosen, "needs_gradients", False) and options.calib is not None:
            require_gradients(f"--importance {chosen.name}")  # now, not after the analysis
        passes += [Analyze(heads=plan_settings.heads_mode, hidden=plan_settings.hidden_mode),
                   Recover(stage(options, RecoverySettings)), PlanChannels(plan_settings)]
        if gradual:
            passes.append(GradualPruning(stage(options, FineTuneSettings), image_spec=options.image_spec,
                                         mask_by=options.mask_by))
        passes.append(RemoveChannels())
    finetune = stage(options, FineTuneSettings)
    if sparsity.requested and sparsity.sparsity_method in GRADIENT_METHODS and options.calib is not None:
        require_gradients(f"--sparsity-method {sparsity.sparsity_method}")  # now, not after the analysis
    if sparsity.requested:  # the layers that are left lose weights, not shape
        during = FineTune(finetune, image_spec=options.image_spec) if gradual else None
        table = options.sensitivity if options.sensitivity is not None and options.sensitivity.sparsity else None
        passes.append(Sparsify(sparsity, global_rank=options.global_rank, exclude=options.exclude, gradual=during,
                               sensitivity=table, mask_by=options.mask_by))
    passes.append(Verify(stage(options, VerifySettings)))
    if finetune.requested:
        FineTune.check_runtime()
        if not gradual:
            passes.append(FineTune(finetune, image_spec=options.image_spec))
    passes.append(Measure(stage(options, MeasureSettings), options))
    quantize = stage(options, QuantizeSettings)
    if quantize.requested:
        if sparsity.sparse_storage:
            raise OptionError("sparse_storage", True, "stores float weights sparse; {quantize} rewrites them "
                              "(drop one)")
        passes.append(Quantize(quantize, latency_runs=options.latency_runs, latency_budget_s=options.latency_budget_s,
                               target=options.target, val=options.val, labels=options.labels,
                               image_spec=options.image_spec))
    if sparsity.sparse_storage:
        passes.append(StoreSparse())
    if options.target is not None:
        passes.append(HandOver(stage(options, TargetSettings), options.round_to))
    if options.target_latency is not None:
        if finetune.requested:
            raise OptionError("finetune", None, "does not combine with {target_latency} yet")
        return Pipeline([TargetLatency(stage(options, LatencySettings), _latency_step(options))])
    if options.iterative > 1:
        plan, round_, state = _iterative_steps(options)
        return Pipeline([IterativePruning(stage(options, IterativeSettings), plan, round_, state,
                                          checkpoint=options.checkpoint, resume=options.resume)])
    return Pipeline(passes)


def _iterative_steps(options):
    """The one-shot plan's counts, one round (prune to counts, fine-tune a share) as prune() runs,
    and the (save, load) pair for what the rounds carry over (the channels chosen so far)."""
    state = {"teacher": options.teacher, "origin": None}
    untrained = dict(finetune=None, val=None, verify=False, latency_runs=0, checkpoint=None, resume=False)

    def plan(model: onnx.ModelProto) -> dict:
        if state["teacher"] is None:
            state["teacher"] = model
        one_shot = prune(model, dataclasses.replace(options, iterative=1, rewind=False, **untrained))
        state["channels"] = {d.key: d.group.channels for d in one_shot.plan.decisions}
        return {d.key: (d.group.channels, len(d.removed)) for d in one_shot.plan.decisions}

    def round_(model: onnx.ModelProto, keep: dict, fraction: float, checkpoint, resume: bool):
        base = dataclasses.replace(options, iterative=1, rewind=False, keep_counts=keep, target_macs=None,
                                   target_params=None, teacher=state["teacher"], train_fraction=fraction,
                                   checkpoint=checkpoint, resume=resume)
        if options.rewind:
            return named_teacher(rewound_round(model, base))
        result = prune(model, dataclasses.replace(base, channel_origin=state["origin"]))
        state["origin"] = compose_origins(state["origin"], kept_channels_of(result.analysis, result.plan))
        return named_teacher(result)

    def named_teacher(result):
        """The rounds are handed the original as their teacher: say so as a single run would."""
        finetune = result.report.get("finetune")
        if options.teacher is None and finetune and finetune.get("teacher") == "given":
            finetune["teacher"] = "the original model"
        return result

    def rewound_round(model: onnx.ModelProto, base):
        """Choose this round's channels on `model`, then cut all channels chosen so far from the
        original and fine-tune that: the survivors start from the original's weights."""
        chosen = prune(model, dataclasses.replace(base, teacher=None, **untrained))
        kept = state.setdefault("kept", {})  # group key -> the original's channels still there
        for decision in chosen.plan.decisions:
            before = kept.get(decision.key, np.arange(state["channels"][decision.key]))
            kept[decision.key] = np.delete(before, decision.removed)
        plan = {"format": "onnxprune-plan/1", "criterion": chosen.plan.criterion, "heads": options.heads is not None,
                "groups": [{"key": key, "channels": state["channels"][key],
                            "removed": [int(i) for i in np.setdiff1d(np.arange(state["channels"][key]), survivors)]}
                           for key, survivors in kept.items() if len(survivors) < state["channels"][key]]}
        return prune(state["teacher"], dataclasses.replace(base, plan=plan, keep_counts=None, filters=0.0,
                                                           neurons=None, heads=None))

    def save() -> dict:
        return {"origin": None if state["origin"] is None else {k: v.tolist() for k, v in state["origin"].items()},
                "kept": {k: v.tolist() for k, v in state.get("kept", {}).items()}}

    def load(saved: dict) -> None:
        origin = saved.get("origin")
        state["origin"] = None if origin is None else {k: np.asarray(v, np.int64) for k, v in origin.items()}
        state["kept"] = {k: np.asarray(v, np.int64) for k, v in saved.get("kept", {}).items()}

    return plan, round_, (save, load)


def _latency_step(options):
    def step(model: onnx.ModelProto, macs: float):
        step_options = dataclasses.replace(options, target_latency=None, target_macs=macs, verify=True, finetune=None,
                                           latency_runs=options.latency_runs or 20)
        return prune(model, step_options)

    return step


def prune(model: onnx.ModelProto | str | Path, options=None, **kwargs) -> PruneResult:
    """Prune `model` (a ModelProto, which is never changed, or a path) and return the pruned
    model with its report. Keyword arguments override fields of `options`, e.g.
    prune("m.onnx", filters=0.3). A model that fails verification raises VerificationError.
    """
    options = options_from(options, **kwargs)
    mode = weights_mode(options)
    model, owned = load_input(model, mode)
    if mode == "memory" and has_disk_weights(model):  # read earlier with weights='disk'
        weights_mode(dataclasses.replace(options, weights="disk"))  # names the option that needs them
        raise OptionError("weights", options.weights, "the model's weights are on disk (it was read with "
                                                      "weights='disk'); give its path instead")
    return run_pruning(model, options, owned=owned)


def run_pruning(model: onnx.ModelProto, options, owned: bool = False) -> PruneResult:
    """prune() for a model already in memory, with checked options (options_from). With
    owned=True the caller hands the model over: it may be changed in place, and is not copied
    (pipeline plugins use this for the proto they made themselves)."""
    context = Context(owned=owned)
    pipeline = pruning_pipeline(options)
    result = pipeline(model, context)
    if options.target_latency is not None:  # the result of the step kept, with the search's report
        best = pipeline.passes[0].best
        best.report = _ordered(context.report)
        return best
    if options.iterative > 1:  # the last round's result, with the rounds' report
        last = pipeline.passes[0].last
        return PruneResult(result.model, last.plan, last.analysis, last.verification, _ordered(context.report))
    plan = context.plan if context.plan is not None else Plan()  # whole blocks only: no channel plan
    return PruneResult(result.model, plan, context.analysis, context.verification, _ordered(context.report),
                       files=dict(context.files))


_REPORT_ORDER = ("tool", "runtime", "criterion", "gradients", "ratio", "heads_ratio", "neurons_ratio", "head_dim_ratio",
                 "rounding", "calibration", "input_shapes", "notes", "params", "macs", "file_bytes", "latency_ms",
                 "latency_measured", "verification", "finetune", "iterative", "gradual", "quantization", "target",
                 "groups", "summary", "layers", "recovery", "skipped", "rolled_back", "barriers", "seconds")


def _ordered(report: dict) -> dict:
    """The report with its keys in a reading order (the passes add them as they run)."""
    ordered = {key: report[key] for key in _REPORT_ORDER if key in report}
    ordered.update((key, value) for key, value in report.items() if key not in ordered)
    return ordered


# -- fine-tuning alone --------------------------------------------------------------------------

FINETUNE_STAGES = (InputSettings, FineTuneSettings)
FineTuneOptions = combine("FineTuneOptions", FINETUNE_STAGES, doc="""Every option of finetune(): InputSettings
(input_shapes, seed) and FineTuneSettings (finetune: the training data, val, labels, loss, teacher, ...), declared
in passes/validate.py and passes/finetune.py.""")


@dataclass
class FineTuneResult:
    model: onnx.ModelProto
    report: dict


def finetune(model: onnx.ModelProto | str | Path, data, **kwargs) -> FineTuneResult:
    """Fine-tune `model` (a ModelProto, never changed, or a path) on `data` (an .npz file, a
    folder, or a list of (feeds, labels) batches) through onnxruntime-training; returns the
    model with trained weights (same graph otherwise) and the report. Keyword arguments are the
    fields of FineTuneOptions, e.g. finetune(m, "train.npz", val="val.npz", epochs=2, lr=1e-3).
    Needs the onnxruntime-training-cpu flavour: pip install 'onnxprune[training]'."""
    known = {f.name for f in dataclasses.fields(FineTuneOptions)}
    for key in kwargs:
        if key not in known or key == "finetune":
            raise OptionError(key, None, "unknown option")
    options = FineTuneOptions(finetune=data, **kwargs)
    for cls in FINETUNE_STAGES:
        settings = checked(stage(options, cls))
        if hasattr(settings, "cross_check"):
            settings.cross_check()
        options = dataclasses.replace(options, **{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})
    FineTune.check_runtime()
    model, owned = load_input(model)
    context = Context(owned=owned)
    pipeline = Pipeline([ValidateInput(stage(options, InputSettings)), FineTune(stage(options, FineTuneSettings))])
    result = pipeline(model, context)
    report = {**context.report, "notes": context.notes}
    return FineTuneResult(result.model, report)
