"""Fine-tune: train the model's weights through onnxruntime-training, on the graph itself
(onnxprune/training). Within a prune run it comes after verification, so the original model
(the reference) is the teacher that mse and kd match; the structure does not change, only
weights. The trained model must still pass the onnx checker and run with finite outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.core.errors import OnnxPruneError, OptionError
from onnxprune.core.modelio import load_model
from onnxprune.core.progress import log
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import (
    Flag,
    choice,
    closed_fraction,
    integer,
    non_negative,
    optional_choice,
    optional_path,
    optional_positive,
    optional_text,
    positive,
    setting,
    switch,
)
from onnxprune.training.losses import LOSSES
from onnxprune.training.prepare import BATCHNORM_MODES
from onnxprune.training.regularize import REGULARIZERS
from onnxprune.training.schedule import LR_SCHEDULES


def _data(name, value):
    return value  # a path or Python batches: read when the pass runs


UNFOLD_MODES = ("auto", "on", "off")


def _unfold_mode(name, value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return choice(UNFOLD_MODES)(name, value)


def _teacher(name, value):
    if value is not None and not isinstance(value, (str, Path, onnx.ModelProto)):
        raise OptionError(name, value, "expected a model path or ModelProto")
    return value


@dataclass
class FineTuneSettings:
    finetune: object = setting(None, check=_data, cli=Flag(
        "--finetune", "Fine-tune after pruning on DATA: .npz keyed by input names plus labels, a folder of them, "
        "or an image folder with a subfolder per class (needs the [training] extra).", metavar="DATA", parse=Path,
        reads=True))
    val: object = setting(None, check=_data, cli=Flag(
        "--val", "Validation data (same forms): measured before training and after every epoch; the best epoch "
        "is kept. With --quantize, the original, pruned and quantized models' accuracy on it.", metavar="DATA",
        parse=Path, reads=True))
    labels: str = setting("labels", check=optional_text, cli=Flag(
        "--labels", "Key of the labels in the .npz data.", metavar="KEY", show_default=True))
    loss: str | None = setting(None, check=optional_choice(LOSSES), cli=Flag(
        "--loss", "ce (labels), mse (match the teacher, or float labels without one), kd (distil from the teacher, "
        "mixed with ce when there are labels). Default: ce with labels, else mse.", choices=lambda: LOSSES))
    teacher: object = setting(None, check=_teacher, cli=Flag(
        "--teacher", "The model mse/kd match (default in a prune run: the original model).", metavar="MODEL.onnx",
        parse=Path, reads=True))
    temperature: float = setting(2.0, check=positive, cli=Flag(
        "--temperature", "Distillation temperature.", parse=float, show_default=True))
    kd_alpha: float = setting(0.5, check=closed_fraction, cli=Flag(
        "--kd-alpha", "Weight of the distillation term when labels are given (the rest: ce).", parse=float,
        show_default=True))
    epochs: int = setting(1, check=integer(0), cli=Flag("--epochs", "Epochs of fine-tuning.", parse=int,
                                                        show_default=True))
    steps: int | None = setting(None, check=integer(1, optional=True), cli=Flag(
        "--steps", "Stop after N optimizer steps in all.", metavar="N", parse=int))
    batch_size: int = setting(32, check=integer(1), cli=Flag("--batch-size", "Training batch size.", parse=int,
                                                            show_default=True))
    lr: float = setting(1e-4, check=positive, cli=Flag("--lr", "AdamW learning rate.", parse=float,
                                                       show_default=True))
    weight_decay: float = setting(0.01, check=non_negative, cli=Flag(
        "--weight-decay", "AdamW weight decay.", parse=float, show_default=True))
    lr_schedule: str = setting("cosine", check=choice(LR_SCHEDULES), cli=Flag(
        "--lr-schedule", "Decay after warm-up: cosine, step (x0.1 at 50% and 75%), constant.",
        choices=lambda: LR_SCHEDULES, show_default=True))
    warmup: float = setting(0.05, check=closed_fraction, cli=Flag(
        "--warmup", "Linear warm-up over this fraction of the steps.", parse=float, show_default=True))
    clip_grad: float | None = setting(None, check=optional_positive, cli=Flag(
        "--clip-grad", "Clip the global gradient norm to this.", metavar="NORM", parse=float))
    batchnorm: str = setting("train", check=choice(BATCHNORM_MODES), cli=Flag(
        "--batchnorm", "train: batch statistics, running statistics updated (as torch trains); frozen: running "
        "statistics fixed, only scale and bias train.", choices=lambda: BATCHNORM_MODES, show_default=True))
    unfold_bn: str = setting("auto", check=_unfold_mode, cli=Flag(
        "--unfold-bn", "Train every Conv without a BatchNorm (exporters fold them in) with one after it, folded "
        "back at the end; auto: with --batchnorm train and batches of 8 or more.", choices=lambda: UNFOLD_MODES,
        show_default=True))
    train_output: str | None = setting(None, check=optional_text, cli=Flag(
        "--train-output", "The graph output the loss is about (default: the first).", metavar="NAME"))
    train_images: str | None = setting(None, check=optional_text, cli=Flag(
        "--train-images", "Preprocessing for image training/validation data (as --calib-images; default: "
        "--calib-images).", metavar="SPEC"))
    train_limit: int | None = setting(None, check=integer(1, optional=True), cli=Flag(
        "--train-samples", "Use at most N training samples.", metavar="N", parse=int))
    # Set by iterative pruning for each round, not by users: the share of the epochs this run
    # trains for, and which of the teacher's channels each channel of the model is.
    train_fraction: float = setting(1.0)
    channel_origin: dict | None = setting(None)
    regularize: str | None = setting(None, check=optional_choice(REGULARIZERS), cli=Flag(
        "--regularize", "Drive structure to exactly zero while training: group-lasso (whole channels, every coupled "
        "weight together; remove them after with --zero-channels) or l1 (BatchNorm scales, network slimming; prune "
        "after with --importance bn). Needs --reg-strength.", choices=lambda: REGULARIZERS))
    reg_strength: float | None = setting(None, check=optional_positive, cli=Flag(
        "--reg-strength", "Strength of --regularize: each step shrinks by learning rate x this.", metavar="X",
        parse=float))
    keep_zeros: bool = setting(False, check=switch, cli=Flag(
        "--keep-zeros", "Hold every weight of a Conv/MatMul/Gemm that is zero now at zero while training: a sparse "
        "model stays sparse (sparsity set in the same run is always kept).", is_flag=True))
    checkpoint: object = setting(None, check=optional_path, cli=Flag(
        "--checkpoint", "Folder for the training state, saved every epoch and on Ctrl-C/SIGTERM.", metavar="DIR",
        parse=Path))
    resume: bool = setting(False, check=switch, cli=Flag(
        "--resume", "Continue the training saved in --checkpoint.", is_flag=True))

    @property
    def requested(self) -> bool:
        return self.finetune is not None

    def cross_check(self) -> None:
        if self.resume and self.checkpoint is None:
            raise OptionError("resume", True, "needs {checkpoint} (the folder to resume from)")
        if (self.regularize is None) != (self.reg_strength is None):
            raise OptionError("regularize" if self.regularize is None else "reg_strength",
                              self.reg_strength if self.regularize is None else self.regularize,
                              "give {regularize} and {reg_strength} together")
        if not self.requested:
            for name in ("teacher", "steps", "checkpoint", "train_output", "train_limit", "keep_zeros",
                         "regularize"):  # --val also measures --quantize (checked in api.options_from)
                if getattr(self, name) not in (None, False):
                    raise OptionError(name, getattr(self, name), "applies to fine-tuning: give {finetune} DATA")


def present_zeros(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{weight: True where nonzero} for the Conv/MatMul/Gemm weights that hold zeros now."""
    from onnxprune.sparsity import sparse_layers
    from onnxprune.sparsity.layers import WeightStore

    store = WeightStore(model)
    masks = {}
    for layer in sparse_layers(model, store)[0]:
        value = store.read(layer.weight)
        if not value.all():
            masks[layer.weight] = value != 0
    return masks


