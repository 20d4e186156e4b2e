"""Ops that act on each element alone: channels pass straight through."""
from onnxprune.core.rules import OpRule, register

from ._common import passthrough

ELEMENTWISE_UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp",
    "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not",
    "Shrink", "IsNaN", "IsInf", "Clip", "Identity", "Cast",
)


@register
class ElementwiseUnary(OpRule):
    # Clip's min/max inputs are scalars by the spec, so they never carry channels.
    ops = ELEMENTWISE_UNARY

    def propagate(self, node, ctx):
        passthrough(ctx)


@register
class DropoutRule(OpRule):
    ops = ("Dropout",)

    def propagate(self, node, ctx):
        passthrough(ctx, outputs=(0, 1))  # the mask has the data's shape
