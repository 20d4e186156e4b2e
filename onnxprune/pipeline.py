"""The main job as a function: analyse, plan, apply, verify, measure."""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from . import metrics, recovery
from .apply import apply_plan
from .dependency import Analysis, analyze
from .errors import OnnxPruneError, first_line
from .graph import Graph
from .importance import criterion, prepared_criterion
from .modelio import ModelFile, load_model
from .plan import Plan, candidate_groups, group_key, make_plan, plan_entries, plan_from_json, plan_from_removed
from .runtime import runtime_description
from .shapes import complete_shapes, concrete_input_shapes, fix_input_shapes, infer_shapes, static_copy
from .validate import input_model
from .verify import Checker, Verification, session
from .explain import nothing_removed_reason


@dataclass
class PruneOptions:
    filters: float = 0.0
    heads: float | None = None  # ratio of attention heads to remove (whole heads)
    neurons: float | None = None  # ratio for Gemm/MatMul hidden units (default: filters)
    layers: float = 0  # residual blocks to remove: a count (>= 1) or a fraction of them (< 1)
    drop_layers: tuple[str, ...] = ()  # residual blocks to remove, by the name of their Add
    layer_importance: str = "magnitude"  # or "influence" (measured with onnxruntime)
    importance: str = "l2"
    round_to: int = 1
    global_rank: bool = False
    exclude: tuple[str, ...] = ()
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    plan: dict | None = None  # a plan file's contents: apply it instead of planning
    seed: int = 0
    verify: bool = True  # run in onnxruntime, compare outputs, time it (the checker always runs)
    latency_runs: int = 20  # 0: do not measure latency
    calib: object = None  # calibration inputs: a path (see calibration.py) or any iterable of feed dicts
    image_spec: str | None = None  # preprocessing when `calib` is a folder of images
    calib_limit: int | None = None  # use at most this many calibration samples
    allow_nonfinite: bool = False  # accept calibration data holding NaN/inf (refused by default)
    recover: str | tuple = "none"  # training-free recovery: "bias", "lsq", "bn", comma-separated
    target_macs: float | None = None  # keep this fraction of the MACs (per-group ratios allocated)
    target_params: float | None = None  # keep this fraction of the parameters
    min_keep: float = 0.25  # with a target: every group keeps at least this fraction of its channels
    target_latency: float | None = None  # keep this fraction of the onnxruntime latency (searched, measured)
    sensitivity: object = None  # with a target: curves from `onnxprune sensitivity` (a JSON path or SensitivityResult)


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    analysis: Analysis
    verification: Verification
    report: dict


