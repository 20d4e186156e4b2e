"""The checks behind the "Reading it" paragraphs of docs/benchmarks.md's Calibration section.

    .venv/bin/python benchmarks/calibration_checks.py [bn-fits] [cls-on-calibration] [minilm-plans] [plan-widths] [few-rows] [refit]

- bn-fits: for the Fashion-MNIST CNN and the PP-OCR classifier pruned uniformly (l2, act; bias,bn),
  the per-channel gain that BatchNorm correction fits and the correlation of each pruned channel
  with the original one, per BatchNorm.
- cls-on-calibration: the classifier's fidelity on its calibration crops (not the evaluation
  ones), with each recovery: does BatchNorm correction help where it was fitted?
- minilm-plans: which groups the MiniLM plans cut, from plain curves and from curves measured
  with bias in every trial.
- plan-widths: the widths the uniform and the sensitivity (plain curves, l2) plans give every
  group of the Fashion-MNIST CNN and the PP-OCR recognizer.
- few-rows: lsq refits below 4 calibration rows per input (ridge 1e-4 to 1 towards the original
  weights) on MiniLM and the classifier, against the default fallback to bias.
- refit: the sequential refit against lsq on all four models (uniform allocation, each
  model's best data criterion of the table), with bn on top where the model has BatchNorms.
Same data and settings as bench_calibration.py; nothing is written.
"""
from __future__ import annotations

import sys

import numpy as np

import bench_calibration as bc
from onnxprune import calibration as cal
from onnxprune import prune
from onnxprune.sensitivity import analyze_sensitivity


def bn_fits() -> None:
    fits = []
    affine = cal.PairedStats.affine

    def recording(self):
        gain, offset = affine(self)
        mean_a, mean_b, aa, bb, ab = self.sums / self.count
        corr = (ab - mean_a * mean_b) / np.sqrt(np.maximum((aa - mean_a ** 2) * (bb - mean_b ** 2), 1e-30))
        fits.append((self.name, gain, corr))
        return gain, offset

    cal.PairedStats.affine = recording
    try:
        for case in (bc.fashion_case(), bc.cls_case()):
            for crit in ("l2", "act"):
                fits.clear()
                prune(bc.as_source(case.model), target_macs=case.target, importance=crit, recover="bias,bn",
                      calib=case.calib, input_shapes=case.input_shapes, latency_runs=0, verify=False)
                gains = np.concatenate([f[1] for f in fits])
                corrs = np.concatenate([f[2] for f in fits])
                print(f"{case.key} {crit}: {len(fits)} BatchNorms; gain median {np.median(gains):.2f} "
                      f"(10-90%: {np.quantile(gains, .1):.2f}-{np.quantile(gains, .9):.2f}); correlation median "
                      f"{np.median(corrs):.2f}, 10% {np.quantile(corrs, .1):.2f}")
                for name, gain, corr in fits:
                    print(f"    {name}: gain {np.median(gain):.2f}, correlation {np.median(corr):.2f} "
                          f"(min {corr.min():.2f})")
    finally:
        cal.PairedStats.affine = affine


def cls_on_calibration() -> None:
    case = bc.cls_case()
    crops = np.concatenate([feed["x"] for feed in case.calib])

    def probs(model):
        run = bc.session(model)
        return np.concatenate([run.run(None, {"x": b})[0] for b in bc.batches(crops, 32)])

    reference = probs(case.model)
    for crit in ("l2", "act"):
        for recover in ("none", "bias", "bn", "bias,bn", "lsq", "lsq,bn"):
            result = prune(bc.as_source(case.model), target_macs=case.target, importance=crit, recover=recover,
                           calib=case.calib, input_shapes=case.input_shapes, latency_runs=0, verify=False)
            out = probs(result.model)
            agree = np.mean(out.argmax(1) == reference.argmax(1))
            print(f"uniform {crit:5s} {recover:8s} on calibration crops: same class {agree:.3f}, "
                  f"mean abs. change of p(180) {np.abs(out[:, 1] - reference[:, 1]).mean():.4f}", flush=True)


