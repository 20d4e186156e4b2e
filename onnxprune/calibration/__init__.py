"""Calibration data: real inputs for a model, and per-channel statistics streamed from them.

- `data`: validated feed dicts (`CalibrationData`), from Python iterables (`calibration_feeds`).
- `sources`: reading `.npz`/`.npy` files and folders of them (`load_calibration`).
- `images`: image folders, preprocessed per an image spec (`ImageSpec`).
- `stats`: streaming accumulators (channel moments, Gram matrices, paired statistics).
- `probe`: running the model with intermediate tensors as outputs, within a memory budget.
"""
from .data import CalibrationData, InputSpec, calibration_feeds, model_inputs
from .images import ImageSpec
from .probe import (
           collect_channel_stats,
           collect_gram,
           collect_grams,
           collect_into,
           collect_paired_into,
           collect_paired_stats,
)
from .sources import load_calibration
from .stats import ChannelStats, GramStats, PairedStats, PatchGramStats, RegressionStats

__all__ = ["CalibrationData", "ChannelStats", "GramStats", "ImageSpec", "InputSpec", "PairedStats", "PatchGramStats",
           "RegressionStats", "calibration_feeds", "collect_channel_stats", "collect_gram", "collect_grams",
           "collect_into", "collect_paired_into", "collect_paired_stats", "load_calibration", "model_inputs"]
