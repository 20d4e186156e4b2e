"""Progress bars for long stages, and the package's logger.

The Python API prints nothing: it logs through the `onnxprune` logger, and shows progress
only where a caller turns it on (the CLI does, when stderr is a terminal and -q is not
given). The switch is a context variable, so threads and nested runs do not interfere.
"""
from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

log = logging.getLogger("onnxprune")
_SHOW = contextvars.ContextVar("onnxprune_progress", default=False)


@contextmanager
def showing_progress(enabled: bool = True) -> Iterator[None]:
    """Within this block, long stages show progress bars on stderr."""
    token = _SHOW.set(enabled)
    try:
        yield
    finally:
        _SHOW.reset(token)


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "it") -> Iterable:
    """`iterable`, with a progress bar when progress is on (tqdm), else as it is."""
    if not _SHOW.get():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(desc: str, total: int | None = None, unit: str = "it"):
    """A bar to update by hand (`update(n)`, `set_postfix(loss=...)`) when progress is on,
    else an object whose methods do nothing. Close it when done."""
    if not _SHOW.get():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


@contextmanager
def stage(desc: str) -> Iterator[None]:
    """A bar naming a step that reports no progress of its own (a call into another tool), shown
    while it runs when progress is on."""
    bar = progress_bar(desc, unit="step")
    try:
        yield
    finally:
        bar.close()