def minilm_plans() -> None:
    case = bc.minilm_case()
    for recover in ("none", "bias"):
        curves = analyze_sensitivity(bc.as_source(case.model), calibration=case.calib, ratios=bc.SENSITIVITY_RATIOS,
                                     heads=True, recover=() if recover == "none" else recover)
        for key, points in curves.curves().items():
            print(f"curves measured with {recover}: {key}: " + ", ".join(f"{f:.2f} -> {d:.3f}" for f, d in points))
        result = prune(bc.as_source(case.model), target_macs=case.target, importance="recon", recover="bias",
                       calib=case.calib, sensitivity=curves, heads=0.0, latency_runs=0, verify=False)
        cuts = [(g["key"], len(g["removed"])) for g in result.plan.to_json()["groups"] if len(g["removed"])]
        print(f"plan from {recover} curves (recon, bias): {cuts}; {case.evaluate(result.model)}")


def plan_widths() -> None:
    """Kept/original width of every group cut by the plain-curve sensitivity plans (l2) and by uniform."""
    for case, recover in ((bc.fashion_case(), "none"), (bc.rec_case(), "lsq")):
        curves = analyze_sensitivity(bc.as_source(case.model), calibration=case.calib, ratios=bc.SENSITIVITY_RATIOS,
                                     importance="l2", input_shapes=case.input_shapes or None)
        for allocation, sensitivity in (("uniform", None), ("sensitivity", curves)):
            result = prune(bc.as_source(case.model), target_macs=case.target, importance="l2", recover=recover,
                           calib=case.calib if recover != "none" else None, sensitivity=sensitivity,
                           input_shapes=case.input_shapes, latency_runs=0, verify=False)
            groups = result.plan.to_json()["groups"]
            cut = [f"{g['key'].split(':')[0]} {g['channels'] - len(g['removed'])}/{g['channels']}"
                   for g in groups if len(g["removed"])]
            print(f"{case.key} {allocation} (l2, {recover}): {len(cut)} of {len(groups)} groups cut: {'; '.join(cut)}")
            for note in result.report["notes"]:
                if "lsq" in note:
                    print(f"    note: {note}")


def few_rows() -> None:
    """lsq below 4 calibration rows per input, with a stronger ridge towards the original weights,
    against the default (those layers fall back to bias)."""
    from onnxprune.recovery import compensate as recovery

    default = recovery.LSQ_ROWS_PER_INPUT, recovery.RIDGE
    try:
        for case, crit, recover in ((bc.minilm_case(), "recon", "lsq"), (bc.cls_case(), "act", "lsq,bn")):
            for rows, ridge in ((4, 1e-4), (0, 1e-4), (0, 1e-2), (0, 1e-1), (0, 1.0)):
                recovery.LSQ_ROWS_PER_INPUT, recovery.RIDGE = rows, ridge
                print(f"{case.key}: rows per input >= {rows}, ridge {ridge:g}:", end="", flush=True)
                bc.run_variant(case, "uniform", crit, recover)
    finally:
        recovery.LSQ_ROWS_PER_INPUT, recovery.RIDGE = default


def refit() -> None:
    """Sequential refit (layer after layer, against the original's outputs) next to lsq."""
    for case, crit in ((bc.fashion_case(), "recon"), (bc.cls_case(), "act"), (bc.rec_case(), "recon"),
                       (bc.minilm_case(), "recon")):
        print(f"{case.key}: target MACs {case.target}", flush=True)
        choices = ["lsq", "refit"] + (["lsq,bn", "refit,bn"] if "lsq,bn" in case.recoveries else [])
        for recover in choices:
            bc.run_variant(case, "uniform", crit, recover)


CHECKS = {"bn-fits": bn_fits, "cls-on-calibration": cls_on_calibration, "minilm-plans": minilm_plans,
          "plan-widths": plan_widths, "few-rows": few_rows,
          "refit": refit}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CHECKS):
        if name not in CHECKS:
            sys.exit(f"unknown check {name!r}; choose from {', '.join(CHECKS)}")
        print(f"== {name}", flush=True)
        CHECKS[name]()