def prune(model: onnx.ModelProto | str | Path, options: PruneOptions | None = None, **kwargs) -> PruneResult:
    """Prune `model` (a ModelProto or a path) and return the pruned model with its report.

    Keyword arguments override fields of `options`, e.g. prune("m.onnx", filters=0.3).
    """
    options = dataclasses.replace(options) if options is not None else PruneOptions()
    for key, value in kwargs.items():
        if not hasattr(options, key):
            raise TypeError(f"unknown option {key!r}")
        setattr(options, key, value)
    if options.target_latency is not None:
        return _prune_to_latency(model, options)
    started = time.perf_counter()
    _check_options(options)
    original, owned, input_notes = input_model(model)
    interface = _interface(original)  # before any --input-shape is fixed in place
    calibration = _calibration(options, original)
    recover = _Recover(recovery.parse_methods(options.recover), calibration)
    if recover.methods and calibration is None:
        raise OnnxPruneError(f"--recover {','.join(recover.methods)}: needs calibration data (--calib)")
    before = {"params": metrics.count_params(original), "file_bytes": metrics.model_bytes(original),
              "value_info": len(original.graph.value_info) > 0}
    reference = None  # the model outputs are compared with, when it is not the analysed one
    layer_report = None
    heads_mode = options.heads is not None or bool((options.plan or {}).get("heads"))
    if options.layers or options.drop_layers:
        # The unpruned model stays the reference for verification; copied only when needed.
        reference = _with_input_shapes(original, options.input_shapes, copy=bool(options.input_shapes) or not owned)
        layer_free, layer_report = _remove_layers(reference, options, copy=False, calibration=calibration)
        if _channels_requested(options):
            original = layer_free.to_model()  # channels are planned (and rolled back) on this one
            analysis, plan = _analyze_and_plan(original, options, copy=False, heads=heads_mode, recover=recover)
        else:
            # Whole blocks only: the channel plan would be empty, so the dependency analysis, and
            # the export and re-import of the layer-free model it needs, are skipped; an analysis
            # that was not run (no groups, no barriers) stands for it.
            analysis, plan = Analysis(layer_free), Plan()
    else:
        analysis, plan = _analyze_and_plan(original, options, copy=not owned, heads=heads_mode, recover=recover)
    working = analysis.graph.model
    concrete, guessed = concrete_input_shapes(working, options.input_shapes)
    reference = reference or working
    checker = Checker(reference, concrete, options.seed if options.verify else None, guessed=bool(guessed))
    pruned = _apply(analysis, plan, before["value_info"], recover)
    rolled_back = []
    # Without removed channels there is nothing to roll back, and verification below checks
    # the model anyway: checking it here too would serialise the whole model once more.
    failure = checker.failure(pruned) if plan.removed_by_atom() else None
    if failure:
        analysis, plan, pruned, rolled_back = _roll_back(original, options, plan, checker, before["value_info"],
                                                         failure, heads_mode, recover)
    _restore_interface(pruned, interface, before["value_info"])
    prune_seconds = time.perf_counter() - started

    report = {
        "tool": "onnxprune",
        "runtime": runtime_description(),
        "criterion": plan.criterion,
        "ratio": options.filters,
        "heads_ratio": options.heads,
        "neurons_ratio": options.neurons,
        "calibration": calibration.description if calibration is not None else None,
        "input_shapes": concrete,
        "notes": input_notes + list(plan.notes),
    }
    if guessed:
        report["notes"].append(
            f"dynamic dims {', '.join(guessed)} were set to defaults for measuring; pass --input-shape to choose")
    report["params"] = {"before": before["params"], "after": metrics.count_params(pruned)}
    report["macs"] = {"before": metrics.count_macs(static_copy(reference, concrete)),
                      "after": metrics.count_macs(static_copy(pruned, concrete))}
    report["file_bytes"] = {"before": before["file_bytes"], "after": metrics.model_bytes(pruned)}

    report["notes"].extend(checker.notes)
    verification = checker.verification(pruned)
    if options.latency_runs and verification.ort == "passed":
        report["latency_ms"] = {
            "before": round(metrics.measure_latency(checker.session, checker.feeds, options.latency_runs), 4),
            "after": round(metrics.measure_latency(checker.last_session, checker.feeds, options.latency_runs), 4),
        }
    report["verification"] = verification.to_json()
    report["groups"] = [_group_json(d) for d in plan.decisions]
    report["summary"] = {
        "groups_pruned": sum(1 for d in plan.decisions if len(d.removed)),
        "groups_prunable": len(plan.decisions),
        "groups_skipped": len(plan.skipped),
        "channels_removed": int(sum(len(d.removed) for d in plan.decisions)),
    }
    if not report["summary"]["channels_removed"] and not (layer_report or {}).get("removed"):
        report["summary"]["nothing_removed"] = nothing_removed_reason(options, plan, analysis)
    if layer_report is not None:
        report["layers"] = layer_report
    if recover.result is not None:
        report["recovery"] = recover.result.to_json()
        report["notes"].extend(recover.result.notes)
    report["skipped"] = plan.skipped
    report["rolled_back"] = rolled_back
    report["barriers"] = analysis.barriers
    report["seconds"] = {"prune": round(prune_seconds, 3), "total": round(time.perf_counter() - started, 3)}
    return PruneResult(pruned, plan, analysis, verification, report)


_LATENCY_STEPS = 6  # bisection steps over the MAC budget: each is a full prune plus a timing


