"""Coverage over a timm architecture corpus: export, prune, planted checks, for both torch exporters.

For every model of ``CATALOG`` below (81 small variants of as many timm families, random init with a
fixed seed, eval mode, static batch-1 input at a reduced size: 64x64 for most, 56/96/224/240 where the
model needs it) and each exporter

  * ``legacy``: ``torch.onnx.export(..., dynamo=False, opset_version=17, do_constant_folding=True)``;
  * ``dynamo``: ``torch.onnx.export(..., dynamo=True, opset_version=18, external_data=False)``, then
    fixtures/torch_models.py ``_tidy_dynamo_output`` (drops node metadata), as benchmarks/coverage.py's
    corpus does (18 is the dynamo exporter's native opset);

the steps are, each with its exceptions caught and recorded:

  0. export (timed), and onnxruntime's output against torch's (relative difference, a sanity check of
     the exporter, not of onnxprune). When the export fails, the model is built again with
     ``timm.create_model(..., exportable=True)`` (timm's switch for ONNX export: no fused
     scaled_dot_product_attention) and exported again; the row then records both;
  a. ``prune(model, filters=0.3, latency_runs=0)``: valid (result.verification checker and ORT both
     'passed'), params before/after, groups pruned/prunable (+skipped), the skip reasons
     (report['skipped']) and the analysis barriers (report['barriers']);
  b. planted channels, tests/planting.py ``prune_planted(model, 0.3)`` (filters, and neurons, which
     default to filters); for attention models also ``prune_planted(model, 0.25, heads=True)``, again at
     0.5 when 0.25 plants no head (2-3 heads per layer). Statuses: pass; fail (an assertion of
     prune_planted); error (an exception); vacuous (nothing planted: no group / no head group found,
     with the top skip reasons of that run); inexact (the planted zeros made the model NaN, 0/0: a
     limit of the planting helper);
  c. planted blocks: tests/planting.py ``plant_identity_blocks(model, 1)``, then
     ``prune(planted, layers=1, latency_runs=0)``; the removed block must be the planted one and the
     outputs must match the planted model's (relative 1e-5, as tests/test_layers.py); n.a. with fewer
     than two removable blocks; inexact when the right block went but the planted branch was not exactly
     zero (checked on onnxruntime; e.g. GhostNet's Concat-ed ghost modules: a planting-helper limit).

Each (model, exporter) pair runs in a worker subprocess (``--worker``) that imports timm once and takes
pairs one at a time; a pair that runs past ``--timeout`` seconds (default 300) or past ``--max-rss-gb``
(default 6) is killed with the worker, recorded as such with the step it was in, and a fresh worker
takes the next pair. Results: benchmarks/results/coverage_timm.json (raw rows) and the "timm
architectures" section of docs/coverage.md (table, census of skip reasons, barriers and failures);
both are rewritten after every model, so an interrupted run keeps what it did.

    .venv/bin/python benchmarks/coverage_timm.py [--only SUBSTR] [--no-write] [--exporters legacy,dynamo]

timm without torchvision
------------------------
timm is installed with ``pip install --no-deps timm`` (its torchvision requirement would pull the PyPI
CUDA build, which breaks beside the CPU torch). Importing ``timm`` needs torchvision in two places only:

  * ``timm.layers.norm_act``, ``timm.layers.create_norm`` and ``timm.utils.model`` do
    ``from torchvision.ops.misc import FrozenBatchNorm2d`` at import time (used only to freeze
    BatchNorm for fine-tuning, never when building a model);
  * ``timm.models.*`` do ``from timm.data import IMAGENET_DEFAULT_MEAN, ...``, and the package
    ``timm/data/__init__.py`` imports the data pipeline (torchvision.transforms, torchvision.datasets).
    The models only read the normalisation constants of ``timm/data/constants.py``.

``import_timm()`` below therefore, in this process only, (1) puts three empty modules ``torchvision``,
``torchvision.ops``, ``torchvision.ops.misc`` into ``sys.modules``, the last holding a placeholder
``FrozenBatchNorm2d`` class that raises if instantiated; (2) puts ``timm/data/constants.py``, loaded from
its file as the module ``timm.data`` (with ``__path__`` = timm/data, so a lazy ``timm.data.X`` import
still finds the real file), into ``sys.modules``; (3) imports timm; (4) removes the three torchvision
stubs again, so that ``importlib.util.find_spec('torchvision')`` is None afterwards and the torch
exporters see no torchvision (the dynamo exporter asks before registering torchvision ops). timm's
``layers/_fx.py`` tries ``torchvision.models.feature_extraction`` inside try/except ImportError and
gets the ImportError (FX feature extraction off, unused here). Nothing is written to site-packages.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from coverage import (
    cell,
    describe,
    first_line,
    human,
    normalize_reason,
    short,
    versions,
)
from machine_info import machine

RATIO = 0.3
HEADS_RATIO = 0.25
HEADS_RETRY = 0.5  # when 0.25 plants nothing (2-3 heads per layer: floor(0.25 * 3) = 0)
SEED = 0
JSON_OUT = ROOT / "benchmarks" / "results" / "coverage_timm.json"
MD_OUT = ROOT / "docs" / "coverage.md"
MD_TITLE = "## timm architectures"  # the section of MD_OUT this script owns

# --------------------------------------------------------------------------- #
# the corpus: (timm name, family, input side, attention?, create_model kwargs)
# --------------------------------------------------------------------------- #
# Input sides are the smallest the model takes (64 where it runs at 64); models with a fixed token grid
# are built for that size through their img_size argument. A few models are narrowed through their
# own constructor arguments (noted in kwargs) to keep the run inside its time budget: BEiT (the
# registered variants are base-size and larger) is built at embed_dim 192, 3 heads, depth 6; Swin /
# SwinV2-CR at 64x64 need window_size 4. The whole corpus takes ~30 min on 2 shared cores.
CATALOG: list[tuple[str, str, int, bool, dict]] = [
    # transformers
    ("vit_tiny_patch16_224", "ViT", 64, True, {"img_size": 64}),
    ("vit_small_patch16_rope_224", "ViT (RoPE)", 64, True, {"img_size": 64}),
    ("vit_little_patch16_reg4_gap_256", "ViT (registers, GAP)", 64, True, {"img_size": 64}),
    ("deit_tiny_distilled_patch16_224", "DeiT", 64, True, {"img_size": 64}),
    ("beit_base_patch16_224", "BEiT", 64, True, {"img_size": 64, "embed_dim": 192, "num_heads": 3, "depth": 6}),
    ("cait_xxs24_224", "CaiT", 64, True, {"img_size": 64}),
    ("eva02_tiny_patch14_224", "EVA-02", 56, True, {"img_size": 56}),
    ("xcit_nano_12_p16_224", "XCiT", 64, True, {"img_size": 64}),
    ("swin_tiny_patch4_window7_224", "Swin", 64, True, {"img_size": 64, "window_size": 4}),
    ("swinv2_cr_tiny_ns_224", "SwinV2-CR", 64, True, {"img_size": 64, "window_size": 4}),
    ("davit_tiny", "DaViT", 64, True, {}),
    ("hiera_tiny_224", "Hiera", 64, True, {"img_size": 64}),
    ("nest_tiny", "NesT", 64, True, {"img_size": 64}),
    ("convit_tiny", "ConViT (GPSA)", 64, True, {"img_size": 64}),
    ("volo_d1_224", "VOLO (outlooker)", 64, True, {"img_size": 64}),
    ("tiny_vit_5m_224", "TinyViT", 224, True, {}),
    ("pvt_v2_b0", "PVT-v2", 64, True, {}),
    ("twins_svt_small", "Twins", 64, True, {}),
    ("crossvit_tiny_240", "CrossViT", 240, True, {}),
    ("coat_lite_tiny", "CoaT", 64, True, {"img_size": 64}),
    ("levit_128s", "LeViT", 64, True, {"img_size": 64}),
    ("levit_conv_128s", "LeViT (conv)", 64, True, {"img_size": 64}),
    ("efficientformer_l1", "EfficientFormer", 224, True, {}),
    ("efficientformerv2_s0", "EfficientFormerV2", 64, True, {"img_size": 64}),
    ("mobilevit_xxs", "MobileViT", 64, True, {}),
    ("mobilevitv2_050", "MobileViTv2", 64, False, {}),  # separable self-attention: no heads
    ("edgenext_xx_small", "EdgeNeXt", 64, True, {}),
    ("fastvit_t8", "FastViT", 64, False, {}),  # t8: RepMixer token mixers only, no attention
    ("nextvit_small", "NextViT", 64, True, {}),
    ("maxvit_rmlp_pico_rw_256", "MaxViT", 64, True, {"img_size": 64}),
    ("coatnet_pico_rw_224", "CoAtNet", 64, True, {"img_size": 64}),
    ("gcvit_xxtiny", "GCViT", 224, True, {}),
    ("efficientvit_m0", "EfficientViT (MSRA)", 64, True, {"img_size": 64}),
    ("efficientvit_b0", "EfficientViT (MIT)", 64, True, {}),
    ("botnet26t_256", "BoTNet (rel-pos attention)", 64, True, {"img_size": 64}),
    ("lambda_resnet26t", "LambdaNet", 64, True, {"img_size": 64}),
    ("mobilenetv4_hybrid_medium", "MobileNetV4 hybrid (MQA)", 64, True, {}),
    # MLP / metaformer
    ("mixer_s16_224", "MLP-Mixer", 64, False, {"img_size": 64}),
    ("resmlp_12_224", "ResMLP", 64, False, {"img_size": 64}),
    ("gmlp_ti16_224", "gMLP", 64, False, {"img_size": 64}),
    ("poolformer_s12", "PoolFormer", 64, False, {}),
    ("poolformerv2_s12", "PoolFormerV2", 64, False, {}),
    ("focalnet_tiny_srf", "FocalNet", 64, False, {}),
    ("sequencer2d_s", "Sequencer (BiLSTM)", 64, False, {}),
    ("convmixer_768_32", "ConvMixer", 64, False, {}),
    ("mambaout_femto", "MambaOut", 64, False, {}),
    # convnets
    ("resnet18", "ResNet", 64, False, {}),
    ("seresnext26t_32x4d", "SE-ResNeXt", 64, False, {}),
    ("resnetv2_50", "ResNetV2 (pre-act)", 64, False, {}),
    ("resnest14d", "ResNeSt", 64, False, {}),
    ("res2net50_26w_4s", "Res2Net", 64, False, {}),
    ("cspresnet50", "CSPNet", 64, False, {}),
    ("cs3darknet_s", "CSPNet (CS3)", 64, False, {}),
    ("convnext_atto", "ConvNeXt", 64, False, {}),
    ("convnextv2_atto", "ConvNeXt-V2 (GRN)", 64, False, {}),
    ("efficientnet_b0", "EfficientNet", 64, False, {}),
    ("efficientnetv2_rw_t", "EfficientNetV2", 64, False, {}),
    ("mobilenetv3_small_050", "MobileNetV3", 64, False, {}),
    ("mobilenetv4_conv_small", "MobileNetV4", 64, False, {}),
    ("ghostnet_050", "GhostNet", 64, False, {}),
    ("ghostnetv2_100", "GhostNetV2", 64, False, {}),
    ("regnetx_002", "RegNetX", 64, False, {}),
    ("regnety_002", "RegNetY", 64, False, {}),
    ("densenet121", "DenseNet", 64, False, {}),
    ("inception_v3", "Inception", 96, False, {}),
    ("inception_next_atto", "InceptionNeXt", 64, False, {}),
    ("xception41", "Xception", 64, False, {}),
    ("repvgg_a0", "RepVGG", 64, False, {}),
    ("mobileone_s0", "MobileOne", 64, False, {}),
    ("repvit_m0_9", "RepViT", 64, False, {}),
    ("hgnetv2_b0", "HGNetV2", 64, False, {}),
    ("dla34", "DLA", 64, False, {}),
    ("hrnet_w18_small", "HRNet", 64, False, {}),
    ("dpn48b", "DPN", 64, False, {}),
    ("ese_vovnet19b_dw", "VoVNet", 64, False, {}),
    ("rexnet_100", "ReXNet", 64, False, {}),
    ("lcnet_050", "LCNet", 64, False, {}),
    ("skresnet18", "SKNet", 64, False, {}),
    ("nf_regnet_b0", "NF-RegNet (weight std.)", 64, False, {}),
    ("starnet_s050", "StarNet", 64, False, {}),
    ("fasternet_t0", "FasterNet", 64, False, {}),
]


# --------------------------------------------------------------------------- #
# worker side: import timm, build, export, evaluate
# --------------------------------------------------------------------------- #
def import_timm():
    """Import timm without torchvision (see the module docstring); returns the timm module."""
    import importlib.machinery
    import importlib.util
    import types

    import torch

    if "timm" in sys.modules:
        return sys.modules["timm"]
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise ImportError("timm is not installed: .venv/bin/pip install --no-deps timm")
    root = Path(spec.submodule_search_locations[0])
    stubs = {}
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        stubs[name] = module
    stubs["torchvision"].ops = stubs["torchvision.ops"]
    stubs["torchvision.ops"].misc = stubs["torchvision.ops.misc"]

    class FrozenBatchNorm2d(torch.nn.Module):  # placeholder: timm only uses it to freeze BN for training
        def __init__(self, *args, **kwargs):
            raise RuntimeError("FrozenBatchNorm2d needs torchvision, which this script stubs out")

    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    data_spec = importlib.util.spec_from_file_location("timm.data", root / "data" / "constants.py",
                                                       submodule_search_locations=[str(root / "data")])
    data = importlib.util.module_from_spec(data_spec)
    data_spec.loader.exec_module(data)
    if any(name in sys.modules for name in stubs):
        raise RuntimeError("torchvision is already imported; import_timm() would shadow it")
    sys.modules.update(stubs)
    sys.modules["timm.data"] = data
    try:
        import timm
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return timm


def randomize(model, seed: int, side: int) -> None:
    """Every parameter that timm initialises to one constant (norm weights 1, biases/tokens/relative-
    position tables 0, layer scales 1e-5) gets random values, BatchNorm affines too (fixtures' helper),
    so that a channel mixed up anywhere changes the outputs. BatchNorm statistics are then measured on
    random inputs (train-mode forward, cumulative averages) rather than drawn at random: with random
    statistics deep plain stacks (RepVGG, MobileOne, Inception) reach outputs of 1e9-1e14."""
    import torch

    from fixtures.torch_models import _randomize_batchnorm

    _randomize_batchnorm(model)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() < 2 or not p.dtype.is_floating_point:
                continue
            flat = p.detach().reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            if float(flat[0]) == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        saved = [(m, m.momentum) for m in norms]
        try:
            with torch.no_grad():
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average
                model.train()
                for i in range(2):
                    model(torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(seed + 10 + i)))
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            model.eval()


def build(name: str, kwargs: dict, side: int, exportable: bool = False):
    import torch

    timm = import_timm()
    torch.manual_seed(SEED)
    extra = {"exportable": True} if exportable else {}
    model = timm.create_model(name, pretrained=False, **kwargs, **extra)
    randomize(model, SEED, side)
    model.eval()
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(SEED + 1))
    return model, x


def export(model, x, path: Path, exporter: str) -> None:
    import torch

    from fixtures.torch_models import _quiet, _tidy_dynamo_output

    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                              opset_version=18, dynamo=True, external_data=False, verbose=False)
            _tidy_dynamo_output(path, 18)
        else:
            torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                              opset_version=17, dynamo=False, do_constant_folding=True)


def torch_vs_ort(model, x, onnx_model) -> float:
    import numpy as np
    import torch
    from conftest import max_rel_diff, run_model

    with torch.no_grad():
        out = model(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    ref = [o.detach().numpy() for o in outs]
    got = run_model(onnx_model, {onnx_model.graph.input[0].name: x.numpy().astype(np.float32)})
    return max_rel_diff(ref[: len(got)], got[: len(ref)])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOAT = re.compile(r"(?<![\w.])\d+\.\d+(?:e[-+]?\d+)?")


def export_error(exc: BaseException) -> str:
    """The exception's type and its telling line: the dynamo exporter's ConversionError starts with
    boilerplate ('Failed to convert the exported program ...'); the node it failed on comes later."""
    text = _ANSI.sub("", str(exc))
    for line in text.splitlines():
        if "Error when translating node" in line:
            return f"{type(exc).__name__}: {line.strip()}"
    line = next((t.strip() for t in text.splitlines() if t.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _planted(model, ratio: float, heads: bool) -> dict:
    from planting import prune_planted

    out = {"status": None, "text": "", "groups": 0}
    t = time.perf_counter()
    try:
        result = prune_planted(model, ratio, heads=heads)
        out["groups"] = sum(1 for d in result.plan.decisions if len(d.removed))
        out["status"] = "pass" if out["groups"] else "vacuous"
        if not out["groups"]:
            out["text"] = "no head group found to plant" if heads else "no prunable group to plant"
            reasons = Counter(normalize_reason(s.get("reason", "")) for s in result.report.get("skipped", []))
            reasons = [(r, c) for r, c in reasons.most_common() if not r.startswith("graph output")]
            out["skip_reasons"] = [f"{c}× {r}" for r, c in reasons[:3]]
    except AssertionError as exc:
        out["status"], out["text"] = "fail", short(first_line(exc) or "assertion failed", 400)
    except Exception as exc:  # noqa: BLE001
        out["status"], out["text"] = "error", short(describe(exc), 400)
        if "NaN/inf everywhere" in out["text"]:  # the zeros planted made the model itself NaN (0/0)
            out["status"] = "inexact"
            out["text"] = ("planting made the model NaN/inf everywhere (the zeroed constants feed a "
                           "normalisation, 0/0; a tests/planting.py limitation): " + out["text"])
    out["s"] = round(time.perf_counter() - t, 2)
    return out


def _branch_is_zero(planted, key: str) -> bool | None:
    """Whether the planted block's branch output is exactly zero on a random input (diagnostic)."""
    import numpy as np
    import onnx
    from conftest import run_model

    from onnxprune import blocks as blk
    from onnxprune.core.graph import Graph
    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import complete_shapes, concrete_input_shapes

    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(planted)
        found = [b for b in blk.find_blocks(Graph(complete_shapes(copy))) if b.key == key]
        if not found:
            return None
        probe = onnx.ModelProto()
        probe.CopyFrom(planted)
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(found[0].branch.name))
        shapes, _ = concrete_input_shapes(planted)
        out = run_model(probe, random_inputs(planted, shapes, 5))[-1]
        return bool(np.all(np.asarray(out) == 0))
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def _blocks(model) -> dict:
    import onnx
    from conftest import max_rel_diff, run_model
    from planting import plant_identity_blocks

    from onnxprune import blocks as blk
    from onnxprune import prune
    from onnxprune.core.graph import Graph
    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import complete_shapes, concrete_input_shapes

    out = {"status": None, "text": "", "n_blocks": None, "planted": None, "removed": None, "diff": None}
    t = time.perf_counter()
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        out["n_blocks"] = len(blk.find_blocks(Graph(complete_shapes(copy))))
        if out["n_blocks"] < 2:  # plant_identity_blocks plants into blocks[1::2]
            out["status"], out["text"] = "n.a.", f"{out['n_blocks']} removable residual block(s) found"
            return out
        planted, keys = plant_identity_blocks(model, 1)
        out["planted"] = keys
        result = prune(planted, layers=1, latency_runs=0)
        out["removed"] = (result.report.get("layers") or {}).get("removed")
        v = result.verification
        shapes, _ = concrete_input_shapes(planted)
        feeds = random_inputs(planted, shapes, 5)
        out["diff"] = max_rel_diff(run_model(planted, feeds), run_model(result.model, feeds))
        problems = []
        if v.checker != "passed" or v.ort != "passed":
            problems.append(f"checker {v.checker}, ORT {v.ort}")
        if out["removed"] != keys:
            problems.append(f"removed {out['removed']} instead of the planted {keys}")
        if not out["diff"] <= 1e-5:
            problems.append(f"outputs differ from the planted model: rel {out['diff']:.3g}")
        if problems:
            out["branch_zero"] = _branch_is_zero(planted, keys[0])
            if out["branch_zero"] is False:
                problems.append("the planted branch is not exactly zero (a tests/planting.py limitation)")
            # the right block went, but the plant did not make it an identity: not onnxprune's fault
            inexact = out["branch_zero"] is False and out["removed"] == keys and len(problems) == 2
            out["status"], out["text"] = ("inexact" if inexact else "fail"), "; ".join(problems)
        else:
            out["status"] = "pass"
    except AssertionError as exc:
        out["status"], out["text"] = "fail", short(first_line(exc) or "assertion failed", 400)
    except Exception as exc:  # noqa: BLE001
        out["status"], out["text"] = "error", short(describe(exc), 400)
    finally:
        out["s"] = round(time.perf_counter() - t, 2)
    return out


