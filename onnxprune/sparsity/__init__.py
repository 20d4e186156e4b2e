"""Weight sparsity: zeros in the weights of Conv, MatMul and Gemm layers, unstructured, N:M (2:4
for TensorRT's sparse kernels) or in blocks, chosen by magnitude or Wanda. The model keeps its
shapes; the zeros are what sparse kernels and compressed files use."""
from .layers import SparseLayer, sparse_layers
from .patterns import Pattern, parse_pattern
from .sparsify import METHODS, SparsityResult, sparsify

__all__ = ["METHODS", "Pattern", "SparseLayer", "SparsityResult", "parse_pattern", "sparse_layers", "sparsify"]