def _prune_to_latency(model, options: PruneOptions) -> PruneResult:
    """--target-latency R: the largest MAC budget whose measured latency keeps at most R of the original.

    Latency is not a sum over groups (kernels, memory, threads), so it is measured: a
    bisection over --target-macs, each step a full prune timed in onnxruntime against the
    original on the same inputs. The search starts at R (latency roughly follows MACs).
    """
    target = options.target_latency
    if not 0.0 < target < 1.0:
        raise OnnxPruneError(f"--target-latency {target}: must be in (0, 1)")
    if options.target_macs is not None or options.target_params is not None:
        raise OnnxPruneError("give one of --target-latency, --target-macs, --target-params")
    if isinstance(model, (str, Path)):
        model = load_model(model)
    elif isinstance(model, ModelFile):  # every step prunes a copy of it
        model = model.model
    started = time.perf_counter()
    steps, best = [], None
    low, high, macs = 0.0, 1.0, target
    for _ in range(_LATENCY_STEPS):
        step_options = dataclasses.replace(options, target_latency=None, target_macs=macs, verify=True,
                                           latency_runs=options.latency_runs or 20)
        try:
            result = prune(model, step_options)
        except OnnxPruneError:  # below what --min-keep allows: aim higher
            low = macs
            macs = (low + high) / 2
            continue
        latency = result.report.get("latency_ms")
        if latency is None:
            raise OnnxPruneError(f"--target-latency: the pruned model did not run in onnxruntime "
                                 f"({result.verification.ort})")
        reached = latency["after"] / latency["before"]
        steps.append({"target_macs": round(macs, 4), "latency_ratio": round(reached, 4)})
        if reached <= target:
            if best is None or macs > best[0]:
                best = (macs, result, reached)
            low = macs
        else:
            high = macs
        macs = (low + high) / 2
    if best is None:
        tried = ", ".join(f"{s['target_macs']:.2f} MACs -> {s['latency_ratio']:.2f}" for s in steps) or "nothing ran"
        raise OnnxPruneError(f"--target-latency {target}: not reached ({tried})")
    _, result, reached = best
    result.report["target_latency"] = {"target": target, "reached": round(reached, 4), "steps": steps}
    result.report["notes"].append(f"target latency {target:.2f}: reached {reached:.3f} of the original "
                                  f"(measured; {len(steps)} tries)")
    result.report["seconds"]["total"] = round(time.perf_counter() - started, 3)
    return result


def analyze_model(model: onnx.ModelProto, input_shapes: dict | None = None, copy: bool = True,
                  heads: bool = False) -> Analysis:
    """Dependency analysis of `model` (input dims fixed as given, shapes completed).

    With copy=False the model's value_info and input dims are updated in place; weights
    are never touched either way (edits happen in the graphsurgeon copy).
    """
    working = _with_input_shapes(model, input_shapes, copy)
    return analyze(Graph(complete_shapes(working)), heads=heads)


# Options that steer only the removal of whole blocks, or the run itself, not channel pruning.
_NOT_CHANNEL_OPTIONS = frozenset({"layers", "drop_layers", "layer_importance", "input_shapes", "seed", "verify",
                                  "latency_runs", "calib", "image_spec", "calib_limit", "recover",
                                  "allow_nonfinite"})


def _channels_requested(options: PruneOptions) -> bool:
    """Whether any option about channels (filters, heads, neurons, a plan, ...) differs from its default.

    Judged against the defaults rather than a list of ratios, so that an option added later
    never has its channel pruning skipped.
    """
    defaults = PruneOptions()
    for f in dataclasses.fields(PruneOptions):
        value, default = getattr(options, f.name), getattr(defaults, f.name)
        # `is` first: a value such as an array may not compare with ==
        if f.name not in _NOT_CHANNEL_OPTIONS and value is not default and (default is None or value != default):
            return True
    return False


def _analyze_and_plan(model: onnx.ModelProto, options: PruneOptions, copy: bool, heads: bool,
                      recover: "_Recover") -> tuple[Analysis, Plan]:
    """Dependency analysis of `model`, then the channel plan: the given one or a new one."""
    analysis = analyze_model(model, options.input_shapes, copy=copy, heads=heads)
    if options.plan is not None:
        return analysis, plan_from_json(analysis, options.plan)
    crit, notes = _criterion(analysis, options, recover)
    if options.target_macs is not None or options.target_params is not None:
        plan = _target_plan(analysis, options, crit, recover.methods)
    else:
        plan = make_plan(analysis, options.filters, crit,
                         round_to=options.round_to, global_rank=options.global_rank,
                         exclude=options.exclude, heads=options.heads, neurons=options.neurons)
    plan.notes[:0] = notes
    return analysis, plan