def evaluate(entry: tuple, exporter: str, tmp: Path, emit) -> dict:
    """One (model, exporter) pair; emit(row, step) is called before each step and with the final row."""
    import onnx

    from onnxprune import prune

    name, family, side, attention, kwargs = entry
    row: dict = {"model": name, "family": family, "exporter": exporter, "input": [1, 3, side, side],
                 "kwargs": kwargs, "attention": attention, "torch_params": None, "export": {}, "prune": {},
                 "planted_filters": {"status": "–"}, "planted_heads": {"status": "n.a." if not attention else "–"},
                 "blocks": {"status": "–"}, "timeout": None}
    emit(row, "build")
    try:
        model, x = build(name, kwargs, side)
        row["torch_params"] = sum(p.numel() for p in model.parameters())
    except Exception as exc:  # noqa: BLE001
        row["export"] = {"error": f"build: {describe(exc)}"}
        return row

    emit(row, "export")
    path = tmp / f"{name}_{exporter}.onnx"
    onnx_model = None
    for exportable in (False, True):  # timm's own switch for ONNX export (no fused attention), as a retry
        if exportable:
            try:
                model, x = build(name, kwargs, side, exportable=True)
            except Exception as exc:  # noqa: BLE001
                row["export"]["retry_error"] = f"build: {describe(exc)}"
                break
        t = time.perf_counter()
        try:
            export(model, x, path, exporter)
            row["export"]["s"] = round(time.perf_counter() - t, 2)
            onnx_model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001
            key = "retry_error" if exportable else "error"
            row["export"][key] = f"export: {export_error(exc)}"
            row["export"][key.replace("error", "s")] = round(time.perf_counter() - t, 2)
            row["export"][key.replace("error", "traceback")] = traceback.format_exc(limit=-3)
            continue
        finally:
            path.unlink(missing_ok=True)
        if exportable:  # the default build failed: keep its error as a note, the retry's model as the result
            row["export"]["exportable"] = True
            row["export"]["default_error"] = row["export"].pop("error")
            row["export"].pop("traceback", None)
        break
    if onnx_model is None:
        return row
    row["export"]["opset"] = next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
    row["export"]["nodes"] = len(onnx_model.graph.node)
    row["export"]["ops"] = dict(Counter(n.op_type for n in onnx_model.graph.node).most_common())
    try:
        row["export"]["torch_vs_ort"] = torch_vs_ort(model, x, onnx_model)
    except Exception as exc:  # noqa: BLE001
        row["export"]["torch_vs_ort_error"] = short(describe(exc), 300)
    del model

    emit(row, "prune")
    p: dict = {"error": None}
    t = time.perf_counter()
    try:
        result = prune(onnx_model, filters=RATIO, latency_runs=0)
    except Exception as exc:  # noqa: BLE001
        p["error"] = short(describe(exc), 400)
        p["traceback"] = traceback.format_exc(limit=-4)
    else:
        rep = result.report
        p["checker"], p["ort"] = result.verification.checker, result.verification.ort
        p["valid"] = p["checker"] == "passed" and p["ort"] == "passed"
        for key in ("params", "macs", "summary", "notes"):
            p[key] = rep.get(key)
        p["max_rel_diff"] = (rep.get("verification") or {}).get("max_rel_diff")
        p["skipped"] = [{"reason": s.get("reason", ""), "channels": s.get("channels")}
                        for s in rep.get("skipped", [])]
        p["barriers"] = list(rep.get("barriers") or [])
        pa = rep.get("params") or {}
        p["smaller"] = pa.get("after") is not None and pa.get("before") is not None and pa["after"] < pa["before"]
        del result
    p["s"] = round(time.perf_counter() - t, 2)
    row["prune"] = p

    emit(row, "planted_filters")
    row["planted_filters"] = _planted(onnx_model, RATIO, heads=False)
    if attention:
        emit(row, "planted_heads")
        heads = _planted(onnx_model, HEADS_RATIO, heads=True)
        heads["ratio"] = HEADS_RATIO
        if heads["status"] == "vacuous":  # 0.25 of 2 or 3 heads plants none: try one head of two/three
            retry = _planted(onnx_model, HEADS_RETRY, heads=True)
            retry["ratio"] = HEADS_RETRY
            retry["s"] = round(retry["s"] + heads["s"], 2)
            heads = retry
        row["planted_heads"] = heads
    emit(row, "blocks")
    row["blocks"] = _blocks(onnx_model)
    return row


