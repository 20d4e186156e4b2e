"""Sensitivity analysis: each group pruned alone, its damage measured, tables and plots, allocation."""
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_model
from ops.test_attention_rules import ATTENTION, WEIGHTS as ATTENTION_WEIGHTS
from planting import plant_dead_channels
from textmodel import text_model

from onnxprune import prune
from onnxprune.cli import main
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.cost import count_macs
from onnxprune.sensitivity import SensitivityResult, Trial, analyze_sensitivity, load_sensitivity
from onnxprune.core.shapes import static_copy

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "tiny_resnet.onnx"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hidden units whose contributions to y are all non-negative (ReLU output times positive W2):
# removing more of them can only move y further, so damage must grow with the ratio.
MLP = """
g (float[N,16] x) => (float[N,8] y) {
  h0 = MatMul(x, W1)
  h1 = Add(h0, B1)
  h = Relu(h1)
  y = MatMul(h, W2)
}"""

# Two branches of equal cost; `quiet` barely reaches the output, so its curve stays flat.
BRANCHES = """
g (float[1,8,8,8] x) => (float[1,8,8,8] y) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, Wa)
  b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, Wb)
  ra = Relu(a)
  rb = Relu(b)
  ya = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (ra, Wya)
  yb = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (rb, Wquiet)
  y = Add(ya, yb)
}"""


def _mlp():
    return text_model(MLP, {"W1": (16, 32), "B1": (32,), "W2": ("positive", (32, 8))})


def _mlp_feeds(batches=4, size=16, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((size, 16)).astype(np.float32)} for _ in range(batches)]


def _branches():
    rng = np.random.default_rng(5)
    weights = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32)
               for name, shape in (("Wa", (16, 8, 3, 3)), ("Wb", (16, 8, 3, 3)), ("Wya", (8, 16, 3, 3)))}
    weights["Wquiet"] = (rng.standard_normal((8, 16, 3, 3)) * 0.003).astype(np.float32)
    return text_model(BRANCHES, weights)


def _by_key(result):
    out = {}
    for row in result.rows:
        out.setdefault(row.key, {})[row.ratio] = row
    return out


# -- measuring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_resnet", "mlp"])
def test_planted_dead_channels_do_no_damage_and_live_ones_do(name):
    model = onnx.load(str(FIXTURE)) if name == "tiny_resnet" else _mlp()
    calibration = None if name == "tiny_resnet" else _mlp_feeds()
    planted, truth = plant_dead_channels(model, 0.5, seed=3)
    result = analyze_sensitivity(planted, calibration, ratios=(0.5, 0.75))
    rows = _by_key(result)
    assert set(truth) <= set(rows) and truth
    for key, dead in truth.items():
        half, most = rows[key][0.5], rows[key][0.75]
        assert half.removed == len(dead) and half.error is None
        assert half.rel_error < 1e-5 and half.cosine_drop < 1e-6, (key, half)
        assert most.rel_error > 1e-3, (key, most)  # past the dead ones, live channels go
        assert half.macs_saved > 0 and most.macs_saved > half.macs_saved
    assert result.curves()[key][0] == (len(dead) / half.channels, pytest.approx(half.rel_error))


def test_damage_grows_with_the_ratio_and_the_data_source_is_stated():
    result = analyze_sensitivity(_mlp(), _mlp_feeds(), ratios=(0.3, 0.5, 0.8))
    (key, curve), = result.curves().items()
    # floor(ratio * 32) channels go; the curve is against the fraction really removed
    assert [r.removed for r in result.rows] == [9, 16, 25] and [f for f, _ in curve] == [9 / 32, 0.5, 25 / 32]
    damages = [d for _, d in curve]
    assert damages == sorted(damages) and damages[0] > 1e-3 and damages[-1] > 2 * damages[0]
    assert result.data == "64 calibration samples from calibration feeds"
    random = analyze_sensitivity(_mlp(), ratios=(0.5,))
    assert "random" in random.data and any("random inputs" in n for n in random.notes)


