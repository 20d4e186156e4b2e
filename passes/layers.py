"""Remove whole residual blocks (y = x + f(x), see onnxprune/blocks.py): by count or fraction,
by name, scored by weight magnitude or by measured influence. Block removal comes first;
channel pruning then works on the result."""
from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from onnxprune import blocks
from onnxprune.core.errors import OptionError
from onnxprune.core.graph import Graph
from onnxprune.core.metrics import random_inputs
from onnxprune.core.shapes import (
    complete_shapes,
    concrete_input_shapes,
    fix_input_shapes,
    restore_interface,
)
from onnxprune.core.verify import Checker, session
from onnxprune.pipeline import Context, Pass, PassResult, note_shapes
from onnxprune.settings import Flag, choice, count_or_fraction, names, setting

INFLUENCE_SAMPLES = 16  # calibration samples for block influence: a ranking needs few
RANDOM_FEEDS = 4  # random inputs for block influence without calibration data


@dataclass
class LayerSettings:
    layers: float = setting(0.0, check=count_or_fraction, cli=Flag(
        "--layers", "Residual blocks (transformer layers, ResNet blocks) to remove: a count, or a fraction < 1.",
        parse=float))
    drop_layers: tuple = setting((), check=names, cli=Flag(
        "--drop-layer", "Remove this residual block, named by its Add node (repeatable).", metavar="NAME",
        multiple=True))
    layer_importance: str = setting("magnitude", check=choice(("magnitude", "influence")), cli=Flag(
        "--layer-importance", "How blocks are scored for --layers.", choices=lambda: ("magnitude", "influence"),
        show_default=True))

    @property
    def requested(self) -> bool:
        return bool(self.layers or self.drop_layers)


class RemoveLayers(Pass):
    """Returns the model without the chosen blocks; the unpruned model (at the analysed input
    dims) becomes the reference the result is verified against."""

    name = "layers"

    def __init__(self, settings: LayerSettings) -> None:
        self.settings = settings

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        reference = model
        if context.input_shapes or not context.owned:
            reference = onnx.ModelProto()
            reference.CopyFrom(model)
        if context.input_shapes:
            fix_input_shapes(reference, context.input_shapes)
        context.reference = reference
        # shape inference fills the reference's value_info; its nodes and weights stay as they
        # are, since the removal happens in the graphsurgeon copy
        graph = Graph(complete_shapes(reference))
        note_shapes(context, reference)
        candidates = blocks.find_blocks(graph)
        layers = self.settings.layers
        count = int(layers) if layers >= 1 else int(layers * len(candidates))
        if count > len(candidates):
            raise OptionError("layers", count, f"the model has {len(candidates)} removable residual blocks")
        scores, criterion = self._scores(reference, graph, candidates, context)
        chosen = blocks.choose(candidates, scores, count, self.settings.drop_layers)
        blocks.remove(graph, chosen)
        result = graph.to_model()
        rolled_back = []
        checker = Checker(reference, context.shapes, context.seed, guessed=bool(context.guessed))
        failure = checker.failure(result)
        if failure:  # keep the blocks whose removal the model survives, one after another
            kept = []
            for block in chosen:
                trial = _without(reference, [b.key for b in [*kept, block]])
                why = checker.failure(trial)
                if why:
                    rolled_back.append({"block": block.key, "reason": why})
                else:
                    kept.append(block)
            chosen = kept
            result = _without(reference, [b.key for b in chosen])
            context.notes.append(f"--layers: {len(rolled_back)} block(s) kept, the model fails without them "
                                 f"({rolled_back[0]['reason']})")
        context.owned = True  # the model handed on is a new one
        report = {"candidates": len(candidates),
                  "criterion": "named" if self.settings.drop_layers else criterion,
                  "removed": [b.key for b in chosen], "scores": {b.key: _rounded(scores[b.key]) for b in candidates}}
        if rolled_back:
            report["rolled_back"] = rolled_back
        return PassResult(result, {"layers": report})

    def _scores(self, model, graph, candidates, context: Context) -> tuple[dict, str]:
        if self.settings.layer_importance == "magnitude":
            return blocks.magnitude_scores(graph, candidates), "magnitude (norm of each branch's last layer)"
        if context.calibration is not None:
            feeds = list(context.calibration.limited(INFLUENCE_SAMPLES))
            where = f"{sum(len(next(iter(f.values()))) for f in feeds)} calibration samples"
            # the calibration batches have the user's dims, not those --input-shape fixed for the analysis
            model = onnx.ModelProto()
            model.CopyFrom(context.reference)
            restore_interface(model, context.interface, keep_value_info=False)
            del model.graph.value_info[:]
        else:
            shapes, _ = concrete_input_shapes(model, context.input_shapes)
            feeds = [random_inputs(model, shapes, context.seed + i) for i in range(RANDOM_FEEDS)]
            where = f"{RANDOM_FEEDS} random inputs (no --calib)"
        scores = blocks.influence_scores(model, candidates, feeds, session)
        return scores, f"influence (1 - cos(x, block(x)) on {where})"


def _without(reference: onnx.ModelProto, keys: list[str]) -> onnx.ModelProto:
    """`reference` with the blocks named by `keys` removed (a fresh graph each time)."""
    graph = Graph(complete_shapes(reference))
    chosen = [b for b in blocks.find_blocks(graph) if b.key in set(keys)]
    blocks.remove(graph, chosen)
    return graph.to_model()


def _rounded(score: float) -> float | None:
    """A score for the report; None for a block magnitude cannot judge (inf: JSON has no inf)."""
    return round(score, 6) if math.isfinite(score) else None