class FineTune(Pass):
    name = "finetune"

    def _regularizer(self, model: onnx.ModelProto, context: Context):
        """The --regularize step, over the channel groups of the model about to be trained."""
        from onnxprune.core.dependency import with_input_shapes
        from onnxprune.core.shapes import complete_shapes, concrete_input_shapes
        from onnxprune.training.regularize import Regularizer

        from .analyze import analyze_dynamic

        working = complete_shapes(with_input_shapes(model, context.input_shapes, copy=True))
        measuring, guessed = concrete_input_shapes(working, context.input_shapes)
        analysis, _ = analyze_dynamic(working, measuring if guessed else None, False)
        regularizer = Regularizer(analysis, self.settings.regularize, self.settings.reg_strength)
        if regularizer.kind == "l1" and not regularizer.scales:
            raise OptionError("regularize", "l1", "slims BatchNormalization scales, and this model has none (folded "
                              "into the convolutions, say): use group-lasso")
        if not regularizer.groups:
            raise OptionError("regularize", regularizer.kind, "the model has no prunable channel group to regularize")
        return regularizer

    def _regularized(self, regularizer, trained: onnx.ModelProto, context: Context) -> dict:
        """What the regularization left at zero in the trained model, and a note on what to do with it."""
        from onnx import numpy_helper

        values = {t.name: t for t in trained.graph.initializer}

        class Read:  # the trained values by name, as the training state offers them
            def __init__(self, tensor):
                self.data = numpy_helper.to_array(tensor)

        summary = regularizer.summary({name: Read(t) for name, t in values.items()})
        if regularizer.untrained:
            summary["untrained_tensors"] = len(regularizer.untrained)
        if summary["kind"] == "group-lasso":
            context.notes.append(f"group-lasso: {summary['channels_zero']} of {summary['channels']} channels are "
                                 f"exactly zero, in {summary['groups_with_zeros']} group(s); `onnxprune MODEL "
                                 "--zero-channels` removes them without changing the function")
        else:
            context.notes.append(f"l1: {summary['scales_zero']} of {summary['scales']} BatchNorm scales are exactly "
                                 "zero; prune with --importance bn (and --global to rank them across layers)")
        return summary

    def __init__(self, settings: FineTuneSettings, image_spec: str | None = None, seed: int | None = None,
                 masker=None) -> None:
        self.settings = settings
        self.image_spec = settings.train_images or image_spec
        self.seed = seed
        self.masker = masker  # gradual pruning's channel masks (passes/gradual.py)

    def requires(self, model, context: Context) -> None:
        if self.settings.finetune is None:
            raise OptionError("finetune", None, "give the training data")
        self.check_runtime()

    @staticmethod
    def check_runtime() -> None:
        """Raise RuntimeMissing (naming the extra) unless onnxruntime-training is usable: a
        pipeline calls this when it is built, not after minutes of pruning."""
        from onnxprune.core.runtime import import_training_api

        import_training_api()

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        from onnxprune.training import FineTuner, TrainingConfig, load_training_data

        s = self.settings
        seed = context.seed if self.seed is None else self.seed
        train = load_training_data(s.finetune, model, labels=s.labels, image_spec=self.image_spec,
                                   batch_size=s.batch_size, limit=s.train_limit)
        val = load_training_data(s.val, model, labels=s.labels, image_spec=self.image_spec,
                                 batch_size=s.batch_size) if s.val is not None else None
        teacher = s.teacher
        if isinstance(teacher, (str, Path)):
            teacher = load_model(teacher)
        if teacher is None and context.reference is not None:
            # the unpruned model as the user's interface has it: --input-shape fixed its dims for
            # the analysis only, and training batches need not have those dims
            from onnxprune.core.shapes import restore_interface

            teacher = onnx.ModelProto()
            teacher.CopyFrom(context.reference)
            restore_interface(teacher, context.interface, False)
            del teacher.graph.value_info[:]
        config = TrainingConfig(loss=s.loss, epochs=s.epochs, steps=s.steps, lr=s.lr, weight_decay=s.weight_decay,
                                lr_schedule=s.lr_schedule, warmup=s.warmup, clip_grad=s.clip_grad,
                                temperature=s.temperature, kd_alpha=s.kd_alpha, batchnorm=s.batchnorm,
                                unfold_bn=s.unfold_bn, fraction=s.train_fraction,
                                output=s.train_output, seed=seed, checkpoint=s.checkpoint, resume=s.resume)
        kept = compose_origins(s.channel_origin, kept_channels(context))
        masker = self.masker
        masks = context.weight_masks or (present_zeros(model) if s.keep_zeros else {})
        if masker is None and masks:  # sparse weights stay sparse
            from onnxprune.training.masks import WeightMasker

            masker = WeightMasker(masks)
        elif masker is None and not s.keep_zeros:
            sparse = sum(1 for mask in present_zeros(model).values() if (~mask).mean() >= 0.4)
            if sparse:
                context.notes.append(f"fine-tuning: {sparse} layer(s) have 40% or more zero weights, which training "
                                     "fills in; give --keep-zeros to keep them sparse")
        regularizer = self._regularizer(model, context) if s.regularize is not None else None
        outcome = FineTuner(model, config, teacher, kept, masker=masker, regularizer=regularizer).fit(train, val)
        if regularizer is not None:
            outcome.report["regularization"] = self._regularized(regularizer, outcome.model, context)
        if masker is not None and masker.unwritable:
            context.notes.append(f"fine-tuning: {len(masker.unwritable)} masked tensor(s) are not trained parameters "
                                 "and kept their values")
        outcome.report["teacher"] = None if outcome.report["loss"] == "ce" else (
            str(s.teacher) if isinstance(s.teacher, (str, Path)) else "the original model"
            if s.teacher is None else "given")
        context.notes.extend(f"fine-tuning: {note}" for note in outcome.report.get("notes", []))
        self._feed = next(iter(train.epoch(0, seed, shuffle=False)))[0]
        return PassResult(outcome.model, {"finetune": outcome.report})

    def ensures(self, result: PassResult, context: Context) -> None:
        """The trained model passes the checker and runs with finite outputs."""
        try:
            onnx.checker.check_model(result.model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise OnnxPruneError(f"the fine-tuned model fails the onnx checker ({str(exc).splitlines()[0]})") from None
        from onnxprune.core.runtime import require_runtime

        ort = require_runtime("checking the fine-tuned model")
        session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
        for output, value in zip(session.get_outputs(), session.run(None, self._feed)):
            if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
                raise OnnxPruneError(f"the fine-tuned model gives NaN/inf in output {output.name!r}; lower the "
                                     "learning rate")
        log.info("fine-tuned model checked: onnx checker and a finite onnxruntime run")


def kept_channels(context: Context) -> dict:
    """For each tensor the pruning plan shrank along axis 1: which of the original's channels
    survive (fine-tuning's unfolded BatchNorms restore the original's statistics there)."""
    return kept_channels_of(context.analysis, context.plan)


def kept_channels_of(analysis, plan) -> dict:
    """kept_channels for an analysis and its plan."""
    if analysis is None or plan is None or not plan.removed_by_atom():
        return {}
    from onnxprune.core.layout import kept_positions

    kept = plan.kept_by_atom(analysis.atoms)
    found = {}
    for tensor, axes in analysis.layouts.items():
        if 1 in axes:
            found[tensor] = kept_positions(axes[1], analysis.atoms, kept)
    return found


def compose_origins(origin: dict | None, kept: dict) -> dict:
    """Channels of the teacher each channel is, after a plan keeping `kept` of a model whose
    channels were `origin` of the teacher's (None: the model's channels are the teacher's)."""
    if origin is None:
        return dict(kept)
    composed = dict(origin)
    for tensor, indices in kept.items():
        base = origin.get(tensor)
        composed[tensor] = indices if base is None else base[indices]
    return composed
