"""Built-in passes of onnxprune: op rules for the dependency analysis and importance criteria.

Installed as `onnxprune.passes`. Importing it registers everything below; adding an op
or a criterion means adding one small module here (and its test).
"""
from . import importance, ops  # noqa: F401
