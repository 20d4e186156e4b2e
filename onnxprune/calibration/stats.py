"""Streaming statistics of activations: per-channel moments, Gram matrices (of channels or
of convolution input patches), and paired statistics of two models (per-channel, and the
moments of a least-squares map from one model's tensor to the other's).

Reductions convert at most ``_MAX_PIECE_ELEMENTS`` values to float64 at once.

`keep` (a boolean [batch, sequence] array, from an attention mask) leaves padding out: where
a tensor's positions start with those two axes, only the rows of real tokens count.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..core.errors import OnnxPruneError

_MAX_PIECE_ELEMENTS = 1 << 24  # float64 working copies stay near 128 MB, whatever the tensor


class Accumulator:
    """Takes one tensor's values batch by batch, as float64 rows of channels."""

    def __init__(self, axis: int, name: str = "tensor") -> None:
        self.axis = axis
        self.name = name
        self.count = 0  # values seen per channel (rows)

    def add(self, values: np.ndarray, keep: np.ndarray | None = None) -> None:
        for rows in _channel_rows(np.asarray(values), self.axis, self.name, keep):
            self._check_channels(rows.shape[1])
            self._add_rows(rows)
            self.count += rows.shape[0]

    def _check_channels(self, channels: int) -> None:
        known = self.channels
        if known is not None and known != channels:
            raise OnnxPruneError(f"tensor {self.name!r}: {channels} channels on axis {self.axis} in one batch, "
                                 f"{known} in an earlier one")

    @property
    def channels(self) -> int | None:
        raise NotImplementedError

    def _add_rows(self, rows: np.ndarray) -> None:
        raise NotImplementedError


def _channel_rows(values: np.ndarray, axis: int, name: str, keep: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """`values` as float64 [positions, channels] pieces of bounded size (channel axis last),
    without the padding rows `keep` marks (see position_mask)."""
    if not -values.ndim <= axis < values.ndim:
        raise OnnxPruneError(f"tensor {name!r}: channel axis {axis} is out of range for its shape "
                             f"{list(values.shape)}")
    axis %= values.ndim
    channels = values.shape[axis]
    rows_kept = position_mask(values.shape, axis, keep)
    if axis == 0 or values.ndim == 1:
        rows = np.moveaxis(values, axis, -1).reshape(-1, channels)
        yield (rows if rows_kept is None else rows[rows_kept.reshape(-1)]).astype(np.float64)
        return
    per_entry = max(1, values[:1].size)
    step = max(1, _MAX_PIECE_ELEMENTS // per_entry)
    for start in range(0, values.shape[0], step):  # slices of axis 0 bound the float64 copies
        rows = np.moveaxis(values[start:start + step], axis, -1).reshape(-1, channels)
        if rows_kept is not None:
            rows = rows[rows_kept[start:start + step].reshape(-1)]
        yield rows.astype(np.float64)


def position_mask(shape: tuple, axis: int, keep: np.ndarray | None) -> np.ndarray | None:
    """Which positions of a tensor (its shape without the channel axis) are real tokens: `keep`
    ([batch, sequence]) broadcast over the other axes, when the positions start with those two
    axes; None (all of them) otherwise."""
    if keep is None or len(shape) < 3:
        return None
    rest = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    if rest[:2] != tuple(keep.shape):
        return None
    return np.broadcast_to(np.asarray(keep, bool).reshape(keep.shape + (1,) * (len(rest) - 2)), rest)


class ChannelStats(Accumulator):
    """Per-channel sums of one tensor over all positions and batches (float64).

    mean_abs and l2_norm serve input-norm / Wanda scores, apoz the average percentage of zeros,
    mean bias compensation.
    """

    def __init__(self, axis: int, name: str = "tensor") -> None:
        super().__init__(axis, name)
        self.sum = self.sum_abs = self.sum_sq = self.zeros = None

    @property
    def channels(self) -> int | None:
        return None if self.sum is None else len(self.sum)

    def _add_rows(self, rows: np.ndarray) -> None:
        if self.sum is None:
            channels = rows.shape[1]
            self.sum, self.sum_abs, self.sum_sq = (np.zeros(channels) for _ in range(3))
            self.zeros = np.zeros(channels, dtype=np.int64)
        self.sum += rows.sum(axis=0)
        self.sum_abs += np.abs(rows).sum(axis=0)
        self.sum_sq += np.einsum("ij,ij->j", rows, rows)
        self.zeros += np.count_nonzero(rows == 0, axis=0)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / self.count

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.sum_sq / self.count)

    @property
    def l2_norm(self) -> np.ndarray:
        """sqrt(sum of x^2) over every position seen: Wanda's ||X_j||_2."""
        return np.sqrt(self.sum_sq)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.sum_sq / self.count - self.mean ** 2, 0.0)

    @property
    def apoz(self) -> np.ndarray:
        """Fraction of values exactly zero."""
        return self.zeros / self.count


