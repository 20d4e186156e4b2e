"""Command line: `onnxprune INPUT --filters R [...]`, `onnxprune sensitivity MODEL [...]` and
`onnxprune finetune MODEL --data DATA [...]`.

The options that set what a pass does are made from the passes' settings declarations
(settings.py): their flags, help, parsing and checks are written once, beside the pass. What
is declared here is the command's own business: where files go, what is printed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .api import STAGES, beside, finetune, options_from, prune, weights_mode, write_beside
from .core.errors import OnnxPruneError, OptionError, VerificationError, first_line
from .core.files import STDOUT, RunFiles, write_text
from .core.progress import showing_progress
from .passes.calibration import CalibrationSettings
from .passes.finetune import FineTuneSettings
from .passes.gradual import GradualSettings
from .passes.handover import CONFIG_SUFFIX, ORT_SUFFIX, TargetSettings
from .passes.iterative import IterativeSettings
from .passes.latency import LatencySettings
from .passes.layers import LayerSettings
from .passes.plan import PlanSettings
from .passes.quantize import QuantizeSettings
from .passes.recovery import RecoverySettings
from .passes.sparsity import SparsitySettings
from .passes.validate import InputSettings
from .sensitivity.trials import SensitivitySettings
from .settings import cli_settings, info

_CONTEXT = {"help_option_names": ["-h", "--help"]}


# -- options made from settings -----------------------------------------------------------------

def _click_option(f: dataclasses.Field) -> click.Option:
    flag = info(f).cli
    metavar = flag.metavar or {float: "R", int: "N"}.get(flag.parse)
    kwargs = {"help": flag.help, "metavar": metavar, "default": None}
    if flag.is_flag:
        kwargs.update(is_flag=True, default=False)
    elif flag.multiple:
        kwargs.update(multiple=True, default=())
    if flag.choices is not None:
        kwargs["type"] = click.Choice(sorted(flag.choices()), case_sensitive=False)
    if flag.show_default and not flag.is_flag:
        kwargs["help"] += f"  [default: {_shown(f.default)}]"
    return click.Option([flag.flag, f.name], **kwargs)


def _shown(default) -> str:
    return ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else str(default)


def _given(fields, values: dict) -> dict:
    """The settings the user gave, parsed from their command-line text (None/empty: not given)."""
    out = {}
    for f in fields:
        flag, value = info(f).cli, values.get(f.name)
        if value is None or value == () or (flag.is_flag and value is False):
            continue
        if flag.parse is not None and not flag.is_flag:
            try:
                value = flag.parse(value) if flag.multiple or not isinstance(value, tuple) else value
            except (ValueError, TypeError):
                raise OptionError(f.name, value, "not a number" if flag.parse in (int, float) else "cannot be read") \
                    from None
        out[f.name] = value
    return out


def _flag_names(classes) -> dict[str, str]:
    names = {f.name: info(f).cli.flag for f in cli_settings(classes)}
    names.update(verify="--no-verify", latency_runs="--no-verify", table="--table", plot="--plot", labels="--labels")
    return names


_FLAGS = _flag_names(STAGES + (SensitivitySettings,))
_FLAGS.update(resume="--resume")


def _with_settings(fields):
    """Put the options made from `fields` first, in their order."""
    def decorate(command):
        command.params[:0] = [_click_option(f) for f in fields]
        return command
    return decorate


def _common_options(command):
    for option in (click.Option(["-q", "--quiet"], is_flag=True, help="No progress bars."),
                   click.Option(["-v", "--verbose"], count=True, help="Say what each stage does (-vv: more)."),
                   click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True,
                                callback=_print_version, help="Show the version and exit.")):
        command.params.append(option)
    return command


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f"onnxprune {__version__}")
        ctx.exit()


# -- the main job -------------------------------------------------------------------------------

# In --help: what to remove first, then how, then the data and inputs it is measured on.
_PRUNE_FIELDS = cli_settings((PlanSettings, LayerSettings, SparsitySettings, LatencySettings, RecoverySettings,
                              CalibrationSettings, FineTuneSettings, IterativeSettings, GradualSettings,
                              QuantizeSettings, TargetSettings, InputSettings))
assert {f.name for f in _PRUNE_FIELDS} == {f.name for f in cli_settings(STAGES)}


@_common_options
@_with_settings(_PRUNE_FIELDS)
@click.command(context_settings=_CONTEXT)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the pruned model (default: INPUT.pruned.onnx next to the input).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here ('-': standard output, the table then goes to standard error).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the removed channel indices here.")
@click.option("--dry-run", is_flag=True, help="Plan and report, but write no model.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime run, comparison and latency measurement.")
def prune_command(input_path, output, report_path, plan_path, dry_run, no_verify, quiet, verbose, **values):
    """Prune INPUT (an .onnx model) into a smaller model that computes the same minus the removed channels.

    See also `onnxprune sensitivity MODEL --help`: how much each group's pruning costs.
    """
    from .core.modelio import default_output_path, output_files, read_model, save_model
    from .report import summary_table

    given = _given(_PRUNE_FIELDS, values)
    if not given.keys() & {"filters", "neurons", "heads", "head_dim", "hidden", "layers", "drop_layers", "plan",
                           "target_macs", "target_params", "target_latency", "sparsity", "pattern"}:
        raise click.UsageError("give --filters R, --neurons R, --heads R, --hidden R, --target-macs R, --layers N "
                               "and/or --sparsity R (or --apply-plan FILE)")
    if no_verify:
        given.update(verify=False, latency_runs=0)
    for flag, path in (("-o", output), ("--plan", plan_path)):
        if path is not None and str(path) == STDOUT:
            raise click.BadParameter("give a file path ('-' is for --report only)", param_hint=flag)
    out_path = output or default_output_path(input_path)
    # Every path is checked against every other before the work starts: nothing the run
    # reads is written over, and no two outputs share a file.
    files = RunFiles()
    files.read("input model", input_path)
    _record_reads(files, _PRUNE_FIELDS, given)
    files.write("--report", report_path)
    files.write("--plan", plan_path)
    if not dry_run:
        files.write("-o" if output else "output", out_path)
        if given.get("target") == "ort-mobile":
            for suffix in (ORT_SUFFIX, CONFIG_SUFFIX):
                files.write("--target ort-mobile", beside(out_path, suffix))
    own_checkpoint = _default_checkpoint(given, out_path)
    files.write_folder("--checkpoint", given.get("checkpoint"))
    files.check()
    options = options_from(**given)  # checked before the model is read
    weights = weights_mode(options)
    with _console(quiet, verbose):
        source = read_model(input_path, weights)
        for extra in source.files[1:]:
            files.read("input model's external data", extra)
        if not dry_run:
            for extra in output_files(out_path, source.model)[1:]:
                files.write("-o" if output else "output", extra)
        files.check()
        try:
            result = prune(source, options)
        finally:
            _remove_checkpoint(own_checkpoint, finished=False)
        del source  # the run owns the model now; let it go with the result
        report = result.report
        report["input"] = str(input_path)
        if not dry_run:
            save_model(result.model, out_path, protect=files.reads)
            report["output"] = str(out_path)
            extras = write_beside(out_path, result.files)
            if extras:
                report["output_files"] = [str(p) for p in extras]
        _remove_checkpoint(own_checkpoint)
    if plan_path:
        _write_json(plan_path, result.plan.to_json(), "--plan")
    to_stdout = report_path is not None and str(report_path) == STDOUT
    if report_path and not to_stdout:
        _write_json(report_path, report, "--report")
    click.echo(summary_table(report), err=to_stdout)
    written = [str(out_path), *report.get("output_files", [])]
    click.echo(f"wrote {', '.join(written)}" if not dry_run else "dry run: no model written", err=to_stdout)
    if to_stdout:
        click.echo(json.dumps(report, indent=2))


def _default_checkpoint(given: dict, out_path: Path) -> Path | None:
    """Fine-tuning from the CLI always keeps a checkpoint, so an interrupted run can be resumed:
    in --checkpoint DIR if given (kept), else in OUTPUT.ckpt (removed once the model is written).
    Returns the folder to remove after success, if any."""
    if given.get("finetune") is None or given.get("checkpoint") is not None:
        return None
    folder = out_path.with_name(out_path.name + ".ckpt")
    given["checkpoint"] = folder
    if _holds_state(folder) and not given.get("resume"):
        raise click.UsageError(f"{folder} holds the training state of an interrupted run: add --resume to continue "
                               "it, or remove the folder")
    return folder


def _holds_state(folder: Path) -> bool:
    """A fine-tuning checkpoint, or iterative pruning's (rounds in round-K/ folders)."""
    return (folder / "state" / "latest").is_file() or (folder / "iterative.json").is_file() or \
        any((round_ / "state" / "latest").is_file() for round_ in folder.glob("round-*"))


