"""When applying some groups yields a model onnxruntime refuses, those groups are undone."""
import pytest

from onnxprune import prune
from onnxprune.core.apply import Applier
from onnxprune.core.dependency import analyze_model
from onnxprune.core.plan import candidate_groups, group_key


@pytest.fixture
def broken_group_rewrite(monkeypatch):
    """Simulate a rule bug: Conv `group` attributes are never rewritten (depthwise convs break)."""
    original = Applier.set_attr

    def set_attr(self, node, name, value):
        if name != "group":
            original(self, node, name, value)

    monkeypatch.setattr(Applier, "set_attr", set_attr)


def test_failing_groups_are_rolled_back_and_the_rest_kept(export_fixture, broken_group_rewrite):
    model = export_fixture("mobilenetv3")
    result = prune(model, filters=0.3, latency_runs=0)
    assert result.verification.checker == "passed" and result.verification.ort == "passed"
    rolled = result.report["rolled_back"]
    assert rolled and all("onnxruntime" in r["reason"] for r in rolled)
    pruned_keys = {d.key for d in result.plan.decisions if len(d.removed)}
    assert pruned_keys and not pruned_keys & {r["key"] for r in rolled}
    assert any(s["reason"].startswith("rolled back") for s in result.report["skipped"])
    # Every rolled-back group runs through a depthwise conv; nothing else was lost.
    analysis = analyze_model(model)
    by_key = {group_key(analysis, g): g for g in candidate_groups(analysis)[0]}
    for r in rolled:
        assert any(m.node.op == "Conv" and m.node.attrs.get("group", 1) > 1 for m in by_key[r["key"]].members)


def test_healthy_models_roll_nothing_back(export_fixture):
    result = prune(export_fixture("resnet"), filters=0.3, latency_runs=0)
    assert result.report["rolled_back"] == []
