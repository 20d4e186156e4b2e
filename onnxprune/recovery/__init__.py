"""Training-free recovery: make up, inside the graph, for what removed channels contributed.

Methods (`--recover`, comma-separated), each in its own module:
- bias (compensate.py): the removed inputs' mean contribution goes into the layer's bias.
- lsq (compensate.py): each layer that lost inputs is refitted by least squares, on the
  original model's activations, to reproduce its output from the inputs it kept.
- refit (refit.py): layer after layer, downstream of the first pruned layer, each layer is
  refitted to the original's output from the inputs the pruned network before it actually
  produces (both models run on the same data), so later layers also undo earlier errors.
- bn (batchnorm.py): BatchNormalization layers after a pruned layer get the per-channel
  affine correction that best maps their pruned input to the original one.

bias and lsq are worked out before a plan is applied (`prepare`) and written after it
(`finish`); refit and bn need the exported model next to the original.
"""
from __future__ import annotations

from ..core.errors import OptionError
from .batchnorm import reestimate_batchnorm
from .compensate import LayerEdit, Recovery, finish, prepare
from .refit import RefitTarget, refit_layers, refit_targets

METHODS = ("bias", "lsq", "refit", "bn")

__all__ = ["METHODS", "LayerEdit", "Recovery", "RefitTarget", "finish", "parse_methods", "prepare",
           "reestimate_batchnorm", "refit_layers", "refit_targets"]


def parse_methods(methods) -> tuple[str, ...]:
    """--recover as given: "bias,lsq", "none", None, or a sequence of method names."""

    if not methods or methods == "none":
        return ()
    if isinstance(methods, str):
        methods = methods.split(",")
    methods = tuple(m.strip() for m in methods if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError("recover", unknown[0], f"choose from {', '.join(METHODS)} (comma-separated) or none")
    return methods