def _remove_checkpoint(folder: Path | None, finished: bool = True) -> None:
    """Remove the default checkpoint folder: after success, or when a failed run saved nothing
    in it (an interrupted run's state stays, to be resumed)."""
    import shutil

    if folder is not None and folder.is_dir() and (finished or not _holds_state(folder)):
        shutil.rmtree(folder, ignore_errors=True)


def _record_reads(files: RunFiles, fields, given: dict) -> None:
    for f in fields:
        flag = info(f).cli
        if flag.reads and isinstance(given.get(f.name), (str, Path)):
            files.read(flag.flag, given[f.name])


# -- sensitivity ----------------------------------------------------------------------------------

_TABLE_LINES = 30  # groups printed; --table writes all of them


def _only(cls, *names):
    return [f for f in dataclasses.fields(cls) if f.name in names]


_SENSITIVITY_FIELDS = (cli_settings((CalibrationSettings, InputSettings, SensitivitySettings))
                       + _only(PlanSettings, "importance") + _only(RecoverySettings, "recover"))


@_common_options
@_with_settings(_SENSITIVITY_FIELDS)
@click.command(context_settings=_CONTEXT)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--labels", "labels", metavar="KEY",
              help="Class ids for accuracy: a key of the --calib .npz file(s), or an .npy/.npz/.txt file.")
