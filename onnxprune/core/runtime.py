"""Finding whichever onnxruntime flavour is installed.

onnxruntime, onnxruntime-gpu and onnxruntime-training-cpu all install the same
`onnxruntime` package and overwrite each other silently, so onnxprune depends on
none of them: the user picks one with an extra, and features that need a runtime
ask for it here and name the extra to install when it is missing.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
import types
from functools import lru_cache

from .errors import RuntimeMissing

INSTALL_HINT = (
    "install one onnxruntime flavour: pip install 'onnxprune[ort]' "
    "(or [gpu], or [training] for fine-tuning)"
)


@lru_cache(maxsize=None)
def _import_ort():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        return None


def has_runtime() -> bool:
    ort = _import_ort()
    return ort is not None and hasattr(ort, "InferenceSession")


def require_runtime(feature: str):
    """Return the onnxruntime module, or raise a one-line error naming the extra."""
    ort = _import_ort()
    if ort is None or not hasattr(ort, "InferenceSession"):
        raise RuntimeMissing(f"{feature} needs onnxruntime: {INSTALL_HINT}")
    return ort


def runtime_description() -> str:
    ort = _import_ort()
    if ort is None:
        return "none"
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return getattr(ort, "__version__", "?")
    for dist in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return f"onnxruntime {getattr(ort, '__version__', '?')}"


def import_training_api():
    """Import onnxruntime's on-device training API (artifacts + api modules).

    `import onnxruntime.training` pulls in torch through its `amp` and `optim`
    subpackages, which the on-device API never uses; when torch is absent they are
    replaced by empty modules so the on-device flow still imports.
    """
    ort = _import_ort()
    if ort is None:
        raise RuntimeMissing(
            "fine-tuning needs onnxruntime-training-cpu: pip install 'onnxprune[training]' "
            "in an environment without another onnxruntime flavour"
        )
    try:
        importlib.import_module("torch")
    except ImportError:
        for sub in ("onnxruntime.training.amp", "onnxruntime.training.optim"):
            sys.modules.setdefault(sub, types.ModuleType(sub))
    if not _training_flavour_installed():
        raise RuntimeMissing(
            f"fine-tuning needs the onnxruntime-training-cpu flavour, and this environment has "
            f"{runtime_description()}: install onnxprune[training] in a separate environment (the flavours "
            "overwrite each other's files)"
        )
    try:
        artifacts = importlib.import_module("onnxruntime.training.artifacts")
        api = importlib.import_module("onnxruntime.training.api")
    except ImportError as exc:
        raise RuntimeMissing(
            f"onnxruntime.training is not usable ({exc}); another onnxruntime flavour was "
            "probably installed over onnxruntime-training-cpu: reinstall it with "
            "pip install --force-reinstall 'onnxprune[training]'"
        ) from None
    return artifacts, api


def _training_flavour_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-training-cpu", "onnxruntime-training"):
        try:
            version(dist)
            return True
        except PackageNotFoundError:
            continue
    return False


@contextlib.contextmanager
def quiet_tools():
    """Run onnxruntime's Python tools (quantization, .ort conversion) without their prints on
    standard output (where the CLI's report may go) and their advice and warnings on the root
    and their own loggers; what matters reaches the report's notes."""
    loggers = [logging.getLogger(), logging.getLogger("ort_format_model.utils")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
