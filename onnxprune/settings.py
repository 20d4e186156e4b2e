"""Settings: each pass declares its own as a small dataclass, once, with how to check each
value and how the command line offers it. The Python API (`PruneOptions`, keyword arguments
of `prune()`) and the CLI options are both made from these declarations, so they cannot
drift apart.

    @dataclass
    class PlanSettings:
        filters: float = setting(0.0, check=ratio, cli=Flag("--filters", "Fraction of ...", parse=float))

A `check` takes (option name, value) and returns the value, normalised, or raises
OptionError naming the option. A `Flag` says how the CLI spells and parses it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.errors import OptionError

_KEY = "onnxprune"


@dataclass(frozen=True)
class Flag:
    """How the CLI offers a setting."""

    flag: str  # "--filters"
    help: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # command-line text -> value (None: the text itself)
    multiple: bool = False  # repeatable; the values arrive as a tuple
    is_flag: bool = False  # a switch
    choices: Callable[[], Iterable[str]] | None = None
    show_default: bool = False
    reads: bool = False  # the value is a path the run reads (checked against every output)


@dataclass(frozen=True)
class SettingInfo:
    check: Callable[[str, Any], Any] | None
    cli: Flag | None


def setting(default=dataclasses.MISSING, *, check=None, cli: Flag | None = None, default_factory=dataclasses.MISSING):
    """A settings field with its check and its CLI flag (None: not offered on the command line)."""
    kwargs = {"metadata": {_KEY: SettingInfo(check, cli)}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, **kwargs)
    return field(default=default, **kwargs)


def info(f: dataclasses.Field) -> SettingInfo:
    return f.metadata.get(_KEY, SettingInfo(None, None))


def checked(settings):
    """`settings` with every field checked and normalised (a new object; raises OptionError)."""
    values = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        check = info(f).check
        values[f.name] = check(f.name, value) if check is not None else value
    return dataclasses.replace(settings, **values)


def combine(name: str, classes: Iterable[type], doc: str = "") -> type:
    """One flat dataclass holding the fields of every settings class (a field several stages
    share, such as `seed`, must be declared alike in each)."""
    seen: dict[str, dataclasses.Field] = {}
    order = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in seen:
                if _default(seen[f.name]) != _default(f):
                    raise TypeError(f"setting {f.name!r} is declared differently by two stages")
                continue
            seen[f.name] = f
            order.append(f)
    specs = [(f.name, f.type, _copy_field(f)) for f in order]
    combined = dataclasses.make_dataclass(name, specs)
    combined.__doc__ = doc
    combined.__module__ = "onnxprune.api"
    return combined


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _copy_field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


def stage(options, cls: type):
    """The settings of one stage, taken from flat options."""
    return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})


def cli_settings(classes: Iterable[type]) -> list[dataclasses.Field]:
    """Fields offered on the command line, once each, in declaration order."""
    seen, out = set(), []
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name not in seen and info(f).cli is not None:
                seen.add(f.name)
                out.append(f)
    return out


# -- checks -----------------------------------------------------------------------------------

def _number(name, value, what="a number"):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(name, value, f"expected {what}, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise OptionError(name, value, f"expected {what}, got NaN")
    return value


def optional_seconds(name, value):
    if value is None:
        return None
    value = _number(name, value, "seconds")
    if value <= 0:
        raise OptionError(name, value, "must be positive")
    return value


def positive(name, value):
    """A finite number > 0 (a learning rate, a temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise OptionError(name, value, "must be a positive number")
    return float(value)


def optional_positive(name, value):
    return None if value is None else positive(name, value)


def non_negative(name, value):
    """A finite number >= 0 (a weight decay)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OptionError(name, value, "must be a number >= 0")
    return float(value)


def closed_fraction(name, value):
    """A fraction in [0, 1], both ends included (a share of the steps, a loss weight)."""
    value = non_negative(name, value)
    if value > 1:
        raise OptionError(name, value, "must be in [0, 1]")
    return value


def ratio(name, value):
    """A fraction to remove, in [0, 1)."""
    value = _number(name, value, "a fraction in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise OptionError(name, value, "must be in [0, 1)")
    return value


def optional_ratio(name, value):
    return None if value is None else ratio(name, value)


def fraction_kept(name, value):
    """A fraction to keep, in (0, 1], or None."""
    if value is None:
        return None
    value = _number(name, value, "a fraction in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise OptionError(name, value, "must be in (0, 1]")
    return value


def open_fraction(name, value):
    """A fraction in (0, 1), or None."""
    if value is None:
        return None
    value = _number(name, value, "a fraction in (0, 1)")
    if not 0.0 < value < 1.0:
        raise OptionError(name, value, "must be in (0, 1)")
    return value


def min_fraction(name, value):
    value = _number(name, value, "a fraction in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise OptionError(name, value, "must be in [0, 1)")
    return value


def count_or_fraction(name, value):
    """A count (1, 2, ...) or a fraction in [0, 1)."""
    value = _number(name, value, "a count or a fraction")
    if not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise OptionError(name, value, "give a count (1, 2, ...) or a fraction in (0, 1)")
    return value


def integer(low: int | None = None, high: int | None = None, optional: bool = False):
    def check(name, value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise OptionError(name, value, f"expected an integer, got {type(value).__name__}")
        value = int(value)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise OptionError(name, value, f"must be {bounds}")
        return value
    return check


def switch(name, value):
    if not isinstance(value, bool):
        raise OptionError(name, value, f"expected True or False, got {type(value).__name__}")
    return value


def choice(options: Callable[[], Iterable[str]] | Iterable[str]):
    def check(name, value):
        allowed = list(options() if callable(options) else options)
        if not isinstance(value, str) or value.lower() not in allowed:
            raise OptionError(name, value, f"choose from {', '.join(allowed)}")
        return value.lower()
    return check


def optional_choice(options: Callable[[], Iterable[str]] | Iterable[str]):
    """choice(options), or None."""
    check = choice(options)
    return lambda name, value: None if value is None else check(name, value)


def names(name, value):
    """A tuple of strings (a single string counts as one)."""
    given = value
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise OptionError(name, given, "expected a list of names") from None
    if not all(isinstance(v, str) for v in value):
        raise OptionError(name, given, "expected a list of names")
    return value


def optional_text(name, value):
    if value is not None and not isinstance(value, str):
        raise OptionError(name, value, f"expected text, got {type(value).__name__}")
    return value


def optional_path(name, value):
    if value is not None and not isinstance(value, (str, Path)):
        raise OptionError(name, value, f"expected a path, got {type(value).__name__}")
    return value


def shapes_dict(name, value):
    """{input name: [dims]} (from --input-shape NAME:D1,D2,...)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in v)
            for k, v in value.items()):
        raise OptionError(name, value, "expected {input name: [positive dims]}")
    return {k: [int(d) for d in v] for k, v in value.items()}
