"""Weight sparsity: zero the least important weights of every Conv, MatMul and Gemm, unstructured,
N:M (2:4 for TensorRT's sparse tensor cores) or in blocks. Runs after channel and block
removal, on the layers that are left; shapes do not change. The masks stay in the context so
that fine-tuning keeps the zeros (onnxprune.sparsity).

With a fine-tuning pass handed in (`--schedule cubic`), the zeros are not set at once: the
model is fine-tuned while each layer's share of zeros grows on the cubic schedule, by weight
magnitude at each update (GradualWeightMasker), and what it ends with is the sparse model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.core.dependency import with_input_shapes
from onnxprune.core.errors import OptionError
from onnxprune.core.shapes import complete_shapes
from onnxprune.pipeline import Context, Pass, PassResult, note_shapes, require
from onnxprune.settings import Flag, choice, optional_ratio, setting, switch
from onnxprune.sparsity import METHODS, parse_pattern, sparsify


def _layer_sparsities(name, value) -> tuple:
    """("glob=R", ...) or ((glob, R), ...) as ((glob, R), ...), each R in [0, 1)."""
    pairs = []
    for item in value or ():
        if isinstance(item, str):
            glob, sep, ratio = item.rpartition("=")
            if not sep or not glob:
                raise OptionError(name, item, "expected PATTERN=R, e.g. 'fc*=0.3'")
            item = (glob, ratio)
        try:
            glob, ratio = item
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise OptionError(name, item, "expected PATTERN=R with R a number, e.g. 'fc*=0.3'") from None
        if not 0.0 <= ratio < 1.0:
            raise OptionError(name, f"{glob}={ratio:g}", "R must be in [0, 1)")
        pairs.append((str(glob), ratio))
    return tuple(pairs)


@dataclass
class SparsitySettings:
    sparsity: float | None = setting(None, check=optional_ratio, cli=Flag(
        "--sparsity", "Fraction of the weights of every Conv/MatMul/Gemm to set to zero (shapes stay), in [0, 1); "
        "N:M patterns set their own.", metavar="R", parse=float))
    pattern: object = setting("unstructured", check=parse_pattern, cli=Flag(
        "--pattern", "Where the zeros go: unstructured, N:M along the input channels (2:4 for TensorRT's sparse "
        "kernels, 4:8) or block:RxC (R outputs by C inputs).", metavar="PATTERN", show_default=True))
    sparsity_method: str = setting("magnitude", check=choice(lambda: METHODS), cli=Flag(
        "--sparsity-method", "How weights are chosen: magnitude |w|; wanda |w| x rms of its input; sparsegpt, the "
        "layer's input Hessian, the weights that stay updated to make up; taylor |g w| and obd E[g^2] w^2 / 2 from "
        "gradients (need the [training] extra). All but magnitude need --calib.",
        choices=lambda: METHODS, show_default=True))

    layer_sparsity: tuple = setting((), check=_layer_sparsities, cli=Flag(
        "--layer-sparsity", "Sparsity of the layers whose node or weight name matches a glob, apart from --sparsity "
        "(0 keeps them dense; repeatable; the last match wins).", metavar="PATTERN=R", multiple=True))
    sparse_storage: bool = setting(False, check=switch, cli=Flag(
        "--sparse-storage", "Write the sparse weights as ONNX sparse initializers where that makes them smaller "
        "(float32 with more than 2/3 zeros: each nonzero also stores an 8-byte position). Smaller file only: "
        "onnxruntime makes them dense when it loads the model.", is_flag=True))

    def cross_check(self) -> None:
        if self.layer_sparsity and not self.requested:
            raise OptionError("layer_sparsity", "=".join(map(str, self.layer_sparsity[0])), "sets layers apart from "
                              "{sparsity}: give it too")
        if self.layer_sparsity and self.pattern.kind == "nm":
            raise OptionError("layer_sparsity", "=".join(map(str, self.layer_sparsity[0])), f"{self.pattern} sets "
                              "every layer's sparsity (--exclude keeps layers dense)")
        if self.sparse_storage and not self.requested:
            raise OptionError("sparse_storage", True, "stores the weights {sparsity} makes sparse: give it too")
        fixed = self.pattern.fixed_sparsity
        if fixed is not None and self.sparsity not in (None, 0.0) and abs(self.sparsity - fixed) > 1e-9:
            raise OptionError("sparsity", self.sparsity, f"the {self.pattern} pattern sets the sparsity to {fixed:g}; "
                              "drop it or give that value")

    @property
    def requested(self) -> bool:
        return bool(self.sparsity) or self.pattern.fixed_sparsity is not None


class Sparsify(Pass):
    """`global_rank` and `exclude` are the channel plan's settings (--global, --exclude), which
    apply to weights too."""

    name = "sparsity"

    def __init__(self, settings: SparsitySettings, global_rank: bool = False, exclude=(), gradual=None,
                 sensitivity=None, mask_by: str = "magnitude") -> None:
        self.settings = settings
        self.global_rank = global_rank
        self.exclude = exclude
        self.gradual = gradual  # a FineTune pass to reach the sparsity during (--schedule cubic)
        self.sensitivity = sensitivity  # a SensitivityResult measured with --sparsity: per-layer sparsities
        self.mask_by = mask_by  # what the gradual masks choose by: magnitude or movement

    def requires(self, model, context: Context) -> None:
        if self.gradual is not None:
            self.gradual.requires(model, context)

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        s = self.settings
        if context.reference is None:  # nothing before this pass analysed the model: verify against it as given
            context.reference = complete_shapes(with_input_shapes(model, context.input_shapes, copy=True))
            note_shapes(context, context.reference)
        model = context.own(model)
        if self.gradual is not None:
            model, result = self._during_finetuning(model, context)
        else:
            result = sparsify(model, s.pattern, s.sparsity or 0.0, s.sparsity_method, self.global_rank, self.exclude,
                              context.calibration, ratios=self._layer_ratios(model, context))
        context.weight_masks = result.masks
        total = result.report["total"]
        method = result.report["method"]
        note = (f"sparsity {s.pattern} by {method}: {total['sparsity']:.1%} of the weights of "
                f"{total['layers']} layer(s) are zero")
        if result.report["skipped"]:
            note += f"; {len(result.report['skipped'])} layer(s) left dense (see sparsity.skipped in the report)"
        context.notes.append(note)
        context.notes.extend(result.report["notes"])
        return PassResult(model, {"sparsity": result.report}, modified=bool(total["zeros"]))

    def _layer_ratios(self, model: onnx.ModelProto, context: Context) -> dict[str, float]:
        """{weight: sparsity} for the layers that do not take --sparsity as it is: allocated from
        the sensitivity curves, then --layer-sparsity's globs (the last match wins)."""
        import fnmatch

        from onnxprune.sparsity.allocate import allocate_sparsity
        from onnxprune.sparsity.sparsify import eligible_layers

        s = self.settings
        if self.sensitivity is None and not s.layer_sparsity:
            return {}
        _, layers, _ = eligible_layers(model, s.pattern, self.exclude)
        given: dict[str, float] = {}
        for layer in layers:
            for glob, ratio in s.layer_sparsity:
                if fnmatch.fnmatchcase(layer.name, glob) or fnmatch.fnmatchcase(layer.weight, glob):
                    given[layer.weight] = ratio
        unused = [glob for glob, _ in s.layer_sparsity
                  if not any(fnmatch.fnmatchcase(layer.name, glob) or fnmatch.fnmatchcase(layer.weight, glob)
                             for layer in layers)]
        if unused:
            context.notes.append(f"--layer-sparsity {unused[0]!r} matches no layer that can be made sparse")
        if self.sensitivity is None:
            return given
        sizes = {layer.weight: int(np.prod(layer.shape)) for layer in layers}
        curves = {name: points for name, points in self.sensitivity.curves().items()
                  if name in sizes and name not in given}
        if not curves:
            raise OptionError("sensitivity", None, "none of its layers is in this model (measured on another model?), "
                              "or --layer-sparsity sets them all")
        # the measured layers make up what the model as a whole needs beyond the layers whose
        # sparsity is given or not measured (those take --sparsity as it is)
        fixed = sum(sizes[name] * given.get(name, s.sparsity) for name in sizes if name not in curves)
        measured = sum(sizes[name] for name in curves)
        share = max(0.0, (s.sparsity * sum(sizes.values()) - fixed) / measured)
        ratios = {**allocate_sparsity(curves, sizes, share), **given}
        context.notes.append(f"per-layer sparsity from sensitivity curves ({self.sensitivity.data}): {len(curves)} "
                             f"of {len(layers)} layers allocated, the others take "
                             + ("--layer-sparsity or " if given else "") + f"{s.sparsity:g}")
        return ratios

    def _during_finetuning(self, model: onnx.ModelProto, context: Context):
        from onnxprune.sparsity.layers import WeightStore
        from onnxprune.sparsity.sparsify import (
            SparsityResult,
            compressed_weight_bytes,
            eligible_layers,
            sparsity_report,
        )
        from onnxprune.training.masks import GradualWeightMasker

        s = self.settings
        compressed_before = compressed_weight_bytes(model)
        store, layers, skipped = eligible_layers(model, s.pattern, self.exclude)
        zeros_before = {layer.weight: int((store.read(layer.weight) == 0).sum()) for layer in layers}
        masker = GradualWeightMasker(layers, s.pattern, s.sparsity, global_rank=self.global_rank,
                                     mask_by=self.mask_by)
        self.gradual.masker = masker
        model = self.gradual(model, context).model  # its report part goes to the context as it runs
        if masker.unwritable:
            context.notes.append(f"sparsity: {len(masker.unwritable)} weight(s) are not trained parameters and "
                                 "stayed dense")
        store = WeightStore(model)
        layers = [layer for layer in layers if layer.weight in masker.masks]
        report = {"pattern": str(s.pattern), "method": self.mask_by, "target": s.sparsity, "global": self.global_rank,
                  "schedule": {"kind": "cubic", "updates": masker.history},
                  **sparsity_report(model, store, layers, skipped, s.pattern, compressed_before, zeros_before),
                  "notes": []}
        return model, SparsityResult(dict(masker.masks), report)


