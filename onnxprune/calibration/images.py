"""Images as model input: reading, resizing and normalising them per an image spec.

A comma-separated list of ``key=value`` items, e.g.
``size=224x224,resize=256,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW``:

* ``size=HxW`` or ``size=S``: the model's input size. It defaults to the input's fixed dims.
* ``resize=S``: scale the shorter side to S, then crop the centre to ``size``. Without it, images
  are stretched to ``size``.
* ``mean=a/b/c``, ``std=a/b/c``: one value, or one per channel (defaults 0 and 1).
* ``scale=1/255`` (the default): a number or a fraction. Each value is
  ``(pixel * scale - mean) / std``, with the pixel in 0..255.
* ``layout=NCHW|NHWC``: defaults to the side where the model's input has 1 or 3 channels.
* ``channels=3|1``: RGB or greyscale. Defaults to the model's channel dim, else 3.
* ``order=RGB|BGR``: channel order (default RGB).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..core.errors import OnnxPruneError, first_line
from .data import CalibrationData, InputSpec, quoted_names

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")



@dataclass(frozen=True)
class ImageSpec:
    """How images become model input; `ImageSpec.parse("size=224x224,mean=...")`, see the module doc."""

    size: tuple[int, int] | None = None  # (H, W); None: the model input's fixed dims
    resize: int | None = None  # shorter side first, then a centre crop; None: stretch to size
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str | None = None  # "NCHW" or "NHWC"; None: from the model input
    channels: int | None = None  # 3 (RGB) or 1 (greyscale); None: from the model input, else 3
    order: str = "RGB"

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        fields = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _SPEC_PARSERS:
                raise OnnxPruneError(f"image spec {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                                     f"{', '.join(_SPEC_PARSERS)}")
            try:
                fields[key] = _SPEC_PARSERS[key](value.strip())
            except (ValueError, ZeroDivisionError) as exc:
                raise OnnxPruneError(f"image spec {text!r}: {item!r}: {first_line(exc)}") from None
        return cls(**fields)

    def __str__(self) -> str:
        parts = []
        if self.size:
            parts.append(f"size={self.size[0]}x{self.size[1]}")
        if self.resize:
            parts.append(f"resize={self.resize}")
        parts += [f"mean={'/'.join(f'{v:g}' for v in self.mean)}", f"std={'/'.join(f'{v:g}' for v in self.std)}",
                  f"scale={self.scale:g}"]
        parts += [f"{key}={getattr(self, key)}" for key in ("layout", "channels") if getattr(self, key)]
        return ",".join(parts + [f"order={self.order}"])

    def resolved(self, spec: InputSpec) -> ImageSpec:
        """This spec with size, layout and channels filled in from a 4-D model input."""
        where = f"image calibration for input {spec.name!r} ({spec.describe()})"
        if spec.dims is None or len(spec.dims) != 4:
            raise OnnxPruneError(f"{where}: images need a 4-D input")
        layout = self.layout or _guess_layout(spec.dims)
        if layout is None:
            raise OnnxPruneError(f"{where}: cannot tell the channel axis; add layout=NCHW or layout=NHWC to the spec")
        channel_dim = spec.dims[1] if layout == "NCHW" else spec.dims[3]
        fixed_channels = channel_dim if isinstance(channel_dim, int) else None
        channels = self.channels or fixed_channels or 3
        if fixed_channels is not None and channels != fixed_channels:
            raise OnnxPruneError(f"{where}: the input has {fixed_channels} channels, the spec says {channels}")
        spatial = spec.dims[2:] if layout == "NCHW" else spec.dims[1:3]
        size = self.size or (tuple(spatial) if all(isinstance(d, int) for d in spatial) else None)
        if size is None:
            raise OnnxPruneError(f"{where}: the input's height and width are not fixed; add size=HxW to the spec")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, channels):
                raise OnnxPruneError(f"{where}: {key} has {len(getattr(self, key))} values for {channels} channels")
        return replace(self, size=size, layout=layout, channels=channels)


def _guess_layout(dims: tuple) -> str | None:
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    return None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise ValueError("expected HxW or a single size")
    return _positive(parts[0]), _positive(parts[1])


def _number(text: str) -> float:
    numerator, sep, denominator = text.partition("/")
    return float(numerator) / float(denominator) if sep else float(text)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split("/"))


def _std(text: str) -> tuple[float, ...]:
    values = _floats(text)
    if any(v <= 0 for v in values):
        raise ValueError("std values must be positive")
    return values


def _choice(*options):
    def parse(text: str) -> str:
        if text.upper() not in options:
            raise ValueError(f"choose {' or '.join(options)}")
        return text.upper()
    return parse


def _channels(text: str) -> int:
    value = int(text)
    if value not in (1, 3):
        raise ValueError("choose 3 (RGB) or 1 (greyscale)")
    return value


_SPEC_PARSERS = {"size": _size, "resize": _positive, "mean": _floats, "std": _std, "scale": _number,
                 "layout": _choice("NCHW", "NHWC"), "channels": _channels, "order": _choice("RGB", "BGR")}


def image_data(inputs: list[InputSpec], images: list[Path], where: Path, image_spec, limit,
                batch_size: int, allow_nonfinite: bool = False) -> CalibrationData:
    if len(inputs) != 1:
        raise OnnxPruneError(f"{where}: image calibration needs a model with one input; this one has "
                             f"{quoted_names(s.name for s in inputs)}")
    if image_spec is None:
        raise OnnxPruneError(f"{where}: images need a preprocessing spec, e.g. "
                             "'size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW'")
    spec = ImageSpec.parse(image_spec) if isinstance(image_spec, str) else image_spec
    spec = spec.resolved(inputs[0])
    step = inputs[0].fixed_batch or batch_size
    usable = len(images) - len(images) % step if inputs[0].fixed_batch else len(images)
    if not usable:
        raise OnnxPruneError(f"{where}: {len(images)} images, fewer than the model's fixed batch of {step}")
    notes = []
    if usable < len(images):
        notes.append(f"{len(images) - usable} of {len(images)} images left out: the model's batch is fixed at {step}")
    name = inputs[0].name

    def produce():
        for start in range(0, usable, step):
            group = images[start:start + step]
            source = str(group[0]) if len(group) == 1 else f"{group[0]} .. {group[-1].name}"
            yield source, {name: np.stack([image_array(path, spec) for path in group])}

    description = f"{where} ({len(images)} images, {spec})"
    return CalibrationData(inputs, produce, description, limit, notes=notes, allow_nonfinite=allow_nonfinite)


def image_array(path: Path, spec: ImageSpec) -> np.ndarray:
    """One image as model input without the batch axis, laid out and normalised per `spec`."""
    pixels = _load_pixels(path, spec.channels)
    height, width = spec.size
    if spec.resize:
        shorter = min(pixels.shape[:2])
        scaled = (round(pixels.shape[0] * spec.resize / shorter), round(pixels.shape[1] * spec.resize / shorter))
        pixels = _resize_pixels(pixels, (max(scaled[0], height), max(scaled[1], width)))
        top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
        pixels = pixels[top:top + height, left:left + width]
    elif pixels.shape[:2] != (height, width):
        pixels = _resize_pixels(pixels, (height, width))
    values = pixels.astype(np.float32) * np.float32(spec.scale)
    if spec.order == "BGR":
        values = values[..., ::-1]
    values = (values - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(values.transpose(2, 0, 1) if spec.layout == "NCHW" else values)


def _image_backend() -> str:
    try:
        import PIL.Image  # noqa: F401
        return "pil"
    except ImportError:
        pass
    try:
        import skimage.io  # noqa: F401
        import skimage.transform  # noqa: F401
        return "skimage"
    except ImportError:
        raise OnnxPruneError("reading images needs Pillow or scikit-image: pip install pillow") from None


def _load_pixels(path: Path, channels: int) -> np.ndarray:
    """The image as uint8 [H, W, channels]."""
    try:
        if _image_backend() == "pil":
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
        else:
            import skimage.io

            pixels = _to_channels(np.asarray(skimage.io.imread(str(path))), channels)
    except OnnxPruneError:
        raise
    except Exception as exc:  # decoders raise many types for broken files
        raise OnnxPruneError(f"{path}: cannot read image ({first_line(exc)})") from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """scikit-image's decoded array (grey, RGB or RGBA, any integer depth) as uint8 with `channels`."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    pixels = pixels.astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] in (1, 2) else pixels[..., :3]
    if channels == 3:
        return rgb
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L"
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]


def _resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 [H, W, C] to `size` (H, W)."""
    height, width = size
    if _image_backend() == "pil":
        from PIL import Image

        channels = pixels.shape[2]
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        resized = np.asarray(image.resize((width, height), Image.BILINEAR))
        return resized.reshape(height, width, channels)
    import skimage.transform

    resized = skimage.transform.resize(pixels, (height, width), order=1, preserve_range=True, anti_aliasing=True)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)