@click.option("--table", "table_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the table: .md, .csv, or .json (the file --sensitivity reads).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Write a plot (needs matplotlib).")
def sensitivity_command(model_path, labels, table_path, plot_path, quiet, verbose, **values):
    """Prune each group of MODEL alone at several ratios and measure how much the output changes.

    Without --calib, random inputs stand in (and the output says so); --calib-samples defaults
    to 64. --recover applies that recovery in every trial, to measure what a group costs once
    compensated, as prune --recover will.
    """
    from .core.modelio import read_model
    from .sensitivity import (
        TABLE_SUFFIXES,
        analyze_sensitivity,
        load_labels,
        require_matplotlib,
    )

    given = _given(_SENSITIVITY_FIELDS, values)
    # Bad output requests fail now, not after minutes of measuring.
    if table_path is not None and table_path.suffix.lower() not in TABLE_SUFFIXES:
        raise OnnxPruneError(f"--table {table_path}: give a file ending in {', '.join(TABLE_SUFFIXES)}")
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise OnnxPruneError(f"--plot {plot_path}: the plot is a PNG, give a file ending in .png")
        require_matplotlib()
    calib = given.get("calib")
    if labels is not None and calib is None:
        raise click.UsageError("--labels: needs --calib (the samples the labels belong to)")
    files = RunFiles()
    files.read("model", model_path)
    _record_reads(files, _SENSITIVITY_FIELDS, given)
    if labels is not None and Path(labels).exists():
        files.read("--labels", labels)
    files.write("--table", table_path)
    files.write("--plot", plot_path)
    files.check()
    source = read_model(model_path)
    for extra in source.files[1:]:
        files.read("model's external data", extra)
    files.check()
    given["calibration"] = given.pop("calib", None)
    if "image_spec" in given and given["calibration"] is None:
        given.pop("image_spec")
    with _console(quiet, verbose):
        result = analyze_sensitivity(source, labels=load_labels(labels, calib) if labels is not None else None,
                                     **given)
    click.echo(result.to_markdown(limit=_TABLE_LINES), nl=False)
    click.echo(f"measured {len(result.rows)} trials in {result.seconds:.1f} s")
    if table_path is not None:
        click.echo(f"wrote {result.save_table(table_path)}")
    if plot_path is not None:
        click.echo(f"wrote {result.plot(plot_path)}")


