"""Plan which channels go: score them with a criterion (on calibration data where it needs
some), then decide how many each group loses: the same ratio everywhere, a global ranking,
a MACs/params target (allocation), measured sensitivity curves, or a plan file as given.
The model is not changed; the plan is left in the context for channel removal."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxprune.allocation.ratio import make_plan
from onnxprune.core.criteria import criteria_names, criterion, prepared_criterion
from onnxprune.core.errors import OptionError
from onnxprune.core.plan import (
    Plan,
    candidate_groups,
    group_key,
    load_plan_file,
    plan_entries,
    plan_from_json,
    plan_from_removed,
)
from onnxprune.core.shapes import static_copy
from onnxprune.pipeline import Context, Pass, PassResult, require
from onnxprune.settings import (
    Flag,
    choice,
    fraction_kept,
    integer,
    min_fraction,
    names,
    optional_ratio,
    ratio,
    setting,
    switch,
)

HIDDEN_LAYERNORM = ("exact", "fused")


def _plan_data(name, value):
    """A plan: the contents of a file written by --plan, or its path."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        value = load_plan_file(value)
    plan_entries(value)  # malformed plans are refused before anything reads them
    return value


def _curves(name, value):
    """Sensitivity curves: a SensitivityResult or the path of the JSON table holding them."""
    if value is None:
        return None
    from onnxprune.sensitivity import SensitivityResult, load_sensitivity

    if isinstance(value, (str, Path)):
        return load_sensitivity(value)
    if not isinstance(value, SensitivityResult):
        raise OptionError(name, value, "expected a SensitivityResult or the path of a sensitivity JSON table")
    return value