class GramStats(Accumulator):
    """X^T X over a tensor's channel axis, rows being every other position (float64)."""

    def __init__(self, axis: int, name: str = "tensor") -> None:
        super().__init__(axis, name)
        self.gram = self.sum = None

    @property
    def channels(self) -> int | None:
        return None if self.sum is None else len(self.sum)

    def _add_rows(self, rows: np.ndarray) -> None:
        if self.gram is None:
            self.gram = np.zeros((rows.shape[1], rows.shape[1]))
            self.sum = np.zeros(rows.shape[1])
        self.gram += rows.T @ rows
        self.sum += rows.sum(axis=0)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        return self.gram / self.count - np.outer(self.mean, self.mean)


class PatchGramStats:
    """X^T X of a convolution's input patches: rows are output positions, columns the
    [channel, kernel tap] entries the kernel reads there (zero padding included).

    At most `positions_per_sample` output positions per sample are taken, at random but
    reproducibly, which bounds both the patch copy and the cost of the Gram (rows x cols^2).
    """

    def __init__(self, kernel, strides=None, pads=None, dilations=None, name: str = "tensor",
                 positions_per_sample: int = 256, seed: int = 0) -> None:
        rank = len(kernel)
        self.kernel = tuple(int(k) for k in kernel)
        self.strides = tuple(int(v) for v in (strides or [1] * rank))
        self.pads = tuple(int(v) for v in (pads or [0] * (2 * rank)))
        self.dilations = tuple(int(v) for v in (dilations or [1] * rank))
        self.name, self.positions_per_sample = name, positions_per_sample
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.gram = self.sum = None

    def add(self, values: np.ndarray, keep: np.ndarray | None = None) -> None:
        """`keep` is not used: convolution patches are not token positions."""
        for rows, _ in _patch_rows(np.asarray(values), self.kernel, self.strides, self.pads, self.dilations,
                                   self.positions_per_sample, self.rng, self.name):
            if self.gram is None:
                self.gram = np.zeros((rows.shape[1], rows.shape[1]))
                self.sum = np.zeros(rows.shape[1])
            elif rows.shape[1] != len(self.sum):
                raise OnnxPruneError(f"tensor {self.name!r}: {rows.shape[1] // math.prod(self.kernel)} channels "
                                     f"in one batch, {len(self.sum) // math.prod(self.kernel)} in an earlier one")
            self.gram += rows.T @ rows
            self.sum += rows.sum(axis=0)
            self.count += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count