def worker() -> int:
    """Take one JSON task per stdin line, answer JSON lines on the original stdout; everything else
    (torch/exporter prints) goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(2)
    import_timm()
    proto.write(json.dumps({"event": "ready"}) + "\n")
    by_name = {e[0]: e for e in CATALOG}
    with tempfile.TemporaryDirectory(prefix="onnxprune-timm-") as tmp:
        for line in sys.stdin:
            task = json.loads(line)
            entry = by_name[task["model"]]

            def emit(row, step):
                proto.write(json.dumps({"event": "step", "step": step, "row": row}, default=str) + "\n")

            try:
                row = evaluate(entry, task["exporter"], Path(tmp), emit)
            except BaseException as exc:  # noqa: BLE001 - never lose the pair
                row = {"model": entry[0], "worker_error": describe(exc)}
            proto.write(json.dumps({"event": "done", "row": row}, default=str) + "\n")
    return 0


# --------------------------------------------------------------------------- #
# parent side: run workers with a timeout and a memory cap
# --------------------------------------------------------------------------- #
def rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class Worker:
    def __init__(self, log):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, cwd=ROOT, text=True, bufsize=1,
                                     env={**os.environ, "OMP_NUM_THREADS": "2"})
        self.buf = ""

    def read(self, deadline: float, max_rss: float):
        """The next JSON message, or ('timeout'|'memory'|'died', detail)."""
        fd = self.proc.stdout.fileno()
        while True:
            if "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
            now = time.monotonic()
            if now >= deadline:
                return {"event": "timeout"}
            ready, _, _ = select.select([fd], [], [], min(1.0, deadline - now))
            if ready:
                chunk = os.read(fd, 1 << 20).decode(errors="replace")
                if not chunk:
                    return {"event": "died", "rc": self.proc.wait()}
                self.buf += chunk
            rss = rss_gb(self.proc.pid)
            if rss > max_rss:
                return {"event": "memory", "rss_gb": round(rss, 2)}

    def send(self, task: dict) -> None:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def run_pair(state: dict, entry: tuple, exporter: str, timeout: float, max_rss: float, log) -> dict:
    base = {"model": entry[0], "family": entry[1], "exporter": exporter, "input": [1, 3, entry[2], entry[2]],
            "kwargs": entry[4], "attention": entry[3], "torch_params": None, "export": {}, "prune": {},
            "planted_filters": {"status": "–"}, "planted_heads": {"status": "n.a." if not entry[3] else "–"},
            "blocks": {"status": "–"}, "timeout": None}
    if state.get("worker") is None:
        w = Worker(log)
        msg = w.read(time.monotonic() + 300, max_rss)
        if msg.get("event") != "ready":
            w.kill()
            base["export"] = {"error": f"worker did not start: {msg}"}
            return base
        state["worker"] = w
    w = state["worker"]
    w.send({"model": entry[0], "exporter": exporter})
    deadline = time.monotonic() + timeout
    row, step = base, "start"
    while True:
        msg = w.read(deadline, max_rss)
        event = msg.get("event")
        if event == "step":
            row, step = msg["row"], msg["step"]
        elif event == "done":
            row = msg["row"]
            if "worker_error" in row:
                base["export"] = {"error": f"worker: {row['worker_error']}"}
                row = base
            break
        else:
            what = {"timeout": f"timed out after {timeout:.0f} s",
                    "memory": f"killed at {msg.get('rss_gb')} GB resident (cap {max_rss} GB)",
                    "died": f"worker died (exit code {msg.get('rc')})"}[event]
            row["timeout"] = f"{what} in step '{step}'"
            w.kill()
            state["worker"] = None
            break
    if state.get("worker") is not None and rss_gb(w.proc.pid) > max_rss / 2:  # start the next pair fresh
        w.close()
        state["worker"] = None
    return row


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def ok(row: dict) -> bool:
    p = row.get("prune") or {}
    return bool(p.get("valid") and p.get("smaller"))


def step_failed(row: dict) -> str | None:
    """The first thing that went wrong before prune produced a result, if anything."""
    if row.get("timeout") and not row.get("prune"):
        return row["timeout"]
    e = row.get("export") or {}
    if e.get("error"):
        return e["error"] + (f"; with exportable=True: {e['retry_error']}" if e.get("retry_error") else "")
    p = row.get("prune") or {}
    if p.get("error"):
        return "prune: " + p["error"]
    if row.get("timeout") and "valid" not in p:
        return row["timeout"]
    return None


def valid_text(row: dict) -> str:
    bad = step_failed(row)
    if bad:
        return "no: " + short(bad, 80)
    p = row["prune"]
    if not p.get("valid"):
        parts = [f"{k}: {v}" for k, v in (("checker", p.get("checker")), ("ORT", p.get("ort"))) if v != "passed"]
        return "no: " + short("; ".join(parts), 80)
    if not p.get("smaller"):
        return "valid, not smaller"
    return "yes"


def kept_text(row: dict) -> str:
    pa = (row.get("prune") or {}).get("params") or {}
    if not pa.get("before"):
        return "–"
    return f"{human(pa['after'])}/{human(pa['before'])} ({pa['after'] / pa['before']:.0%})"


def groups_text(row: dict) -> str:
    s = (row.get("prune") or {}).get("summary")
    if not s:
        return "–"
    return f"{s['groups_pruned']}/{s['groups_prunable']} (+{s['groups_skipped']})"


def check_text(d: dict) -> str:
    status = (d or {}).get("status") or "–"
    text = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "vacuous": "vacuous",
            "inexact": "plant inexact"}.get(status, status)
    if d and d.get("ratio") not in (None, HEADS_RATIO) and status in ("pass", "fail", "error"):
        text += f" (at {d['ratio']})"
    return text


def main_reason(row: dict) -> str:
    p = row.get("prune") or {}
    counts = Counter(normalize_reason(s["reason"]) for s in p.get("skipped") or [])
    trivial = [k for k in counts if k.startswith("graph output")]  # the logits: every classifier has it
    if len(counts) > len(trivial):
        for k in trivial:
            del counts[k]
    if counts:
        reason, c = counts.most_common(1)[0]
        more = sum(counts.values()) - c
        return f"{c}× {short(reason, 90)}" + (f" (+{more} other)" if more else "")
    if p.get("barriers"):
        return f"barrier: {short(normalize_reason(p['barriers'][0]), 90)}"
    return "–"


def is_pass(d: dict) -> bool:
    return (d or {}).get("status") == "pass"


def counted(rows: list[dict], key: str) -> tuple[int, int, Counter]:
    """(passes, runs, status counts) over the pairs where the check applies and ran (not n.a., and
    not '–': the pair never got that far, e.g. its export failed)."""
    statuses = Counter((r.get(key) or {}).get("status") or "–" for r in rows)
    applicable = [r for r in rows if (r.get(key) or {}).get("status") not in ("n.a.", "–")]
    return statuses.get("pass", 0), len(applicable), statuses


def summary_lines(rows: list[dict]) -> list[str]:
    n = len(rows)
    exported = [r for r in rows if not (r.get("export") or {}).get("error") and (r.get("export") or {}).get("s")]
    good = sum(ok(r) for r in rows)
    valid = sum(bool((r.get("prune") or {}).get("valid")) for r in rows)
    lines = [f"- **{n} model/exporter pairs** ({len({r['model'] for r in rows})} models); "
             f"{len(exported)} exported; **{good} gave a valid, smaller model** ({good / n:.0%} of all pairs, "
             f"{good / max(len(exported), 1):.0%} of the exported); {valid} valid in all"
             + (f"; {sum(1 for r in exported if r['export'].get('exportable'))} exported only when built with timm's "
                "exportable=True" if any(r["export"].get("exportable") for r in exported) else "") + "."]
    for exporter in ("legacy", "dynamo"):
        sub = [r for r in rows if r["exporter"] == exporter]
        if sub:
            ex = sum(1 for r in sub if not (r.get("export") or {}).get("error"))
            lines.append(f"  - {exporter}: {len(sub)} pairs, {ex} exported, {sum(ok(r) for r in sub)} valid and "
                         "smaller")
    for key, label in (("planted_filters", "planted filters+neurons (0.3)"),
                       ("planted_heads", (f"planted heads ({HEADS_RATIO}, or {HEADS_RETRY} where that plants none; "
                                         "attention models)")),
                       ("blocks", "planted identity block (layers=1)")):
        passes, runs, st = counted(rows, key)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(st.items()) if k != "pass")
        lines.append(f"- **{label}: {passes}/{runs} pass** of the pairs where it ran"
                     + (f" ({detail})" if detail else ""))
    timeouts = [r for r in rows if r.get("timeout")]
    if timeouts:
        lines.append(f"- {len(timeouts)} pair(s) killed: " + ", ".join(
            f"{r['model']} ({r['exporter']}): {r['timeout']}" for r in timeouts))
    return lines


def census(rows: list[dict], items) -> list[tuple[str, int, list[str]]]:
    """items(row) -> iterable of texts; returns (normalized text, count, [pair labels])."""
    counts: Counter = Counter()
    where: dict[str, list[str]] = {}
    for r in rows:
        label = f"{r['model']} ({r['exporter']})"
        for text in items(r):
            key = normalize_reason(_FLOAT.sub("N", text))
            counts[key] += 1
            if label not in where.setdefault(key, []):
                where[key].append(label)
    return [(k, c, where[k]) for k, c in counts.most_common()]


def failures(r: dict):
    bad = step_failed(r)
    if bad:
        yield bad
    p = r.get("prune") or {}
    if "valid" in p and not p["valid"]:
        yield f"prune: invalid result (checker {p.get('checker')}, ORT {p.get('ort')})"
    if p.get("valid") and not p.get("smaller"):
        yield "prune: valid but not smaller" + (f" ({p['summary'].get('nothing_removed')})"
                                                if (p.get("summary") or {}).get("nothing_removed") else "")
    for key, label in (("planted_filters", "planted filters"), ("planted_heads", "planted heads"),
                       ("blocks", "planted block")):
        d = r.get(key) or {}
        if d.get("status") in ("fail", "error", "vacuous", "inexact"):
            why = f" (top skips: {'; '.join(d['skip_reasons'])})" if d.get("skip_reasons") else ""
            yield f"{label} {d['status']}: {d.get('text', '')}{why}"
    if r.get("timeout") and not bad:
        yield r["timeout"]


def census_table(title: str, note: str, data, unit: str) -> list[str]:
    out = ["", f"### {title}", "", note, "", f"| {unit} | pairs | text | where |", "|---:|---:|---|---|"]
    if not data:
        out.append("| – | – | none | – |")
    for text, count, where in data:
        shown = ", ".join(where[:6]) + (f", +{len(where) - 6} more" if len(where) > 6 else "")
        out.append(f"| {count} | {len(where)} | {cell(short(text, 300))} | {cell(shown)} |")
    return out


def render(rows: list[dict], meta: dict) -> str:
    out = [
        MD_TITLE,
        "",
        f"Run {meta['date']} UTC on {meta['machine']}; {meta['versions']}; timm {meta['timm']}.",
        "",
        (f"Command: `{meta['command']}` ({meta['total_s']:.0f} s in all; per-pair timeout {meta['timeout']:.0f} s, "
        f"memory cap {meta['max_rss_gb']} GB)."),
        "",
        *([f"The table merges runs: the base run {meta['base']['date']} UTC (`{meta['base']['command']}`, "
           f"{meta['base']['versions']}), and rows measured again since: "
           + "; ".join(f"{m['date']} UTC ({m['versions']}): {', '.join(m['remeasured'])}" for m in meta["merges"])
           + ".", ""] if meta.get("merges") else []),
        *summary_lines(rows),
        "",
        ("Models: timm `create_model(name, pretrained=False, **kwargs)`, random init (seed 0); every "
        "constant-initialised parameter (norm affines, biases, layer scales, tokens) and every BatchNorm affine "
        "randomised, BatchNorm statistics measured on random inputs; eval mode; static input 1×3×S×S at the smallest size the model takes (kwargs "
        "in benchmarks/results/coverage_timm.json). Exporters: *legacy* = `dynamo=False`, opset 17, "
        "constant folding; *dynamo* = `dynamo=True`, opset 18. timm is imported without torchvision (see "
        "the script's docstring)."),
        "",
        (f"Columns: *export s* = the torch export call; *valid smaller*: `prune(model, filters={RATIO}, "
        "latency_runs=0)` passed the onnx checker and onnxruntime, and has fewer parameters; *params kept*: "
        "after/before; *groups*: pruned/prunable (+skipped); *planted filters*: tests/planting.py "
        f"`prune_planted(model, {RATIO})` (filters and neurons); *planted heads*: `prune_planted(model, "
        f"{HEADS_RATIO}, heads=True)` for attention models, retried at {HEADS_RETRY} when {HEADS_RATIO} plants no "
        "head (2 or 3 heads per layer), shown as *(at 0.5)*; *vacuous*: no head group was found to plant; "
        "*planted block*: `plant_identity_blocks(model, 1)` then `prune(planted, layers=1)` must remove "
        "exactly that block with outputs unchanged (*n.a.*: fewer than two removable residual blocks "
        "found; *plant inexact*: the right block was removed but the planted branch was not exactly zero, so "
        "the outputs moved: a limit of the planting helper, not of onnxprune); *main skip reason*: the "
        "commonest normalised reason among the skipped groups, else the "
        "first analysis barrier; the logits' 'graph output keeps its channels' is shown only when it is the "
        "only reason."),
        "",
        ("| model | family | exporter | input | export s | valid smaller | params kept | groups "
        "| planted filters | planted heads | planted block | main skip reason |"),
        "|---|---|---|---|---:|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r.get("export") or {}
        out.append("| " + " | ".join(cell(str(x)) for x in (
            r["model"], r["family"], r["exporter"], r["input"][-1],
            (f"{e['s']:.1f}" + (" (exportable)" if e.get("exportable") else ""))
            if e.get("s") is not None and not e.get("error") else "–",
            valid_text(r), kept_text(r), groups_text(r), check_text(r.get("planted_filters")),
            check_text(r.get("planted_heads")), check_text(r.get("blocks")), main_reason(r),
        )) + " |")

    out += ["", "### What went wrong, pair by pair", ""]
    any_bad = False
    for r in rows:
        texts = list(failures(r))
        if texts:
            any_bad = True
            out.append(f"- **{r['model']}** ({r['exporter']}): " + "; ".join(cell(short(t, 300)) for t in texts))
    if not any_bad:
        out.append("Nothing.")

    retried = [r for r in rows if (r.get("export") or {}).get("exportable")]
    out += ["", "### Exports that needed timm's exportable=True", "",
            ("The default build failed to export; `timm.create_model(..., exportable=True)` (timm's switch for "
            "ONNX export: no fused scaled_dot_product_attention, static padding) exported, and the row is for "
            "that model. The default build's error:"), ""]
    out += [f"- **{r['model']}** ({r['exporter']}): {cell(short(r['export']['default_error'], 300))}"
            for r in retried] or ["None."]
    out += census_table("Failure census", "Every failed step (export, prune, planted checks, timeouts) "
                        "counted once per pair; names in quotes are replaced by '…' and numbers by N.",
                        census(rows, lambda r: list(failures(r))), "failures")
    out += census_table("Skip reasons across the corpus", "Each skipped channel group of the "
                        f"`filters={RATIO}` run counts once.",
                        census(rows, lambda r: [s["reason"] for s in (r.get("prune") or {}).get("skipped") or []]),
                        "skipped groups")
    out += census_table("Analysis barriers across the corpus", "report['barriers'] of the "
                        f"`filters={RATIO}` run: nodes the dependency analysis could not carry channels through "
                        "(their channels are fixed).",
                        census(rows, lambda r: (r.get("prune") or {}).get("barriers") or []), "barriers")
    out.append("")
    return "\n".join(out)


def timm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm")
    except PackageNotFoundError:
        return "not installed"


def write(rows: list[dict], meta: dict) -> None:
    JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
    MD_OUT.parent.mkdir(parents=True, exist_ok=True)
    JSON_OUT.write_text(json.dumps({**meta, "ratio": RATIO, "heads_ratio": HEADS_RATIO, "rows": rows},
                                   indent=1, default=str) + "\n")
    from machine_info import write_section

    write_section(MD_OUT, MD_TITLE, render(rows, meta))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", metavar="SUBSTR", help="only models whose timm name or family contains this")
    p.add_argument("--no-write", action="store_true", help="print the table; write no files")
    p.add_argument("--exporters", default="legacy,dynamo", help="comma-separated: legacy, dynamo")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model/exporter pair (default 300)")
    p.add_argument("--max-rss-gb", type=float, default=6.0, help="kill a worker above this resident size")
    p.add_argument("--merge", action="store_true", help="keep the other rows of the last run "
                   "(benchmarks/results/coverage_timm.json); the ones measured now replace theirs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker()
    exporters = [e.strip() for e in args.exporters.split(",") if e.strip()]
    if not exporters or any(e not in ("legacy", "dynamo") for e in exporters):
        p.error("--exporters takes legacy and/or dynamo")
    entries = [e for e in CATALOG if not args.only or args.only in e[0] or args.only in e[1]]
    if not entries:
        p.error(f"no model matches {args.only!r}")

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    command = " ".join([".venv/bin/python", "benchmarks/coverage_timm.py",
                        *(argv if argv is not None else sys.argv[1:])])
    meta = {"date": f"{started:%Y-%m-%d %H:%M}", "machine": machine(), "versions": versions(),
            "timm": timm_version(), "command": command, "timeout": args.timeout, "max_rss_gb": args.max_rss_gb}
    rows: list[dict] = []
    kept: list[dict] = []
    if args.merge:  # the last run's rows, in catalogue order, those measured now replaced as they come
        last = json.loads(JSON_OUT.read_text())
        measured = {(e[0], x) for e in entries for x in exporters}
        kept = [r for r in last["rows"] if (r["model"], r["exporter"]) not in measured]
        meta["base"] = last.get("base") or {k: last.get(k) for k in ("date", "command", "total_s", "versions")}
        meta["merges"] = last.get("merges", []) + [{"date": meta["date"], "command": command,
                                                     "versions": meta["versions"],
                                                     "remeasured": sorted(f"{m} ({x})" for m, x in measured)}]
    order = {(e[0], x): i for i, e in enumerate(CATALOG) for x in ("legacy", "dynamo")}

    def all_rows() -> list[dict]:
        return sorted(kept + rows, key=lambda r: order.get((r["model"], r["exporter"]), 1 << 30))

    state: dict = {}
    log_path = Path(tempfile.gettempdir()) / "coverage_timm_worker.log"
    print(f"{len(entries)} models x {exporters}; worker log: {log_path}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        try:
            for i, entry in enumerate(entries, 1):
                for exporter in exporters:
                    t = time.perf_counter()
                    row = run_pair(state, entry, exporter, args.timeout, args.max_rss_gb, log)
                    row["wall_s"] = round(time.perf_counter() - t, 1)
                    rows.append(row)
                    print(f"[{i}/{len(entries)}] {entry[0]:34s} {exporter:6s} {row['wall_s']:6.1f}s "
                          f"valid={short(valid_text(row), 50):50s} groups={groups_text(row):13s} "
                          f"filters={check_text(row.get('planted_filters'))} "
                          f"heads={check_text(row.get('planted_heads'))} "
                          f"block={check_text(row.get('blocks'))}"
                          + (f" [{row['timeout']}]" if row.get("timeout") else ""), file=sys.stderr, flush=True)
                if not args.no_write:
                    write(all_rows(), {**meta, "total_s": round(time.perf_counter() - t0, 1)})
        finally:
            if state.get("worker") is not None:
                state["worker"].close()
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    print("\n".join(summary_lines(all_rows())), file=sys.stderr)
    print(f"total {meta['total_s']:.0f} s", file=sys.stderr)
    if args.no_write:
        print(render(all_rows(), meta))
    else:
        write(all_rows(), meta)
        print(f"wrote {JSON_OUT.relative_to(ROOT)} and {MD_OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