def test_a_trial_is_the_really_pruned_model():
    """The reported error and MACs are those of prune() removing the same channels."""
    model, feeds = _mlp(), _mlp_feeds(batches=2)
    result = analyze_sensitivity(model, feeds, ratios=(0.5,))
    (trial,) = result.rows
    pruned = prune(model, filters=0.5, latency_runs=0)
    (group,) = pruned.plan.to_json()["groups"]
    assert group["key"] == trial.key and len(group["removed"]) == trial.removed == 16
    errors = []
    for feed in feeds:
        before, after = run_model(model, feed)[0], run_model(pruned.model, feed)[0]
        errors.append(np.linalg.norm(after - before) / np.linalg.norm(before))
    assert trial.rel_error == pytest.approx(float(np.mean(errors)), rel=1e-5)
    shapes = {"x": [1, 16]}  # MACs are counted where the dynamic batch is 1, as prune's report does
    assert result.macs == count_macs(static_copy(model, shapes))
    assert trial.macs_saved == result.macs - count_macs(static_copy(pruned.model, shapes))


def test_trials_with_recovery_are_prune_with_the_same_recovery():
    model, feeds = _mlp(), _mlp_feeds(batches=8)  # 128 rows: a refit of 32 inputs needs 4 per input
    plain = analyze_sensitivity(model, feeds, ratios=(0.5,), calib_limit=128)
    result = analyze_sensitivity(model, feeds, ratios=(0.5,), recover="lsq", calib_limit=128)
    (trial,), (plain_trial,) = result.rows, plain.rows
    assert result.recover == ["lsq"] and "recovery: lsq" in result.to_markdown()
    assert load_sensitivity_json(result).recover == ["lsq"]
    pruned = prune(model, filters=0.5, recover="lsq", calib=feeds, latency_runs=0)
    assert pruned.report["recovery"]["layers_compensated"] == 1 and not pruned.report["recovery"]["notes"]
    errors = []
    for feed in feeds:
        before, after = run_model(model, feed)[0], run_model(pruned.model, feed)[0]
        errors.append(np.linalg.norm(after - before) / np.linalg.norm(before))
    assert trial.rel_error == pytest.approx(float(np.mean(errors)), rel=1e-4)
    assert trial.rel_error < 0.8 * plain_trial.rel_error
    for curves, mismatch in ((plain, True), (result, False)):
        steered = prune(model, target_macs=0.7, sensitivity=curves, recover="lsq", calib=feeds, latency_runs=0)
        assert any("measured with recovery" in n for n in steered.report["notes"]) == mismatch
    with pytest.raises(OnnxPruneError, match="needs calibration data"):
        analyze_sensitivity(model, ratios=(0.5,), recover="bias")
    with pytest.raises(OnnxPruneError, match="applies to channel groups, not to layers"):
        analyze_sensitivity(FIXTURE, feeds, layers=True, recover="bias")


def load_sensitivity_json(result):
    return type(result).from_json(json.loads(json.dumps(result.to_json())))


def test_labels_give_accuracy():
    model, feeds = _mlp(), _mlp_feeds()
    planted, truth = plant_dead_channels(model, 0.5, seed=3)
    truth_labels = np.concatenate([run_model(planted, f)[0].argmax(axis=1) for f in feeds])
    labels = truth_labels.copy()
    labels[::4] = (labels[::4] + 1) % 8  # a quarter wrong: the original scores 75%
    result = analyze_sensitivity(planted, feeds, ratios=(0.5, 0.75), labels=labels)
    assert result.baseline_accuracy == pytest.approx(0.75)
    rows = _by_key(result)[next(iter(truth))]
    assert rows[0.5].accuracy == pytest.approx(0.75)
    assert rows[0.75].accuracy < 0.75
    assert result.damage(rows[0.75], "accuracy_drop") == pytest.approx(0.75 - rows[0.75].accuracy)
    assert "top-1 accuracy of the original: 75.00%" in result.to_markdown()
    with pytest.raises(OnnxPruneError, match="40 labels for 64"):
        analyze_sensitivity(planted, feeds, labels=labels[:40])
    with pytest.raises(OnnxPruneError, match="integer class ids"):
        analyze_sensitivity(planted, feeds, labels=np.full(64, 0.5))


def test_the_input_model_is_left_as_it_was():
    model = _mlp()
    before = model.SerializeToString()
    analyze_sensitivity(model, _mlp_feeds(batches=1), ratios=(0.5,), input_shapes={"x": [16, 16]})
    assert model.SerializeToString() == before


def test_failed_trials_are_reported_ranked_first_and_kept_out_of_curves(monkeypatch):
    import onnxprune.sensitivity.trials as sensitivity

    real = sensitivity._pruned_group
    broken = "/layer2/layer2.1/conv1/Conv:in1@0+0"

    def flaky(shaped, heads, key, removed, interface, *args):
        if key == broken:
            raise RuntimeError("rule exploded")
        return real(shaped, heads, key, removed, interface, *args)

    monkeypatch.setattr(sensitivity, "_pruned_group", flaky)
    result = analyze_sensitivity(FIXTURE, ratios=(0.5,))
    failed = [r for r in result.rows if r.error]
    assert [r.key for r in failed] == [broken] and "rule exploded" in failed[0].error
    assert result.ranking()[0] == broken and broken not in result.curves()
    assert "| failed |" in result.to_markdown()