@dataclass
class PlanSettings:
    filters: float = setting(0.0, check=ratio, cli=Flag(
        "--filters", "Fraction of channels to remove from each group, in [0, 1).", parse=float))
    neurons: float | None = setting(None, check=optional_ratio, cli=Flag(
        "--neurons", "Fraction of hidden units of MLP blocks (Gemm/MatMul producers) to remove; default: --filters.",
        parse=float))
    heads: float | None = setting(None, check=optional_ratio, cli=Flag(
        "--heads", "Fraction of attention heads to remove (whole heads), in [0, 1).", parse=float))
    head_dim: float | None = setting(None, check=optional_ratio, cli=Flag(
        "--head-dim", "Fraction of the dims inside every attention head (q/k and v/o head_dim) to remove; "
        "untouched by default.", metavar="R", parse=float))
    hidden: float | None = setting(None, check=optional_ratio, cli=Flag(
        "--hidden", "Fraction of the model width (embedding columns and residual channels, through LayerNorm/RMSNorm) "
        "to remove; untouched by default. Each norm keeps the statistics of the original width (exact where the "
        "removed channels are zero); see --hidden-layernorm.",
        metavar="R", parse=float))
    hidden_layernorm: str = setting("exact", check=choice(lambda: HIDDEN_LAYERNORM), cli=Flag(
        "--hidden-layernorm", "With --hidden, what a LayerNorm over the pruned width becomes: exact (written out "
        "as 14 elementwise/reduce ops computing the original statistics; exact where the removed channels are "
        "zero, slower) or fused (kept as one LayerNormalization over the kept channels; approximate).",
        choices=lambda: HIDDEN_LAYERNORM, show_default=True))
    zero_channels: bool = setting(False, check=switch, cli=Flag(
        "--zero-channels", "Remove exactly the channels whose coupled weights, biases and norm parameters are all "
        "zero (after fine-tuning with --regularize group-lasso, say), in every group; exact, no ratio needed.",
        is_flag=True))
    importance: str = setting("l2", check=choice(criteria_names), cli=Flag(
        "--importance", "How channels are scored.", choices=criteria_names, show_default=True))
    round_to: int = setting(1, check=integer(1), cli=Flag(
        "--round-to", "Keep a multiple of N channels in every group (8 suits TensorRT FP16).", parse=int,
        show_default=True))
    global_rank: bool = setting(False, check=switch, cli=Flag(
        "--global", "Rank channels across groups instead of the same ratio per group.", is_flag=True))
    exclude: tuple = setting((), check=names, cli=Flag(
        "--exclude", "Protect groups touching nodes/tensors matching this glob (repeatable).", metavar="PATTERN",
        multiple=True))
    plan: dict | None = setting(None, check=_plan_data, cli=Flag(
        "--apply-plan", "Remove exactly the channels listed in a plan written by --plan.", metavar="FILE",
        parse=Path, reads=True))
    target_macs: float | None = setting(None, check=fraction_kept, cli=Flag(
        "--target-macs", "Keep this fraction of the MACs: one ratio for every group, or per-group with "
        "--global/--sensitivity. --heads/--neurons ratios given with it are cut as given, the other groups "
        "make up the rest.", metavar="R", parse=float))
    target_params: float | None = setting(None, check=fraction_kept, cli=Flag(
        "--target-params", "Keep this fraction of the parameters (as --target-macs).", metavar="R", parse=float))
    min_keep: float = setting(0.25, check=min_fraction, cli=Flag(
        "--min-keep", "With a target: every group keeps at least this fraction of its channels.", metavar="R",
        parse=float, show_default=True))
    # {group key: channels to keep}: set by iterative pruning for each round, not by users
    keep_counts: dict | None = setting(None)
    # how notes name where round_to came from: the flag, or the --target preset that set it
    round_to_source: str = setting("--round-to")
    sensitivity: object = setting(None, check=_curves, cli=Flag(
        "--sensitivity", "With a target: per-group ratios from curves written by `onnxprune sensitivity --table "
        "FILE.json`.", metavar="FILE.json", parse=Path, reads=True))

    def cross_check(self) -> None:
        """Rules between settings, checked with the settings themselves."""
        if self.plan is not None:
            given = [name for name in ("filters", "neurons", "heads", "head_dim", "hidden", "target_macs",
                                       "target_params")
                     if getattr(self, name)]
            if given:
                raise OptionError("plan", None, "the plan says which channels go; drop "
                                  + ", ".join("{" + name + "}" for name in given))
        if self.zero_channels:
            given = [name for name in ("filters", "neurons", "heads", "head_dim", "hidden", "target_macs",
                                       "target_params", "plan") if getattr(self, name)]
            if given:
                raise OptionError("zero_channels", True, "removes the channels that are zero, however many; drop "
                                  + ", ".join("{" + name + "}" for name in given))
        if self.heads is not None and self.head_dim is not None:
            raise OptionError("head_dim", self.head_dim, "give it or {heads}, not both: a head's dims are read as "
                              "channels only when heads are not")
        if self.target_macs is not None and self.target_params is not None:
            raise OptionError("target_macs", self.target_macs, "give it or {target_params}, not both")

    @property
    def heads_mode(self) -> bool:
        """Whether to analyse whole heads: asked for, or how the plan or curves were made."""
        return (self.heads is not None or bool((self.plan or {}).get("heads"))
                or bool(self.sensitivity is not None and self.sensitivity.heads))

    @property
    def hidden_mode(self) -> str | None:
        """How to follow the model width through normalizations (the LayerNorm treatment), when
        asked for or the plan was made so; None when not."""
        return self.hidden_layernorm if self.hidden is not None or (self.plan or {}).get("hidden") else None

    @property
    def channels_requested(self) -> bool:
        return bool(self.filters or self.neurons or self.heads or self.head_dim or self.hidden
                    or self.plan is not None or self.zero_channels
                    or self.target_macs or self.target_params)


