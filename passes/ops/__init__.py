"""Op rules, one module per op family. See onnxprune.rules for the contract."""
from . import (  # noqa: F401
    binary,
    concat,
    conv,
    expand,
    flatten_reshape,
    gemm_matmul,
    normalization,
    pad,
    pooling,
    quantize,
    reduce,
    resize,
    shape_ops,
    slice_split,
    transpose,
    unary,
)