def _target_plan(analysis: Analysis, options: PruneOptions, crit, methods: tuple[str, ...]) -> Plan:
    """Per-group ratios chosen to keep the asked fraction of MACs or params (see allocate.py)."""
    from .allocate import make_target_plan

    if options.target_macs is not None and options.target_params is not None:
        raise OnnxPruneError("give --target-macs or --target-params, not both")
    metric, target = ("macs", options.target_macs) if options.target_macs is not None else \
        ("params", options.target_params)
    concrete, _ = concrete_input_shapes(analysis.graph.model, options.input_shapes)
    curves, note = _sensitivity_curves(analysis, options.sensitivity, methods) \
        if options.sensitivity is not None else (None, None)
    plan = make_target_plan(analysis, crit, metric, target, static_copy(analysis.graph.model, concrete),
                            round_to=options.round_to, exclude=options.exclude, min_keep=options.min_keep,
                            global_rank=options.global_rank, curves=curves)
    if note:
        plan.notes.insert(0, note)
    return plan


def _sensitivity_curves(analysis: Analysis, source, methods: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Measured damage curves keyed by group id (group keys are stable across analyses), and a note."""
    from .sensitivity import SensitivityResult, load_sensitivity

    result = source if isinstance(source, SensitivityResult) else load_sensitivity(source)
    where = f"--sensitivity {source}" if isinstance(source, (str, Path)) else "sensitivity"
    measured = result.curves()
    if not measured:
        raise OnnxPruneError(f"{where}: holds no channel-group curves (measured with --layers, or every trial failed)")
    groups, _ = candidate_groups(analysis)
    ids = {group_key(analysis, g): g.id for g in groups}
    curves = {ids[key]: points for key, points in measured.items() if key in ids}
    if not curves:
        hint = " (it was measured with --heads: analyse with heads too, heads=0.0)" \
            if result.heads and not analysis.heads else ""
        raise OnnxPruneError(f"{where}: none of its groups is prunable in this model; measured on another "
                             f"model?{hint}")
    note = (f"per-group ratios from sensitivity curves ({result.data}): {len(curves)} of {len(groups)} groups "
            "measured, the others keep all their channels")
    if tuple(result.recover) != methods:
        measured_with = ",".join(result.recover) or "none"
        note += (f"; the curves were measured with recovery {measured_with}, this run recovers with "
                 f"{','.join(methods) or 'none'}: what a group costs may differ (measure with the same --recover)")
    return curves, note


def _criterion(analysis: Analysis, options: PruneOptions, recover: "_Recover"):
    """The criterion to score with, prepared on the calibration data when it needs some."""
    plain = criterion(options.importance, options.seed)
    if not plain.needs_data:
        return plain, []  # no need to find the candidate groups
    groups, _ = candidate_groups(analysis, options.exclude)
    crit, notes = prepared_criterion(options.importance, options.seed, analysis, groups, recover.calibration,
                                     compensated=bool({"bias", "lsq"} & set(recover.methods)))
    recover.stats = dict(getattr(crit, "stats", None) or {})  # recovery reuses the activation statistics
    return crit, notes


@dataclass
class _Recover:
    """Training-free recovery settings for one run, and what it did."""

    methods: tuple[str, ...]
    calibration: object = None
    # Caches for every plan tried in this run (roll-back, latency search): activation statistics
    # (a criterion's to start with) and Gram matrices, all measured on the original model.
    stats: dict = field(default_factory=dict)
    grams: dict = field(default_factory=dict)
    result: object = None


def _calibration(options: PruneOptions, model: onnx.ModelProto):
    """The calibration data as a re-iterable CalibrationData, or None without --calib."""
    if options.calib is None:
        return None
    from .calibration import calibration_feeds, load_calibration

    if isinstance(options.calib, (str, Path)):
        return load_calibration(options.calib, model, image_spec=options.image_spec, limit=options.calib_limit,
                                allow_nonfinite=options.allow_nonfinite)
    return calibration_feeds(options.calib, model, limit=options.calib_limit, allow_nonfinite=options.allow_nonfinite)


def _interface(model: onnx.ModelProto) -> dict:
    """The declared types of the graph inputs and outputs, as the user's model has them."""
    copy = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(vi)
        copy[vi.name] = kept
    return copy


def _restore_interface(pruned: onnx.ModelProto, interface: dict, keep_value_info: bool) -> None:
    """Give the pruned model's inputs/outputs back the dims the user's model declared.

    --input-shape fixes dynamic dims for the analysis only: a model that took any batch or
    width still does. Pruning never changes interface dims (graph inputs and outputs keep
    their channels), so the declared types carry over as they are.
    """
    changed = False
    weights = {i.name for i in pruned.graph.initializer}  # IR < 4 lists them as inputs too
    for vi in list(pruned.graph.input) + list(pruned.graph.output):
        declared = None if vi.name in weights else interface.get(vi.name)
        if declared is not None and declared.type != vi.type:
            vi.type.CopyFrom(declared.type)
            changed = True
    if changed and keep_value_info:
        del pruned.graph.value_info[:]
        infer_shapes(pruned)
    elif changed:
        del pruned.graph.value_info[:]


_INFLUENCE_SAMPLES = 16  # calibration samples for block influence: a ranking needs few


def _with_input_shapes(model: onnx.ModelProto, input_shapes: dict | None, copy: bool = True) -> onnx.ModelProto:
    """`model` (or a copy) with the given input dims fixed."""
    if copy:
        model, original = onnx.ModelProto(), model
        model.CopyFrom(original)
    if input_shapes:
        fix_input_shapes(model, input_shapes)
    return model


def _remove_layers(model: onnx.ModelProto, options: PruneOptions, copy: bool = True,
                   calibration=None) -> tuple[Graph, dict]:
    """Remove whole residual blocks (see blocks.py); returns the graph without them and a report.

    With copy=False only `model`'s value_info is filled in (shape inference); its nodes and
    weights are untouched, since the edits happen in the graphsurgeon copy. The returned
    graph's `.model` is still that (unpruned) model: export the graph for the pruned one.
    """
    from . import blocks as blk

    working = _with_input_shapes(model, options.input_shapes, copy)
    graph = Graph(complete_shapes(working))
    candidates = blk.find_blocks(graph)
    layers = options.layers
    if layers < 0 or (layers >= 1 and layers != int(layers)):
        raise OnnxPruneError(f"--layers {layers}: give a count (1, 2, ...) or a fraction in (0, 1)")
    count = int(layers) if layers >= 1 else int(layers * len(candidates))
    if count > len(candidates):
        raise OnnxPruneError(f"--layers {count}: the model has {len(candidates)} removable residual blocks")
    if options.layer_importance == "influence":
        if calibration is not None:
            feeds = list(calibration.limited(_INFLUENCE_SAMPLES))
            where = f"{sum(len(next(iter(f.values()))) for f in feeds)} calibration samples"
        else:
            shapes, _ = concrete_input_shapes(working, options.input_shapes)
            feeds = [metrics.random_inputs(working, shapes, options.seed + i) for i in range(4)]
            where = "4 random inputs (no --calib)"
        scores = blk.influence_scores(working, candidates, feeds, session)
        criterion_name = f"influence (1 - cos(x, block(x)) on {where})"
    elif options.layer_importance == "magnitude":
        scores = blk.magnitude_scores(graph, candidates)
        criterion_name = "magnitude (norm of each branch's last layer)"
    else:
        raise OnnxPruneError(f"--layer-importance {options.layer_importance!r}: choose magnitude or influence")
    chosen = blk.choose(candidates, scores, count, options.drop_layers)
    blk.remove(graph, chosen)
    report = {"candidates": len(candidates), "criterion": "named" if options.drop_layers else criterion_name,
              "removed": [b.key for b in chosen], "scores": {b.key: round(scores[b.key], 6) for b in candidates}}
    return graph, report


def _apply(analysis: Analysis, plan: Plan, keep_value_info: bool, recover: "_Recover | None" = None) -> onnx.ModelProto:
    original = analysis.graph.model
    result = None
    if recover is not None and recover.methods and plan.removed_by_atom():
        result = recovery.prepare(analysis, plan, recover.methods, recover.calibration, recover.stats,
                                  recover.grams)
    apply_plan(analysis, plan)
    if result is not None:
        recovery.finish(analysis, plan, result)
    pruned = analysis.graph.to_model()
    if result is not None and result.bn_nodes:
        try:
            recovery.reestimate_batchnorm(pruned, original, result.bn_nodes, recover.calibration)
        except Exception as exc:  # a model that does not run is the safety net's business
            result.notes.append(f"BatchNorm re-estimation skipped: {first_line(exc)}")
    if recover is not None:
        recover.result = result
    if keep_value_info:  # keep the input's convention: shapes stored or not
        pruned = infer_shapes(pruned)
    return pruned


def _roll_back(original, options, plan: Plan, checker: Checker, keep_value_info: bool, failure: str,
               heads_mode: bool, recover: "_Recover | None" = None):
    """Find the groups whose removal makes the model fail, undo them, keep the others.

    Bisection over the planned groups, each try a fresh analysis of the original with a
    subset of the plan. Returns the final analysis, the reduced plan, its model, and what
    was rolled back.
    """
    removed = {d.key: d.removed for d in plan.decisions if len(d.removed)}
    failures: dict[str, str] = {}

    def attempt(keys):
        analysis = analyze_model(original, options.input_shapes, heads=heads_mode)
        sub = plan_from_removed(analysis, {k: removed[k] for k in keys})
        model = _apply(analysis, sub, keep_value_info, recover)
        return analysis, sub, model, checker.failure(model)

    def search(keys, known_failure=None):
        if not keys:
            return []
        failure = known_failure
        if failure is None:
            failure = attempt(keys)[3]
        if failure is None:
            return list(keys)
        if len(keys) == 1:
            failures[keys[0]] = failure
            return []
        half = len(keys) // 2
        return search(keys[:half]) + search(keys[half:])

    keys = list(removed)
    good = search(keys, known_failure=failure)
    analysis, sub, model, failure = attempt(good)
    if failure is not None:  # groups that only fail together: give up on all of them
        failures.update({k: f"fails together with other groups: {failure}" for k in good})
        analysis, sub, model, failure = attempt([])
    by_key = {d.key: d for d in plan.decisions}
    sub.criterion, sub.notes = plan.criterion, plan.notes
    sub.skipped = plan.skipped + [
        {"key": k, "channels": by_key[k].group.channels, "reason": f"rolled back: {why}",
         "nodes": sorted(by_key[k].group.node_names())} for k, why in failures.items()]
    rolled = [{"key": k, "reason": why} for k, why in failures.items()]
    return analysis, sub, model, rolled


def _group_json(decision) -> dict:
    g = decision.group
    return {
        "key": decision.key,
        "channels_before": g.channels,
        "channels_after": g.channels - len(decision.removed),
        "removed": [int(i) for i in decision.removed],
        "kind": g.kind,
        "members": [m.describe() for m in g.members],
    }


def _check_options(options: PruneOptions) -> None:
    """Values no stage could make sense of, refused before any work."""
    layers = options.layers
    if isinstance(layers, bool) or not isinstance(layers, numbers.Real) or not math.isfinite(layers) or layers < 0 \
            or (layers >= 1 and layers != int(layers)):
        raise OnnxPruneError(f"--layers {layers}: give a count (1, 2, ...) or a fraction in (0, 1)")
    if isinstance(options.seed, bool) or not isinstance(options.seed, numbers.Integral) or not 0 <= options.seed < 2**32:
        raise OnnxPruneError(f"--seed {options.seed}: give an integer in [0, 2^32)")
    if options.plan is not None:
        plan_entries(options.plan)  # a malformed plan is refused before anything reads it
        given = [flag for flag, value in (("--filters", options.filters or None), ("--neurons", options.neurons),
                                          ("--heads", options.heads or None), ("--target-macs", options.target_macs),
                                          ("--target-params", options.target_params),
                                          ("--target-latency", options.target_latency)) if value is not None]
        if given:
            raise OnnxPruneError(f"--apply-plan: the plan says which channels go; drop {', '.join(given)}")
