"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with the Optimal Brain Surgeon update.

For a layer W [outputs, inputs] and the Hessian of its squared output error H = X^T X over its
calibration inputs, columns are visited left to right in blocks. In each block the weights to
drop are chosen by w^2 / [H^-1]_cc^2 (all of the block's weights ranked together for
unstructured sparsity, N of every M columns row by row for N:M), and each dropped weight's
error is spread over the columns still to come through the upper Cholesky factor of H^-1, so
the layer's output on the calibration data moves as little as it can.

Layers are done in waves: a layer's Hessian is measured on the model whose upstream layers are
already sparse, as the paper does block by block.
"""
from __future__ import annotations

import math

import numpy as np

from .patterns import Pattern

BLOCK = 128  # columns per lazy-update block
DAMPING = 0.01  # of the mean diagonal, added to H


def obs_prune(weight: np.ndarray, hessian: np.ndarray, pattern: Pattern, sparsity: float,
              block: int = BLOCK, damping: float = DAMPING) -> np.ndarray:
    """`weight` [outputs, inputs] made sparse in `pattern`, the rest updated; float64."""
    w = np.array(weight, dtype=np.float64, copy=True)
    h = np.array(hessian, dtype=np.float64, copy=True)
    rows, cols = w.shape
    # inputs that were always zero on the calibration data: their weights did nothing there, but
    # may elsewhere, so they are ranked like the others (the paper drops them all, beyond the ratio)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(cols)] += damping * float(np.mean(np.diag(h)))
    upper = _inverse_cholesky_upper(h)
    pruned = np.zeros_like(w, dtype=bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, u1 = w[:, start:end].copy(), upper[start:end, start:end]
        err = np.zeros_like(w1)
        d = np.diag(u1)
        if pattern.kind == "unstructured":
            score = (w1 / d) ** 2
            drop = np.zeros(score.size, dtype=bool)
            drop[np.argsort(score.reshape(-1), kind="stable")[:math.floor(sparsity * score.size)]] = True
            pruned[:, start:end] = drop.reshape(score.shape)
        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = (w1[:, i:i + pattern.m] / d[i:i + pattern.m]) ** 2
                order = np.argsort(group, axis=1, kind="stable")[:, :pattern.m - pattern.n]
                chosen = np.zeros_like(group, dtype=bool)
                np.put_along_axis(chosen, order, True, axis=1)
                pruned[:, start + i:start + i + pattern.m] = chosen
            q = np.where(pruned[:, start + i], 0.0, w1[:, i])
            e = (w1[:, i] - q) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err @ upper[start:end, end:]
    w[pruned] = 0.0
    return w


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), with more damping if H is not
    positive definite in floating point."""
    eye = np.eye(len(h))
    extra = 0.0
    for _ in range(6):
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(h + extra * eye))
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))))
    raise np.linalg.LinAlgError("the layer's input Hessian is not positive definite")
