"""How much each group's pruning costs: trials, their file formats, and plots.

- `trials`: prune each group (or residual block) alone and measure the output change.
- `formats`: `SensitivityResult`, its tables (markdown, CSV, JSON) and the labels files.
- `plot`: the PNG (matplotlib).
"""
from .formats import (
                      DEFAULT_RATIOS,
                      FORMAT,
                      METRICS,
                      TABLE_SUFFIXES,
                      SensitivityResult,
                      Trial,
                      load_labels,
                      load_sensitivity,
)
from .plot import require_matplotlib
from .trials import analyze_sensitivity

__all__ = ["DEFAULT_RATIOS", "FORMAT", "METRICS", "TABLE_SUFFIXES", "SensitivityResult", "Trial", "analyze_sensitivity",
           "load_labels", "load_sensitivity", "require_matplotlib"]
