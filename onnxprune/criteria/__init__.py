"""Importance criteria, one module each. See onnxprune.importance for the contract."""
from . import activation, bn_scale, magnitude, random  # noqa: F401