class PlanChannels(Pass):
    name = "plan"

    def __init__(self, settings: PlanSettings) -> None:
        self.settings = settings

    def requires(self, model, context: Context) -> None:
        require(context.analysis is not None, self.name, "a dependency analysis")

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        s, analysis = self.settings, context.analysis
        if s.plan is not None:
            context.plan = plan_from_json(analysis, s.plan)
        elif s.zero_channels:
            from onnxprune.training.regularize import zero_channels

            context.plan = plan_from_removed(analysis, zero_channels(analysis, exclude=s.exclude))
            context.plan.criterion = "zero channels"
        else:
            crit, notes = self._criterion(context)
            run = getattr(crit, "run", None)  # a gradient criterion's measurement
            if run is not None:
                context.report["gradients"] = {"criterion": crit.name, "samples": run.samples, "labels": run.labels,
                                               "seconds": run.seconds}
            if (s.target_macs is not None or s.target_params is not None) and s.keep_counts is None:
                context.plan = self._target_plan(context, crit)
            else:
                context.plan = make_plan(analysis, s.filters, crit, round_to=s.round_to, global_rank=s.global_rank,
                                         exclude=s.exclude, heads=s.heads, neurons=s.neurons,
                                         head_dim=s.head_dim, hidden=s.hidden, keep_counts=s.keep_counts,
                                         round_to_source=s.round_to_source)
            context.plan.notes[:0] = notes
        context.plan.notes.extend(_width_notes(context.plan))
        context.notes.extend(context.plan.notes)
        report = {"criterion": context.plan.criterion, "ratio": s.filters, "heads_ratio": s.heads,
                  "neurons_ratio": s.neurons}
        if s.head_dim is not None:
            report["head_dim_ratio"] = s.head_dim
        if s.hidden is not None:
            report["hidden_ratio"] = s.hidden
        if context.plan.rounding is not None:
            report["rounding"] = context.plan.rounding
        return PassResult(model, report, modified=False)

    def _methods(self, context: Context) -> tuple[str, ...]:
        return context.compensation.methods if context.compensation is not None else ()

    def _criterion(self, context: Context):
        """The criterion to score with, prepared on the calibration data when it needs some."""
        s, analysis = self.settings, context.analysis
        plain = criterion(s.importance, context.seed)
        if not plain.needs_data:
            return plain, []
        groups, _ = candidate_groups(analysis, s.exclude)
        crit, notes = prepared_criterion(s.importance, context.seed, analysis, groups, context.calibration,
                                         compensated=bool({"bias", "lsq"} & set(self._methods(context))))
        context.caches.stats.update(crit.stats)  # recovery reuses the activation statistics
        return crit, notes

    def _target_plan(self, context: Context, crit) -> Plan:
        """Per-group ratios chosen to keep the asked fraction of MACs or params (allocation/target.py)."""
        from onnxprune.allocation.target import make_target_plan

        s, analysis = self.settings, context.analysis
        metric, target = ("macs", s.target_macs) if s.target_macs is not None else ("params", s.target_params)
        curves, note = self._sensitivity_curves(analysis, self._methods(context)) \
            if s.sensitivity is not None else (None, None)
        # A heads or neurons ratio given with the target is cut as given; the allocation fills the
        # rest of the target from the other groups (0 leaves that kind to the allocation too).
        fixed = {kind: ratio for kind, ratio in (("heads", s.heads), ("neurons", s.neurons), ("hidden", s.hidden))
                 if ratio}
        plan = make_target_plan(analysis, crit, metric, target, static_copy(analysis.graph.model, context.shapes),
                                round_to=s.round_to, exclude=s.exclude, min_keep=s.min_keep,
                                global_rank=s.global_rank, curves=curves, head_dim=bool(s.head_dim),
                                fixed_ratios=fixed)
        if note:
            plan.notes.insert(0, note)
        if fixed:
            cut = {d.group.kind for d in plan.decisions if len(d.removed)}
            plan.notes.insert(0, "with the target: " + ", ".join(
                f"{kind} cut by {ratio:g} as given" if kind in cut else
                f"{kind} {ratio:g} given, but no {kind} group is prunable here (see skipped)"
                for kind, ratio in fixed.items()) + "; the other groups are allocated to reach it")
        return plan

    def _sensitivity_curves(self, analysis, methods: tuple[str, ...]) -> tuple[dict, str]:
        """Measured damage curves keyed by group id (group keys are stable across analyses), and a note."""
        result = self.settings.sensitivity
        measured = result.curves()
        if not measured:
            raise OptionError("sensitivity", None, "holds no channel-group curves (measured on whole blocks, or "
                              "every trial failed)")
        groups, _ = candidate_groups(analysis)
        ids = {group_key(analysis, g): g.id for g in groups}
        curves = {ids[key]: points for key, points in measured.items() if key in ids}
        if not curves:
            hint = " (it was measured with heads: analyse with heads too, heads=0.0)" \
                if result.heads and not analysis.heads else ""
            raise OptionError("sensitivity", None, f"none of its groups is prunable in this model; measured on "
                              f"another model?{hint}")
        note = (f"per-group ratios from sensitivity curves ({result.data}): {len(curves)} of {len(groups)} groups "
                "measured, the others keep all their channels")
        if tuple(result.recover) != methods:
            measured_with = ",".join(result.recover) or "none"
            note += (f"; the curves were measured with recovery {measured_with}, this run recovers with "
                     f"{','.join(methods) or 'none'}: what a group costs may differ (measure with the same --recover)")
        return curves, note


def _width_notes(plan: Plan) -> list[str]:
    """What pruning the model width does to the normalizations across it: exact or not."""
    costs = [cost for d in plan.decisions if d.group.kind == "hidden" and len(d.removed) for cost in d.group.costs]
    if not costs:
        return []
    approximate = [cost for cost in costs if not cost.exact]
    note = (f"--hidden: {len(costs)} normalization statistic(s) over the pruned width, "
            f"{len(costs) - len(approximate)} exact where the removed channels are zero")
    if approximate:
        note += f", {len(approximate)} approximate (e.g. {approximate[0]})"
    return [note + "; each group's \"costs\" in the report lists them"]