def _patch_rows(values: np.ndarray, kernel, strides, pads, dilations, per_sample_limit: int, rng, name: str):
    """Per sample n: (rows, (n, where)), rows being float64 [positions, channels x taps] input
    patches at up to `per_sample_limit` output positions drawn from `rng`, `where` those
    positions (a tuple of index arrays over the output's spatial dims)."""
    rank = len(kernel)
    if values.ndim != rank + 2:
        raise OnnxPruneError(f"tensor {name!r}: shape {list(values.shape)} does not fit a "
                             f"{rank}-d convolution's input")
    padded = np.pad(values, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    out = [(padded.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(rank)]
    if min(out) <= 0:
        return
    per_sample = math.prod(out)
    taken = min(per_sample, per_sample_limit)
    taps = np.unravel_index(np.arange(math.prod(kernel)), kernel)
    for n in range(values.shape[0]):
        flat = rng.choice(per_sample, taken, replace=False) if taken < per_sample else np.arange(per_sample)
        where = np.unravel_index(flat, out)
        index = [where[i][:, None] * strides[i] + taps[i][None, :] * dilations[i] for i in range(rank)]
        patches = padded[n][(slice(None), *index)]  # [channels, rows, taps]
        yield np.moveaxis(patches, 1, 0).reshape(taken, -1).astype(np.float64), (n, where)


class PairedStats:
    """Per-channel sums of one tensor in two models run on the same batches (float64).

    `a` is the reference (original model), `b` the candidate; `positions` picks the reference's
    channels that the candidate kept. Gives the least-squares affine map b -> a per channel.
    """

    def __init__(self, axis: int, name: str = "tensor", positions: np.ndarray | None = None) -> None:
        self.axis, self.name, self.positions = axis, name, positions
        self.count = 0
        self.sums = None  # rows: a, b, a*a, b*b, a*b

    def add(self, a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None) -> None:
        a = np.asarray(a)
        if self.positions is not None:
            a = np.take(a, self.positions, axis=self.axis)
        if a.shape != np.shape(b):
            raise OnnxPruneError(f"tensor {self.name!r}: shape {list(np.shape(b))} in the pruned model, "
                                 f"{list(a.shape)} expected from the original")
        for rows_a, rows_b in zip(_channel_rows(a, self.axis, self.name, keep),
                                  _channel_rows(np.asarray(b), self.axis, self.name, keep)):
            part = np.stack([rows_a.sum(0), rows_b.sum(0), np.einsum("ij,ij->j", rows_a, rows_a),
                             np.einsum("ij,ij->j", rows_b, rows_b), np.einsum("ij,ij->j", rows_a, rows_b)])
            self.sums = part if self.sums is None else self.sums + part
            self.count += rows_a.shape[0]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(gain, offset) minimising E[(gain * b + offset - a)^2] per channel; gain 1 where b is constant."""
        mean_a, mean_b, aa, bb, ab = self.sums / self.count
        var_b = bb - mean_b ** 2
        cov = ab - mean_a * mean_b
        flat = var_b <= 1e-12 * np.maximum(aa, 1e-30)
        gain = np.where(flat, 1.0, cov / np.where(flat, 1.0, var_b))
        return gain, mean_a - gain * mean_b


class RegressionStats:
    """Moments for a least-squares map from one tensor (x, a layer's input in the candidate
    model) to another (y, the layer's output in the reference model), both run on the same
    batches: the count, sum of x, X^T X, X^T Y and sum of y, in float64.

    Rows are positions: every position but the channel axis for a 1x1 layer (`geometry`
    None), or for a kxk convolution (`geometry` = (kernel, strides, pads, dilations)) a sample
    of up to `positions_per_sample` output positions per sample, x being the input patch read
    there and y the output at that position. `y_positions` picks the reference's output
    channels that the candidate kept.
    """

    def __init__(self, x_axis: int, y_axis: int, geometry=None, y_positions: np.ndarray | None = None,
                 name: str = "tensor", positions_per_sample: int = 256, seed: int = 0) -> None:
        self.x_axis, self.y_axis, self.name = x_axis, y_axis, name
        self.geometry, self.y_positions = geometry, y_positions
        self.positions_per_sample = positions_per_sample
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.xx = self.xy = self.x_sum = self.y_sum = None

    def add(self, y: np.ndarray, x: np.ndarray, keep: np.ndarray | None = None) -> None:
        y, x = np.asarray(y), np.asarray(x)
        if self.y_positions is not None:
            y = np.take(y, self.y_positions, axis=self.y_axis)
        if self.geometry is None:
            pieces = self._position_rows(y, x, keep)
        else:
            kernel, strides, pads, dilations = self.geometry
            rank = len(kernel)
            if y.ndim != rank + 2 or y.shape[0] != x.shape[0]:
                raise OnnxPruneError(f"tensor {self.name!r}: output shape {list(y.shape)} does not fit input "
                                     f"shape {list(x.shape)}")
            pieces = ((rows, y[n][(slice(None), *where)].T.astype(np.float64))
                      for rows, (n, where) in _patch_rows(x, kernel, strides, pads, dilations,
                                                          self.positions_per_sample, self.rng, self.name))
        for x_rows, y_rows in pieces:
            if x_rows.shape[0] != y_rows.shape[0]:
                raise OnnxPruneError(f"tensor {self.name!r}: {x_rows.shape[0]} input positions, "
                                     f"{y_rows.shape[0]} output positions")
            if self.xx is None:
                self.xx = np.zeros((x_rows.shape[1], x_rows.shape[1]))
                self.xy = np.zeros((x_rows.shape[1], y_rows.shape[1]))
                self.x_sum, self.y_sum = np.zeros(x_rows.shape[1]), np.zeros(y_rows.shape[1])
            elif self.xy.shape != (x_rows.shape[1], y_rows.shape[1]):
                raise OnnxPruneError(f"tensor {self.name!r}: {x_rows.shape[1]} inputs and {y_rows.shape[1]} "
                                     f"outputs in one batch, {self.xy.shape} in an earlier one")
            self.xx += x_rows.T @ x_rows
            self.xy += x_rows.T @ y_rows
            self.x_sum += x_rows.sum(axis=0)
            self.y_sum += y_rows.sum(axis=0)
            self.count += x_rows.shape[0]

    def _position_rows(self, y: np.ndarray, x: np.ndarray, keep: np.ndarray | None = None):
        """Both tensors as [positions, channels], in pieces cut along axis 0 at the same places
        (padding rows left out, as in _channel_rows)."""
        for axis, v in ((self.x_axis, x), (self.y_axis, y)):
            if not -v.ndim <= axis < v.ndim:
                raise OnnxPruneError(f"tensor {self.name!r}: channel axis {axis} is out of range for shape "
                                     f"{list(v.shape)}")
        x_axis, y_axis = self.x_axis % x.ndim, self.y_axis % y.ndim
        kept = position_mask(x.shape, x_axis, keep)
        if kept is not None and position_mask(y.shape, y_axis, keep) is None:
            kept = None  # input and output positions must be cut alike
        if x_axis == 0 or y_axis == 0:
            a = np.moveaxis(x, x_axis, -1).reshape(-1, x.shape[x_axis])
            b = np.moveaxis(y, y_axis, -1).reshape(-1, y.shape[y_axis])
            if kept is not None:
                a, b = a[kept.reshape(-1)], b[kept.reshape(-1)]
            yield a.astype(np.float64), b.astype(np.float64)
            return
        per_entry = max(1, x[:1].size, y[:1].size)
        step = max(1, _MAX_PIECE_ELEMENTS // per_entry)
        for start in range(0, x.shape[0], step):
            a = np.moveaxis(x[start:start + step], x_axis, -1).reshape(-1, x.shape[x_axis])
            b = np.moveaxis(y[start:start + step], y_axis, -1).reshape(-1, y.shape[y_axis])
            if kept is not None:
                rows = kept[start:start + step].reshape(-1)
                a, b = a[rows], b[rows]
            yield a.astype(np.float64), b.astype(np.float64)
