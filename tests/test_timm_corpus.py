"""A sample of the timm corpus (benchmarks/coverage_timm.py runs all 81 architectures), each
exported by both torch exporters: pruned to a valid smaller model, planted dead filters and
heads removed exactly, a planted identity block removed exactly.

Slow tier. timm is installed without its dependencies (`pip install --no-deps timm`: its
torchvision requirement would pull a CUDA build that breaks beside the CPU torch) and imported
without torchvision (coverage_timm.import_timm); the tier is skipped where timm is missing.
"""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
coverage_timm = pytest.importorskip("coverage_timm")
try:
    coverage_timm.import_timm()
except ImportError as exc:
    pytest.skip(f"timm is not installed ({exc})", allow_module_level=True)

# (timm name, exporters, whether planted heads must be found): a family each, the fast ones of
# coverage_timm's catalogue. mobilenetv4_hybrid_medium (legacy) computes its attention scale from
# the head width at run time (1/sqrt(head_dim) from Shape(q)), which pruning head_dim must not change.
SAMPLE = [
    ("vit_tiny_patch16_224", ("legacy", "dynamo"), True),
    ("deit_tiny_distilled_patch16_224", ("legacy",), True),
    ("pvt_v2_b0", ("legacy", "dynamo"), True),
    ("efficientformerv2_s0", ("dynamo",), True),
    ("edgenext_xx_small", ("legacy",), True),
    ("levit_128s", ("dynamo",), True),
    ("mobilevit_xxs", ("legacy",), True),
    ("mobilenetv4_hybrid_medium", ("legacy",), False),
    ("resnet18", ("dynamo",), False),
    ("convnext_atto", ("legacy", "dynamo"), False),
    ("efficientnet_b0", ("legacy",), False),
    ("regnetx_002", ("dynamo",), False),
    ("resnest14d", ("legacy",), False),
    ("cspresnet50", ("legacy",), False),
    ("poolformer_s12", ("dynamo",), False),
]
CASES = [(name, exporter, heads) for name, exporters, heads in SAMPLE for exporter in exporters]
CATALOG = {entry[0]: entry for entry in coverage_timm.CATALOG}


@pytest.mark.parametrize("name,exporter,heads", CASES, ids=[f"{n}-{e}" for n, e, _ in CASES])
def test_timm_architecture(name, exporter, heads, tmp_path):
    row = coverage_timm.evaluate(CATALOG[name], exporter, tmp_path, lambda *args: None)
    assert not row["export"].get("error") or row["export"].get("exportable"), row["export"]
    pruned = row["prune"]
    assert pruned.get("valid") and pruned.get("smaller"), pruned.get("error") or pruned
    assert row["planted_filters"]["status"] == "pass", row["planted_filters"]
    if heads:
        assert row["planted_heads"]["status"] == "pass", row["planted_heads"]
    assert row["blocks"]["status"] in ("pass", "n.a."), row["blocks"]


# Families whose width runs through LayerNorm (ViT, DeiT, PVT, EdgeNeXt, MobileViT, ConvNeXt):
# dead channels of the width (--hidden) go exactly, LayerNorms written out with the original
# statistics. BatchNorm families have no width group of their own (their widths are filters).
WIDTH_SAMPLE = [("vit_tiny_patch16_224", "legacy"), ("deit_tiny_distilled_patch16_224", "legacy"),
                ("pvt_v2_b0", "dynamo"), ("edgenext_xx_small", "legacy"), ("mobilevit_xxs", "legacy"),
                ("convnext_atto", "dynamo")]


@pytest.mark.parametrize("name,exporter", WIDTH_SAMPLE, ids=[f"{n}-{e}" for n, e in WIDTH_SAMPLE])
def test_timm_hidden_width(name, exporter, tmp_path):
    import onnx
    from planting import prune_planted

    _, _, side, _, kwargs = CATALOG[name]
    model, x = coverage_timm.build(name, kwargs, side)
    path = tmp_path / f"{name}.onnx"
    coverage_timm.export(model, x, path, exporter)
    result = prune_planted(onnx.load(str(path)), 0.25, hidden=True)
    widths = [d for d in result.plan.decisions if d.group.kind == "hidden" and len(d.removed)]
    assert widths and all(len(d.removed) == d.group.channels // 4 for d in widths)
