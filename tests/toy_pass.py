"""A pass written outside onnxprune, as a user would: one small class."""
from __future__ import annotations

import onnx

from onnxprune import Pass, PassResult
from onnxprune.pipeline import require


class TagLargestGroup(Pass):
    """Writes the size of the largest prunable group into the model's metadata (needs a plan)."""

    name = "tag_largest_group"

    def __init__(self, key: str = "largest_group") -> None:
        self.key = key

    def requires(self, model, context):
        require(context.plan is not None, self.name, "a plan")

    def run(self, model: onnx.ModelProto, context) -> PassResult:
        largest = max((d.group.channels for d in context.plan.decisions), default=0)
        entry = model.metadata_props.add()
        entry.key, entry.value = self.key, str(largest)
        return PassResult(model, {"toy": {"largest_group": largest}})