# -- finetune ------------------------------------------------------------------------------------

_FINETUNE_FIELDS = [f for f in cli_settings((FineTuneSettings, InputSettings)) if f.name != "finetune"]


@_common_options
@_with_settings(_FINETUNE_FIELDS)
@click.command(context_settings=_CONTEXT)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), metavar="DATA",
              help="Training data: .npz keyed by input names plus labels, a folder of them, or an image folder "
                   "with a subfolder per class.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the fine-tuned model (default: MODEL.finetuned.onnx next to it).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here ('-': standard output).")
def finetune_command(model_path, data, output, report_path, quiet, verbose, **values):
    """Fine-tune MODEL's weights on DATA through onnxruntime-training (needs the [training] extra).

    The output is MODEL's graph as it was, with trained weights. Losses: ce with labels; mse to
    match --teacher (or float labels); kd to distil from --teacher, mixed with ce when labels
    are given.
    """
    from .core.modelio import read_model, save_model
    from .report import finetune_table

    given = _given(_FINETUNE_FIELDS, values)
    given["finetune"] = data
    out_path = output or model_path.with_name(model_path.stem + ".finetuned.onnx")
    files = RunFiles()
    files.read("model", model_path)
    files.read("--data", data)
    _record_reads(files, _FINETUNE_FIELDS, given)
    files.write("--report", report_path)
    files.write("-o" if output else "output", out_path)
    own_checkpoint = _default_checkpoint(given, out_path)
    files.write_folder("--checkpoint", given.get("checkpoint"))
    files.check()
    given.pop("finetune")
    with _console(quiet, verbose):
        source = read_model(model_path)
        try:
            result = finetune(source, data, **given)
        finally:
            _remove_checkpoint(own_checkpoint, finished=False)
        save_model(result.model, out_path, protect=files.reads)
        _remove_checkpoint(own_checkpoint)
    report = {**result.report, "input": str(model_path), "output": str(out_path)}
    to_stdout = report_path is not None and str(report_path) == STDOUT
    if report_path and not to_stdout:
        _write_json(report_path, report, "--report")
    click.echo(finetune_table(report["finetune"]), err=to_stdout)
    for note in report.get("notes", []):
        click.echo(f"note: {note}", err=to_stdout)
    click.echo(f"wrote {out_path}", err=to_stdout)
    if to_stdout:
        click.echo(json.dumps(report, indent=2))


def _write_json(path: Path, data: dict, role: str) -> None:
    write_text(path, json.dumps(data, indent=2), role)


class _console:
    """Progress bars on a terminal unless -q; -v logs each stage (-vv: details) to stderr."""

    def __init__(self, quiet: bool, verbose: int) -> None:
        self.show = not quiet and sys.stderr.isatty()
        self.level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else None

    def __enter__(self):
        self.progress = showing_progress(self.show)
        self.progress.__enter__()
        self.handler = None
        if self.level is not None:
            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(logging.Formatter("onnxprune: %(message)s"))
            logger = logging.getLogger("onnxprune")
            logger.addHandler(self.handler)
            self.old_level = logger.level
            logger.setLevel(self.level)
        return self

    def __exit__(self, *exc):
        if self.handler is not None:
            logger = logging.getLogger("onnxprune")
            logger.removeHandler(self.handler)
            logger.setLevel(self.old_level)
        return self.progress.__exit__(*exc)


# -- running a command ----------------------------------------------------------------------------

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
    elif argv[:1] == ["finetune"]:
        command, argv, prog = finetune_command, argv[1:], "onnxprune finetune"
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


def _option_message(exc: OptionError, flags: dict) -> str:
    """An option error as the command line spells it: flags, values as typed."""
    return exc.render(lambda option: flags.get(option, option), str)


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
    except OptionError as exc:
        flags = {**_FLAGS, "finetune": "--data"} if command is finetune_command else _FLAGS
        _error(f"onnxprune: error: {_option_message(exc, flags)}")
        return 2
    except VerificationError as exc:
        _error(f"onnxprune: error: {exc}; nothing written")
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
