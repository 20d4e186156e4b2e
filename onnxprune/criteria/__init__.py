"""Importance criteria, one module each. See onnxprune.core.criteria for the contract."""
from . import activation, bn_scale, gradient, magnitude, random  # noqa: F401
