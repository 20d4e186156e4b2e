"""The op-rule registry.

An op rule tells the dependency analysis how channels flow through one family of
ops: which output axes carry which input channels (`ctx.set_layout`), which new
channels an op creates (`ctx.new_channels`), which axes must shrink together
(`ctx.unify`), which constant inputs get sliced (`ctx.attach`) and which shape
constants or attributes must be rewritten once the plan is known (`ctx.on_apply`).

A rule may also offer `output_shape(node, graph)` for outputs onnx's shape inference
leaves unknown (run-time Reshape targets, contrib ops); see shapes.complete_shapes.

A rule that cannot handle a particular node raises `Refuse(reason)`: the node then
becomes a barrier and the reason goes into the report. An op with no rule at all is
a barrier too: nothing is ever assumed to be elementwise.

The built-in rules live in `onnxprune.oprules`, one module per op family; importing the
`onnxprune` package registers them.
"""
from __future__ import annotations

_RULES: dict[tuple[str, str], "OpRule"] = {}


class Refuse(Exception):
    """A rule declines a node; the node becomes a barrier for the reason given."""


class OpRule:
    """Base class: subclasses set `ops` (and `domain`) and implement `propagate`."""

    ops: tuple[str, ...] = ()
    domain: str = ""

    def propagate(self, node, ctx) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def register(rule_cls: type[OpRule]) -> type[OpRule]:
    """Class decorator adding a rule for each op name it lists."""
    rule = rule_cls()
    for op in rule_cls.ops:
        key = (rule_cls.domain, op)
        if key in _RULES:
            raise ValueError(f"two op rules for {op!r}: {type(_RULES[key]).__name__} and {rule_cls.__name__}")
        _RULES[key] = rule
    return rule_cls


def rule_for(op: str, domain: str = "") -> OpRule | None:
    if domain == "ai.onnx":
        domain = ""
    return _RULES.get((domain, op))
