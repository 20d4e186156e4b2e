"""Sparsity patterns and their masks, on a layer's weight seen as a matrix [outputs, reduction].

The reduction axis is laid out the way sparse kernels read it (layers.py): for a Conv the
columns are (kh, kw, input channel) with the input channel innermost, for MatMul/Gemm the K
axis. So N:M groups are M consecutive input channels (Conv) or M consecutive k (MatMul), as
TensorRT's 2:4 sparse kernels expect; blocks are R outputs by C consecutive columns.

A mask is True where a weight stays. Lower scores go first; ties go in index order.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..core.errors import OptionError


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured", "nm" or "block"
    n: int = 0  # N:M: N of every M stay
    m: int = 0
    rows: int = 1  # block: rows (outputs) x cols (reduction)
    cols: int = 1

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself sets (N:M), else None."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        return "unstructured"

    def fits(self, outputs: int, reduction: int, channels: int) -> str | None:
        """Why a [outputs, reduction] weight (whose innermost run of input channels is
        `channels` long) cannot hold the pattern, or None."""
        if self.kind == "nm" and channels % self.m:
            return f"{channels} input channels are not a multiple of {self.m} ({self})"
        if self.kind == "block" and (outputs % self.rows or reduction % self.cols):
            return f"a {outputs}x{reduction} weight does not divide into {self.rows}x{self.cols} blocks"
        return None


def parse_pattern(name: str, value) -> Pattern:
    """'unstructured', 'N:M' (e.g. 2:4) or 'block:RxC' (e.g. block:4x4, block:1x8)."""
    if isinstance(value, Pattern):
        return value
    text = str(value).strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        n, size = int(m.group(1)), int(m.group(2))
        if not 0 < n < size:
            raise OptionError(name, value, "N:M needs 0 < N < M (2:4 keeps two of every four)")
        return Pattern("nm", n=n, m=size)
    if m := re.fullmatch(r"block:(\d+)x(\d+)", text):
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows < 1 or cols < 1 or rows * cols < 2:
            raise OptionError(name, value, "a block needs at least two weights (block:RxC, R, C >= 1)")
        return Pattern("block", rows=rows, cols=cols)
    raise OptionError(name, value, "choose unstructured, N:M (e.g. 2:4) or block:RxC (e.g. block:4x4)")


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n highest of every m consecutive columns, row by row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[..., : m - n], False, axis=-1)
    return mask.reshape(rows, cols)


def block_scores(scores: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sum of the scores in every rows x cols block: [outputs / rows, reduction / cols]."""
    r, c = scores.shape
    return scores.reshape(r // rows, rows, c // cols, cols).sum(axis=(1, 3))


def expand_blocks(keep: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.repeat(np.repeat(keep, rows, axis=0), cols, axis=1)


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """A mask of the same shape without the `count` lowest scores."""
    mask = np.ones(scores.size, dtype=bool)
    if count > 0:
        mask[np.argsort(scores.reshape(-1), kind="stable")[:count]] = False
    return mask.reshape(scores.shape)


def layer_mask(scores: np.ndarray, pattern: Pattern, sparsity: float, per_row: bool) -> np.ndarray:
    """The mask of one layer at `sparsity` (unstructured and block; N:M sets its own):
    `per_row` takes the same share from every output (Wanda's comparison groups)."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        blocks = block_scores(scores, pattern.rows, pattern.cols)
        return expand_blocks(lowest(blocks, math.floor(sparsity * blocks.size)), pattern.rows, pattern.cols)
    if per_row:
        count = math.floor(sparsity * scores.shape[1])
        order = np.argsort(scores, axis=1, kind="stable")[:, :count]
        mask = np.ones_like(scores, dtype=bool)
        np.put_along_axis(mask, order, False, axis=1)
        return mask
    return lowest(scores, math.floor(sparsity * scores.size))


def complies(weight_matrix: np.ndarray, pattern: Pattern) -> bool:
    """Whether the zeros of a [outputs, reduction] matrix follow the pattern."""
    zero = weight_matrix == 0
    if pattern.kind == "nm":
        rows, cols = zero.shape
        return bool((zero.reshape(rows, cols // pattern.m, pattern.m).sum(-1) >= pattern.m - pattern.n).all())
    return True
