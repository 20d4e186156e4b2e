"""Load calibration data: the real inputs data-driven criteria, recovery and block influence
measure the network on. The model is not changed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, integer, optional_text, setting, switch


def _data(name, value):
    return value  # a path, CalibrationData or any iterable of feed dicts: checked when read


@dataclass
class CalibrationSettings:
    calib: object = setting(None, check=_data, cli=Flag(
        "--calib", "Calibration inputs: .npz/.npy keyed by input name, or a folder of them or of images.",
        metavar="PATH", parse=Path, reads=True))
    image_spec: str | None = setting(None, check=optional_text, cli=Flag(
        "--calib-images", "Preprocessing for an image folder, e.g. "
        "size=224x224,mean=.485/.456/.406,std=.229/.224/.225,layout=NCHW.", metavar="SPEC"))
    calib_limit: int | None = setting(None, check=integer(1, optional=True), cli=Flag(
        "--calib-samples", "Use at most N calibration samples.", metavar="N", parse=int))
    allow_nonfinite: bool = setting(False, check=switch, cli=Flag(
        "--allow-nonfinite", "Accept calibration data holding NaN/inf (refused by default).", is_flag=True))
    calib_mask: str | None = setting(None, check=optional_text, cli=Flag(
        "--calib-mask", "The [batch, sequence] input whose zeros mark padding, left out of the statistics "
        "(default: an input named like attention_mask; 'none' for none).", metavar="INPUT"))


class LoadCalibration(Pass):
    name = "calibration"

    def __init__(self, settings: CalibrationSettings, labels: str | None = None) -> None:
        self.settings = settings
        self.labels = labels  # the key of class ids in .npz calibration files, read where present

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        context.calibration = calibration_data(self.settings, model)
        if context.calibration is not None and self.labels and isinstance(self.settings.calib, (str, Path)):
            context.calibration.labels = _labels(self.labels, self.settings.calib)
        described = context.calibration.description if context.calibration is not None else None
        mask = context.calibration.mask_input if context.calibration is not None else None
        if mask is not None:
            context.notes.append(f"calibration statistics leave out padding: the positions where {mask!r} is 0")
        return PassResult(model, {"calibration": described}, modified=False)


def calibration_data(settings: CalibrationSettings, model: onnx.ModelProto, default_limit: int | None = None):
    """The calibration data as a re-iterable CalibrationData, or None without any."""
    if settings.calib is None:
        return None
    from onnxprune.calibration import (
        CalibrationData,
        calibration_feeds,
        load_calibration,
    )

    limit = settings.calib_limit if settings.calib_limit is not None else default_limit
    if isinstance(settings.calib, (str, Path)):
        data = load_calibration(settings.calib, model, image_spec=settings.image_spec, limit=limit,
                                allow_nonfinite=settings.allow_nonfinite)
    elif isinstance(settings.calib, CalibrationData):
        data = settings.calib if limit is None else settings.calib.limited(limit)
    else:
        data = calibration_feeds(settings.calib, model, limit=limit, allow_nonfinite=settings.allow_nonfinite)
    if settings.calib_mask is not None:
        data.with_mask(None if settings.calib_mask.lower() == "none" else settings.calib_mask)
    return data


def _labels(key: str, calib):
    """The class ids under `key` in the .npz calibration file(s), or None where there are none."""
    from onnxprune.core.errors import OptionError
    from onnxprune.sensitivity.formats import load_labels

    try:
        labels = load_labels(key, calib)
    except OptionError:  # no such key, or not .npz files: the data has no labels
        return None
    return labels if labels.ndim == 1 and labels.dtype.kind in "iu" else None