def test_heads_and_layers():
    heads = analyze_sensitivity(text_model(ATTENTION, ATTENTION_WEIGHTS), heads=True, ratios=(0.5,))
    assert {r.kind for r in heads.rows} >= {"heads"} and heads.heads
    assert all(r.error is None and r.rel_error > 0 for r in heads.rows)
    layers = analyze_sensitivity(FIXTURE, layers=True)
    assert layers.rows and all(r.kind == "layer" and r.channels is None for r in layers.rows)
    assert all(r.error is None and r.rel_error > 0 and r.macs_saved > 0 for r in layers.rows)
    assert layers.curves() == {}  # blocks are not channel groups: nothing to allocate with


@pytest.mark.parametrize("ratios", [(0.0, 0.5), (1.0,), ()])
def test_bad_ratios(ratios):
    with pytest.raises(OnnxPruneError, match="ratios"):
        analyze_sensitivity(FIXTURE, ratios=ratios)


# -- files -------------------------------------------------------------------------------------
def test_json_markdown_csv_and_png(tmp_path):
    result = analyze_sensitivity(_branches(), ratios=(0.25, 0.5, 0.75))
    loud, quiet = result.ranking()
    assert "Wquiet" not in loud and _by_key(result)[loud][0.5].rel_error > 10 * _by_key(result)[quiet][0.5].rel_error
    again = load_sensitivity(result.save_table(tmp_path / "s.json"))
    assert again == result
    text = result.save_table(tmp_path / "s.md").read_text()
    assert text.index(loud) < text.index(quiet) and "| 0.25 | 0.5 | 0.75 |" in text
    rows = list(csv.DictReader(io.StringIO(result.save_table(tmp_path / "s.csv").read_text())))
    assert len(rows) == len(result.rows) and {"key", "ratio", "rel_error", "macs_saved"} <= set(rows[0])
    png = result.plot(tmp_path / "lines.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    with pytest.raises(OnnxPruneError, match=r"\.md, \.markdown, \.csv, \.json"):
        result.save_table(tmp_path / "s.txt")


def test_many_groups_make_a_heatmap_and_blocks_make_bars(tmp_path):
    rows = [Trial(f"group{i}:in1@0+0", "filters", 64, r, int(r * 64), rel_error=i * r / 10, cosine_drop=0.0)
            for i in range(30) for r in (0.25, 0.5, 0.75)]
    rows.append(Trial("broken:in1@0+0", "filters", 64, 0.5, 32, None, None, error="boom"))
    many = SensitivityResult("wide.onnx", "random", "l2", [0.25, 0.5, 0.75], rows, macs=10**9)
    heatmap = many.plot(tmp_path / "heat.png").read_bytes()
    assert heatmap.startswith(PNG_SIGNATURE) and len(heatmap) > 10_000
    blocks = analyze_sensitivity(FIXTURE, layers=True)
    bars = blocks.plot(tmp_path / "bars.png").read_bytes()
    assert bars.startswith(PNG_SIGNATURE) and len(bars) > 10_000


def test_without_matplotlib_the_plot_asks_for_it(tmp_path, monkeypatch):
    result = SensitivityResult("m.onnx", "random", "l2", [0.5], [Trial("k", "filters", 4, 0.5, 2, 0.1, 0.0)])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(OnnxPruneError, match=r"pip install matplotlib"):
        result.plot(tmp_path / "p.png")


# -- allocation --------------------------------------------------------------------------------
def test_sensitivity_steers_a_mac_target_to_flat_groups():
    model = _branches()
    result = analyze_sensitivity(model, ratios=(0.25, 0.5, 0.75))
    loud, quiet = result.ranking()
    pruned = prune(model, target_macs=0.75, sensitivity=result, latency_runs=0)
    removed = {g["key"]: len(g["removed"]) for g in pruned.report["groups"]}
    assert removed[quiet] == 8 and removed[loud] == 0  # a quarter of the MACs, all from the quiet branch
    macs = pruned.report["macs"]
    assert 0.98 * 0.75 <= macs["after"] / macs["before"] <= 0.75
    assert any("sensitivity curves" in n for n in pruned.report["notes"])
    # Swapped curves send the cut to the other branch: the file, not the weights, decides.
    swapped = json.loads(json.dumps(result.to_json()).replace(loud, "@@").replace(quiet, loud).replace("@@", quiet))
    flipped = prune(model, target_macs=0.75, sensitivity=SensitivityResult.from_json(swapped), latency_runs=0)
    assert {g["key"]: len(g["removed"]) for g in flipped.report["groups"]}[loud] == 8


def test_curves_from_another_model_are_refused():
    result = analyze_sensitivity(_branches(), ratios=(0.5,))
    with pytest.raises(OnnxPruneError, match="none of its groups is prunable in this model"):
        prune(FIXTURE, target_macs=0.5, sensitivity=result, latency_runs=0, verify=False)


# -- command line ------------------------------------------------------------------------------
@pytest.fixture
def model(tmp_path):
    path = tmp_path / "tiny.onnx"
    shutil.copy(FIXTURE, path)
    return path


def test_cli_table_plot_and_target(model, tmp_path, capsys):
    table, plot, report = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "r.json"
    assert main(["sensitivity", str(model), "--ratios", "0.25,0.5", "--table", str(table), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "Sensitivity of tiny.onnx" in out and "| 0.25 | 0.5 |" in out and f"wrote {plot}" in out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert main([str(model), "--target-macs", "0.6", "--sensitivity", str(table), "--report", str(report),
                 "--dry-run"]) == 0
    data = json.loads(report.read_text())
    assert 0.98 * 0.6 <= data["macs"]["after"] / data["macs"]["before"] <= 0.6
    assert data["notes"][0].startswith("per-group ratios from sensitivity curves")
    curves = load_sensitivity(table).curves()
    cheapest = min(curves, key=lambda k: curves[k][-1][1])
    dearest = max(curves, key=lambda k: curves[k][-1][1])
    cut = {g["key"]: len(g["removed"]) / g["channels_before"] for g in data["groups"]}
    assert cut[cheapest] > cut[dearest]


def test_cli_labels_from_the_calibration_file(tmp_path, capsys):
    model_path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(model_path))
    x = np.concatenate([f["x"] for f in _mlp_feeds(batches=2)])
    np.savez(tmp_path / "calib.npz", x=x, labels=np.arange(len(x)) % 8)
    assert main(["sensitivity", str(model_path), "--calib", str(tmp_path / "calib.npz"), "--labels", "labels",
                 "--calib-samples", "20"]) == 0
    out = capsys.readouterr().out
    assert "20 calibration samples from" in out and "top-1 accuracy of the original" in out
    assert "used the first 20 of 32 labels" in out


@pytest.mark.parametrize("args,needle", [
    (["sensitivity", "{model}", "--ratios", "0,0.5"], "--ratios"),
    (["sensitivity", "{model}", "--table", "out.txt"], "--table"),
    (["sensitivity", "{model}", "--plot", "out.svg"], "--plot"),
    (["sensitivity", "{model}", "--labels", "labels"], "--labels"),
    (["sensitivity", "{tmp}/missing.onnx"], "no such file"),
    (["sensitivity", "{model}", "--importance", "nope"], "--importance"),
    (["sensitivity", "{model}", "--recover", "lsq"], "--recover lsq: needs calibration data"),
    (["sensitivity", "{model}", "--recover", "magic"], "--recover"),
    (["{model}", "--filters", "0.3", "--sensitivity", "{model}"], "--sensitivity"),
    (["{model}", "--target-macs", "0.5", "--sensitivity", "{model}"], "--sensitivity"),
    (["{model}", "--target-macs", "0.5", "--sensitivity", "{tmp}/plan.json"], "not an onnxprune sensitivity file"),
])
def test_cli_errors_are_one_line(model, tmp_path, capsys, args, needle):
    (tmp_path / "plan.json").write_text(json.dumps({"format": "onnxprune-plan/1", "groups": []}))
    argv = [a.format(model=model, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("onnxprune: error:") and needle in err, err


def test_cli_subcommand_end_to_end_and_main_job_unchanged(model, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    proc = run("sensitivity", model, "--max-groups", "2", "--ratios", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "measured 2 of 10 groups" in proc.stdout
    proc = run(model, "--filters", "0.3", "--dry-run")
    assert proc.returncode == 0 and "dry run: no model written" in proc.stdout, proc.stderr
    proc = run("sensitivity", "--help")
    assert proc.returncode == 0 and "--max-groups" in proc.stdout
