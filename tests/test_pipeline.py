"""The pass contract: pipelines of passes, a pass added from outside, requirements, and the
API's handling of options and failed verification."""
import dataclasses

import onnx
import pytest

from onnxprune import Context, OptionError, PassResult, Pipeline, PruneOptions, VerificationError, prune
from onnxprune.api import STAGES, options_from, pruning_pipeline
from onnxprune.pipeline import PassError
from onnxprune.settings import info
from toy_pass import TagLargestGroup

FIXTURE = "fixtures/tiny_resnet.onnx"


def test_a_pass_from_outside_runs_in_the_pruning_pipeline_and_reports():
    options = options_from(filters=0.3, latency_runs=0)
    pipeline = pruning_pipeline(options)
    names = [p.name for p in pipeline.passes]
    assert names[:2] == ["validate", "calibration"] and "channels" in names and names[-1] == "measure"
    pipeline.passes.insert(names.index("channels") + 1, TagLargestGroup())
    context = Context()
    model = onnx.load(FIXTURE)
    result = pipeline(model, context)
    assert isinstance(result, PassResult) and result.modified
    assert context.report["toy"] == {"largest_group": 48}
    assert {p.key: p.value for p in result.model.metadata_props}["largest_group"] == "48"
    assert context.report["summary"]["channels_removed"] > 0
    assert not any(p.key == "largest_group" for p in model.metadata_props)  # the input is left as it was


def test_a_pass_run_before_what_it_needs_says_so():
    with pytest.raises(PassError, match="tag_largest_group: needs a plan"):
        Pipeline([TagLargestGroup()])(onnx.load(FIXTURE), Context())


def test_prune_is_the_pipeline_it_builds():
    by_pipeline = pruning_pipeline(options_from(filters=0.4, importance="l1", latency_runs=0))(
        onnx.load(FIXTURE), Context()).model
    by_prune = prune(FIXTURE, filters=0.4, importance="l1", latency_runs=0).model
    assert by_pipeline.SerializeToString() == by_prune.SerializeToString()


def test_options_are_the_stages_settings():
    fields = {f.name for f in dataclasses.fields(PruneOptions)}
    assert fields == {f.name for cls in STAGES for f in dataclasses.fields(cls)}
    assert {"filters", "recover", "calib", "layers", "target_latency", "input_shapes", "seed"} <= fields


def test_every_flag_in_help_comes_from_a_setting():
    from onnxprune.cli import prune_command

    import click

    flags = {opt for p in prune_command.params if isinstance(p, click.Option) for opt in p.opts}
    declared = {info(f).cli.flag for cls in STAGES for f in dataclasses.fields(cls) if info(f).cli is not None}
    assert declared <= flags
    own = {"-o", "--output", "--report", "--plan", "--dry-run", "--no-verify", "-q", "--quiet", "-v", "--verbose",
           "--version", "-h", "--help"}
    assert flags - declared <= own


@pytest.mark.parametrize("kwargs,needle", [
    ({"filters": "0.3"}, "filters='0.3': expected a fraction in [0, 1), got str"),
    ({"filters": 1.5}, "filters=1.5: must be in [0, 1)"),
    ({"round_to": 2.5}, "round_to=2.5: expected an integer"),
    ({"exclude": [1]}, "exclude=[1]: expected a list of names"),
    ({"recover": "magic"}, "recover='magic': choose from"),
    ({"importance": "nope"}, "importance='nope': choose from"),
    ({"seed": -1}, "seed=-1: must be in"),
    ({"layers": float("nan")}, "layers=nan"),
    ({"bogus": 1}, "bogus: unknown option"),
    ({"target_macs": 0.5, "target_params": 0.5}, "target_macs=0.5: give it or target_params, not both"),
])
def test_wrong_options_are_named_as_the_api_spells_them(kwargs, needle):
    with pytest.raises(OptionError) as raised:
        prune(FIXTURE, **kwargs)
    assert needle in str(raised.value)
    assert "--" not in str(raised.value)


def test_the_cli_names_the_same_errors_by_flag(capsys):
    from onnxprune.cli import main

    assert main([FIXTURE, "--filters", "0.3", "--target-macs", "0.5", "--target-params", "0.5", "--dry-run"]) == 2
    assert "--target-macs 0.5: give it or --target-params, not both" in capsys.readouterr().err


def test_a_failed_verification_raises_from_the_api():
    from onnxprune.passes.verify import Verify

    model = onnx.load(FIXTURE)
    broken = onnx.load(FIXTURE)
    broken.graph.node[-1].op_type = "Relu"  # the last Gemm becomes a Relu: its output changes shape
    del broken.graph.node[-1].input[1:]
    del broken.graph.node[-1].attribute[:]
    context = Context(reference=model, shapes={"input": [1, 3, 32, 32]})
    with pytest.raises(VerificationError, match="failed verification") as raised:
        Verify()(broken, context)
    assert raised.value.result.report["verification"]["onnxruntime"].startswith("failed")