class StoreSparse(Pass):
    """--sparse-storage: the weights the sparsity pass made sparse go into graph.sparse_initializer
    where that is smaller (onnxprune/sparsity/storage.py). Runs last, after measuring: the model
    computes the same, and what is checked here is that onnxruntime loads the stored form and
    gives the dense model's outputs exactly."""

    name = "sparse_storage"

    def requires(self, model, context: Context) -> None:
        require("sparsity" in context.report, self.name, "the sparsity pass")

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        result = self._store(model, context)
        result.report["notes"] = list(context.notes)  # the measure pass wrote them down before this one ran
        return result

    def _store(self, model: onnx.ModelProto, context: Context) -> PassResult:
        from onnxprune.core.modelio import EXTERNAL_DATA_THRESHOLD, model_bytes, payload_bytes
        from onnxprune.sparsity.storage import store_sparse

        part = context.report["sparsity"]
        storage = part["sparse_storage"]
        if payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            context.notes.append("sparse storage: left dense, the model is saved with external data (which holds "
                                 "dense tensors only)")
            return PassResult(model, {}, modified=False)
        stored = onnx.ModelProto()
        stored.CopyFrom(model)
        moved = store_sparse(stored, [row["weight"] for row in part["layers"]])
        if not moved:
            context.notes.append("sparse storage: no weight is smaller stored sparse (a float32 weight needs more "
                                 "than 2/3 zeros)")
            return PassResult(model, {}, modified=False)
        failure = _same_outputs(model, stored, context)
        if failure is not None:
            context.notes.append(f"sparse storage: left dense ({failure})")
            return PassResult(model, {}, modified=False)
        storage.update(written=True, tensors_written=len(moved),
                       written_bytes={"dense": sum(d for d, _ in moved.values()),
                                      "sparse": sum(s for _, s in moved.values())})
        file_bytes = {**context.report["file_bytes"], "after": model_bytes(stored)}
        return PassResult(stored, {"sparsity": part, "file_bytes": file_bytes})


def _same_outputs(dense: onnx.ModelProto, stored: onnx.ModelProto, context: Context) -> str | None:
    """None when the stored form passes the checker and, where the run's verification had
    inputs, onnxruntime gives the dense model's outputs from it bit for bit; else why not."""
    from onnxprune.core.verify import session

    try:
        onnx.checker.check_model(stored)
    except Exception as exc:  # the checker raises several types
        return f"the onnx checker refuses it: {str(exc).splitlines()[0]}"
    checker = context.checker
    feeds = checker.feeds if checker is not None else None
    if feeds is None:
        return None
    try:
        want = session(dense).run(None, feeds)
        got = session(stored).run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own types
        return f"onnxruntime: {str(exc).splitlines()[0][:200]}"
    if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(want, got)):
        return "onnxruntime's outputs from it differ from the dense model's"
    return None
