"""Weight sparsity: zero the least important weights of every Conv, MatMul and Gemm, unstructured,
N:M (2:4 for TensorRT's sparse tensor cores) or in blocks. Runs after channel and block
removal, on the layers that are left; shapes do not change. The masks stay in the context so
that fine-tuning keeps the zeros (onnxprune.sparsity)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.core.dependency import with_input_shapes
from onnxprune.core.errors import OptionError
from onnxprune.core.shapes import complete_shapes
from onnxprune.pipeline import Context, Pass, PassResult, note_shapes
from onnxprune.settings import Flag, choice, optional_ratio, setting
from onnxprune.sparsity import METHODS, parse_pattern, sparsify


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
        "layer's input Hessian, the weights that stay updated to make up (wanda and sparsegpt need --calib).",
        choices=lambda: METHODS, show_default=True))

    def cross_check(self) -> None:
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

    def __init__(self, settings: SparsitySettings, global_rank: bool = False, exclude=()) -> None:
        self.settings = settings
        self.global_rank = global_rank
        self.exclude = exclude

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        s = self.settings
        if context.reference is None:  # nothing before this pass analysed the model: verify against it as given
            context.reference = complete_shapes(with_input_shapes(model, context.input_shapes, copy=True))
            note_shapes(context, context.reference)
        if not context.owned:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model = copy
        context.owned = True
        result = sparsify(model, s.pattern, s.sparsity or 0.0, s.sparsity_method, self.global_rank, self.exclude,
                          context.calibration)
        context.weight_masks = result.masks
        total = result.report["total"]
        note = (f"sparsity {s.pattern} by {s.sparsity_method}: {total['sparsity']:.1%} of the weights of "
                f"{total['layers']} layer(s) are zero")
        if result.report["skipped"]:
            note += f"; {len(result.report['skipped'])} layer(s) left dense (see sparsity.skipped in the report)"
        context.notes.append(note)
        context.notes.extend(result.report["notes"])
        return PassResult(model, {"sparsity": result.report}, modified=bool(total["zeros"]))
