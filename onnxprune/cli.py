"""Command line: `onnxprune INPUT --filters R [...]` and `onnxprune sensitivity MODEL [...]`."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import click

from .errors import OnnxPruneError, first_line
from .files import STDOUT, write_text
from .importance import criteria_names


def _layers(ctx, param, value):
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a number", ctx, param) from None
    if not math.isfinite(n) or n < 0 or (n >= 1 and n != int(n)):
        raise click.BadParameter(f"{value}: give a count (1, 2, ...) or a fraction in (0, 1)", ctx, param)
    return n


_SEED = click.IntRange(0, 2**32 - 1)


def _ratio(ctx, param, value):
    if value is None:
        return None
    try:
        r = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number", ctx, param) from None
    if not 0.0 <= r < 1.0:  # NaN fails this too
        raise click.BadParameter(f"{value} is outside [0, 1)", ctx, param)
    return r


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--filters", "filters", default=None, callback=_ratio, help="Fraction of channels to remove from each group, in [0, 1).")
@click.option("--neurons", "neurons", default=None, callback=_ratio,
              help="Fraction of hidden units of MLP blocks (Gemm/MatMul producers) to remove; default: --filters.")
@click.option("--heads", "heads", default=None, callback=_ratio,
              help="Fraction of attention heads to remove (whole heads), in [0, 1).")
@click.option("--layers", "layers", default=0.0, callback=_layers,
              help="Residual blocks (transformer layers, ResNet blocks) to remove: a count, or a fraction < 1.")
@click.option("--drop-layer", "drop_layers", multiple=True, metavar="NAME",
              help="Remove this residual block, named by its Add node (repeatable).")
@click.option("--layer-importance", default="magnitude", show_default=True,
              type=click.Choice(["magnitude", "influence"]), help="How blocks are scored for --layers.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the pruned model (default: INPUT.pruned.onnx next to the input).")
@click.option("--importance", default="l2", show_default=True,
              type=click.Choice(criteria_names(), case_sensitive=False), help="How channels are scored.")
@click.option("--round-to", default=1, show_default=True, type=click.IntRange(min=1),
              help="Keep a multiple of N channels in every group (8 suits TensorRT FP16).")
@click.option("--global", "global_rank", is_flag=True, help="Rank channels across groups instead of the same ratio per group.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Protect groups touching nodes/tensors matching this glob (repeatable).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...", help="Fix an input's dims (repeatable).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here ('-': standard output, the table then goes to standard error).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the removed channel indices here.")
@click.option("--apply-plan", "apply_plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Remove exactly the channels listed in a plan written by --plan.")
@click.option("--calib", "calib", type=click.Path(exists=True, path_type=Path), metavar="PATH",
              help="Calibration inputs: .npz/.npy keyed by input name, or a folder of them or of images.")
@click.option("--calib-images", "image_spec", metavar="SPEC",
              help="Preprocessing for an image folder, e.g. size=224x224,mean=.485/.456/.406,std=.229/.224/.225,layout=NCHW.")
@click.option("--calib-samples", "calib_limit", type=click.IntRange(min=1), metavar="N",
              help="Use at most N calibration samples.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept calibration data holding NaN/inf (refused by default).")
@click.option("--recover", "recover", default="none", show_default=True, metavar="METHODS",
              help="Training-free recovery with --calib: bias, lsq and/or bn (comma-separated), or none.")
@click.option("--target-macs", "target_macs", default=None, type=float, metavar="R",
              help="Keep this fraction of the MACs: one ratio for every group, or per-group with --global/--sensitivity.")
@click.option("--target-params", "target_params", default=None, type=float, metavar="R",
              help="Keep this fraction of the parameters (as --target-macs).")
@click.option("--target-latency", "target_latency", default=None, type=float, metavar="R",
              help="Keep this fraction of the onnxruntime latency (searched over --target-macs, each step measured).")
@click.option("--min-keep", "min_keep", default=0.25, show_default=True, type=float, metavar="R",
              help="With a target: every group keeps at least this fraction of its channels.")
@click.option("--sensitivity", "sensitivity_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json",
              help="With a target: per-group ratios from curves written by `onnxprune sensitivity --table FILE.json`.")
@click.option("--dry-run", is_flag=True, help="Plan and report, but write no model.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime run, comparison and latency measurement.")
@click.option("--seed", default=0, show_default=True, type=_SEED, help="Seed for random inputs and the random criterion.")
def prune_command(input_path, filters, neurons, heads, layers, drop_layers, layer_importance, output, importance, round_to, global_rank, exclude, input_shapes,
                  report_path, plan_path, apply_plan_path, calib, image_spec, calib_limit, allow_nonfinite, recover,
                  target_macs, target_params, target_latency, min_keep, sensitivity_path, dry_run, no_verify, seed):
    """Prune INPUT (an .onnx model) into a smaller model that computes the same minus the removed channels.

    See also `onnxprune sensitivity MODEL --help`: how much each group's pruning costs.
    """
    from .files import RunFiles
    from .modelio import default_output_path, output_files, read_model, save_model
    from .pipeline import PruneOptions, prune
    from .plan import load_plan_file
    from .report import summary_table
    from .shapes import parse_input_shapes

    if filters is None and neurons is None and heads is None and not layers and not drop_layers \
            and apply_plan_path is None and target_macs is None and target_params is None and target_latency is None:
        raise click.UsageError("give --filters R, --neurons R, --heads R, --target-macs R and/or --layers N "
                               "(or --apply-plan FILE)")
    sensitivity = None
    if sensitivity_path is not None:
        from .sensitivity import load_sensitivity

        if target_macs is None and target_params is None and target_latency is None:
            raise click.UsageError("--sensitivity: give --target-macs, --target-params or --target-latency to "
                                   "allocate with it")
        sensitivity = load_sensitivity(sensitivity_path)
        if sensitivity.heads and heads is None:
            heads = 0.0  # the curves name whole-head groups: analyse the model the same way
    ratio = filters if filters is not None else 0.0
    out_path = output or default_output_path(input_path)
    for flag, path in (("-o", output), ("--plan", plan_path)):
        if path is not None and str(path) == STDOUT:
            raise click.BadParameter("give a file path ('-' is for --report only)", param_hint=flag)
    # Every path is checked against every other before the work starts: nothing the run
    # reads is written over, and no two outputs share a file.
    files = RunFiles()
    files.read("input model", input_path)
    for role, path in (("--calib", calib), ("--apply-plan", apply_plan_path), ("--sensitivity", sensitivity_path)):
        if path is not None:
            files.read(role, path)
    files.write("--report", report_path)
    files.write("--plan", plan_path)
    if not dry_run:
        files.write("-o" if output else "output", out_path)
    files.check()
    source = read_model(input_path)
    for extra in source.files[1:]:
        files.read("input model's external data", extra)
    if not dry_run:
        for extra in output_files(out_path, source.model)[1:]:
            files.write("-o" if output else "output", extra)
    files.check()
    options = PruneOptions(
        filters=ratio, heads=heads, neurons=neurons, layers=layers, drop_layers=tuple(drop_layers),
        layer_importance=layer_importance, importance=importance.lower(), round_to=round_to, global_rank=global_rank,
        exclude=tuple(exclude), input_shapes=parse_input_shapes(input_shapes),
        plan=load_plan_file(apply_plan_path) if apply_plan_path else None,
        seed=seed, verify=not no_verify, latency_runs=0 if no_verify else 20,
        calib=calib, image_spec=image_spec, calib_limit=calib_limit, allow_nonfinite=allow_nonfinite, recover=recover,
        target_macs=target_macs, target_params=target_params, target_latency=target_latency, min_keep=min_keep,
        sensitivity=sensitivity,
    )
    result = prune(source, options)
    del source  # the run owns the model now; let it go with the result
    report = result.report
    report["input"] = str(input_path)
    if not result.verification.ok:
        raise OnnxPruneError(f"the pruned model failed verification ({result.verification.checker}; "
                             f"onnxruntime {result.verification.ort}); nothing written")
    if not dry_run:
        save_model(result.model, out_path, protect=files.reads)
        report["output"] = str(out_path)
    if plan_path:
        _write_json(plan_path, result.plan.to_json(), "--plan")
    to_stdout = report_path is not None and str(report_path) == STDOUT
    if report_path and not to_stdout:
        _write_json(report_path, report, "--report")
    click.echo(summary_table(report), err=to_stdout)
    click.echo(f"wrote {out_path}" if not dry_run else "dry run: no model written", err=to_stdout)
    if to_stdout:
        click.echo(json.dumps(report, indent=2))


def _ratios(ctx, param, value):
    try:
        ratios = [float(r) for r in value.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 0.25,0.5,0.75", ctx, param) from None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise click.BadParameter(f"{value}: each ratio must be in (0, 1)", ctx, param)
    return tuple(ratios)


_TABLE_LINES = 30  # groups printed; --table writes all of them


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", "calib", type=click.Path(exists=True, path_type=Path), metavar="PATH",
              help="Calibration inputs (as for pruning); random inputs without it.")
@click.option("--calib-images", "image_spec", metavar="SPEC", help="Preprocessing for an image folder (as for pruning).")
@click.option("--calib-samples", "calib_limit", type=click.IntRange(min=1), metavar="N",
              help="Use at most N calibration samples  [default: 64].")
@click.option("--allow-nonfinite", is_flag=True, help="Accept calibration data holding NaN/inf (refused by default).")
@click.option("--labels", "labels", metavar="KEY",
              help="Class ids for accuracy: a key of the --calib .npz file(s), or an .npy/.npz/.txt file.")
@click.option("--ratios", "ratios", default="0.25,0.5,0.75", show_default=True, callback=_ratios,
              help="Fractions of each group to remove, comma-separated.")
@click.option("--importance", default="l2", show_default=True,
              type=click.Choice(criteria_names(), case_sensitive=False), help="Which channels of a group go first.")
@click.option("--recover", "recover", default="none", show_default=True, metavar="METHODS",
              help="Training-free recovery in every trial (bias, lsq, bn, comma-separated; needs --calib), "
                   "to measure what a group costs once compensated, as prune --recover will do it.")
@click.option("--heads", is_flag=True, help="Analyse attention heads as whole-head groups.")
@click.option("--layers", is_flag=True, help="Remove each residual block instead of pruning channel groups.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...", help="Fix an input's dims (repeatable).")
@click.option("--table", "table_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the table: .md, .csv, or .json (the file --sensitivity reads).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Write a plot (needs matplotlib).")
@click.option("--max-groups", "max_groups", type=click.IntRange(min=1), metavar="N",
              help="Measure only the N groups holding the most MACs (or the first N blocks).")
@click.option("--seed", default=0, show_default=True, type=_SEED, help="Seed for random inputs and the random criterion.")
def sensitivity_command(model_path, calib, image_spec, calib_limit, allow_nonfinite, labels, ratios, importance,
                        recover, heads, layers, input_shapes, table_path, plot_path, max_groups, seed):
    """Prune each group of MODEL alone at several ratios and measure how much the output changes."""
    from .files import RunFiles
    from .modelio import read_model
    from .sensitivity import TABLE_SUFFIXES, analyze_sensitivity, load_labels, require_matplotlib
    from .shapes import parse_input_shapes

    # Bad output requests fail now, not after minutes of measuring.
    if table_path is not None and table_path.suffix.lower() not in TABLE_SUFFIXES:
        raise OnnxPruneError(f"--table {table_path}: give a file ending in {', '.join(TABLE_SUFFIXES)}")
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise OnnxPruneError(f"--plot {plot_path}: the plot is a PNG, give a file ending in .png")
        require_matplotlib()
    if labels is not None and calib is None:
        raise click.UsageError("--labels: needs --calib (the samples the labels belong to)")
    files = RunFiles()
    files.read("model", model_path)
    if calib is not None:
        files.read("--calib", calib)
    if labels is not None and Path(labels).exists():
        files.read("--labels", labels)
    files.write("--table", table_path)
    files.write("--plot", plot_path)
    files.check()
    source = read_model(model_path)
    for extra in source.files[1:]:
        files.read("model's external data", extra)
    files.check()
    result = analyze_sensitivity(
        source, calibration=calib, ratios=ratios, importance=importance.lower(),
        input_shapes=parse_input_shapes(input_shapes), heads=heads, layers=layers,
        labels=load_labels(labels, calib) if labels is not None else None, seed=seed, max_groups=max_groups,
        image_spec=image_spec, calib_limit=calib_limit, recover=recover, allow_nonfinite=allow_nonfinite)
    click.echo(result.to_markdown(limit=_TABLE_LINES), nl=False)
    click.echo(f"measured {len(result.rows)} trials in {result.seconds:.1f} s")
    if table_path is not None:
        click.echo(f"wrote {result.save_table(table_path)}")
    if plot_path is not None:
        click.echo(f"wrote {result.plot(plot_path)}")


def _write_json(path: Path, data: dict, role: str) -> None:
    write_text(path, json.dumps(data, indent=2), role)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so staged files are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main(argv=None) -> int:
    """Entry point: `onnxprune sensitivity ...` or the main job. Errors become one line on
    stderr and a non-zero exit, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sensitivity"]:  # a model file of that name can still be given as ./sensitivity
        command, argv, prog = sensitivity_command, argv[1:], "onnxprune sensitivity"
    else:
        command, prog = prune_command, "onnxprune"
    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _terminate)
    except (ValueError, AttributeError):  # not the main thread, or no such signal here
        pass
    try:
        return _run(command, argv, prog)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _error(text: str) -> None:
    """One line on stderr, whatever the message holds."""
    click.echo(" ".join(str(text).split()), err=True)


def _run(command: click.Command, argv: list[str], prog_name: str) -> int:
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        _error("onnxprune: aborted")
        return 130
    except Terminated as exc:
        _error(f"onnxprune: stopped by {signal.Signals(exc.signum).name}")
        return 128 + exc.signum
    except click.ClickException as exc:
        _error(f"onnxprune: error: {exc.format_message()}")
        return 2
    except OnnxPruneError as exc:
        _error(f"onnxprune: error: {exc}")
        return 2
    except MemoryError:
        _error("onnxprune: error: out of memory; nothing written")
        return 1
    except Exception as exc:  # a bug, not bad input: still one line, traceback on request
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        _error(f"onnxprune: internal error: {type(exc).__name__}: {first_line(exc)} "
               "(set ONNXPRUNE_DEBUG=1 for the traceback; the input was not modified)")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
