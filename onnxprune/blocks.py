"""Whole residual blocks: find y = x + f(x) where f is a branch of its own, score, remove.

A block is an Add whose one input x is the block's input and whose other input f is
computed only from x (plus constants and side inputs such as attention masks) by nodes
that nothing else reads. Removing the block sends x wherever y went: the identity path
stays and the branch disappears (CNN residual blocks, transformer sublayers).

Scores (lowest removed first):
- "magnitude": the norm of the weights of the node that produces f (its last layer);
- "influence": how much the block changes its input on the given inputs,
  1 - cos(x, y) averaged over samples (ShortGPT's block influence).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .core.errors import OptionError
from .core.graph import Graph


@dataclass
class Block:
    add: gs.Node
    skip: gs.Tensor  # x
    branch: gs.Tensor  # f(x)
    nodes: list = field(default_factory=list)  # the branch's nodes
    key: str = ""  # the Add's name (its output's, for unnamed nodes)


def find_blocks(graph: Graph) -> list[Block]:
    g = graph.gs
    g.toposort()
    outputs = {t.name for t in g.outputs}
    blocks = []
    for node in g.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or node.outputs[0].name in outputs:
            continue
        shapes = [graph.shape(t) for t in node.inputs] + [graph.shape(node.outputs[0])]
        if any(s is None for s in shapes) or not (shapes[0] == shapes[1] == shapes[2]):
            continue
        for x, f in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            branch = _branch(x, f, node)
            if branch:
                blocks.append(Block(node, x, f, branch, node.name or node.outputs[0].name))
                break
    return blocks


def _branch(x: gs.Tensor, f: gs.Tensor, add: gs.Node) -> list | None:
    """Nodes on every path from x to f, if they form a branch nothing else reads."""
    if isinstance(x, gs.Constant) or isinstance(f, gs.Constant) or not f.inputs:
        return None
    below = set()  # ids of nodes fed (transitively) by x
    stack = list(x.outputs)
    while stack:
        n = stack.pop()
        if id(n) in below or n is add:
            continue
        below.add(id(n))
        for t in n.outputs:
            stack.extend(t.outputs)
    branch, seen, stack = [], set(), [f.inputs[0]]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if id(n) not in below:
            continue  # a side input (mask, shared constant chain): stays
        branch.append(n)
        for t in n.inputs:
            if t is not x and t.inputs:
                stack.append(t.inputs[0])
    if not branch or f.inputs[0] not in branch:
        return None
    members = {id(n) for n in branch}
    for n in branch:
        for t in n.outputs:
            readers = [c for c in t.outputs if id(c) not in members]
            if t is f:
                if readers != [add]:
                    return None
            elif readers:
                return None
    return branch


_WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def branch_tail(block: Block) -> list:
    """Nodes from the one producing f back to the branch's last weighted layer (inclusive),
    through weightless ops such as a bias Add, BatchNormalization or an activation."""
    members = {id(n) for n in block.nodes}
    tail, node = [], block.branch.inputs[0]
    while node is not None and len(tail) < 32:
        tail.append(node)
        if node.op in _WEIGHTED:
            break
        upstream = [t for t in node.inputs if t.inputs and id(t.inputs[0]) in members]
        node = upstream[0].inputs[0] if upstream else None
    return tail


def magnitude_scores(graph: Graph, blocks: list[Block]) -> dict[str, float]:
    """Norm of the weights of the branch's last layer, times the scales after it (a layer
    scale `x + gamma * f(x)`): 0 for a branch whose output is dead. A branch with no weighted
    layer (a pooling token mixer, `pool(x) - x`) has no magnitude to judge it by: inf, so it
    goes only by name or by measured influence."""
    scores = {}
    for block in blocks:
        tail = branch_tail(block)
        last = tail[-1]
        if last.op not in _WEIGHTED:
            scores[block.key] = 0.0 if _zero_scale(graph, tail) else float("inf")
            continue
        values = [graph.evaluate(t) for t in last.inputs[1:] if t.name]
        score = float(np.sqrt(sum(np.square(v.astype(np.float64)).sum() for v in values if v is not None)))
        for node in tail[:-1]:
            if node.op == "Mul":
                for t in node.inputs:
                    value = graph.const(t)
                    if value is not None and value.dtype.kind == "f" and value.size:
                        score *= float(np.sqrt(np.mean(np.square(value.astype(np.float64)))))
        scores[block.key] = score
    return scores


def _zero_scale(graph: Graph, tail: list) -> bool:
    """Whether a Mul on the branch's tail multiplies by constant zeros (the branch adds nothing)."""
    for node in tail:
        if node.op == "Mul":
            for t in node.inputs:
                value = graph.const(t)
                if value is not None and value.size and not np.any(value):
                    return True
    return False


def influence_scores(model: onnx.ModelProto, blocks: list[Block], feeds_list, session_factory) -> dict[str, float]:
    """1 - mean cosine similarity between each block's input and output on the given inputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    wanted = []
    for block in blocks:
        for t in (block.skip, block.add.outputs[0]):
            if t.name not in have and t.name not in wanted:
                wanted.append(t.name)
    for name in wanted:
        probe.graph.output.append(onnx.helper.ValueInfoProto(name=name))
    session = session_factory(probe)
    names = [o.name for o in session.get_outputs()]
    sims = {b.key: [] for b in blocks}
    for feeds in feeds_list:
        values = dict(zip(names, session.run(None, feeds)))
        for b in blocks:
            x = values[b.skip.name].astype(np.float64).reshape(-1)
            y = values[b.add.outputs[0].name].astype(np.float64).reshape(-1)
            denom = np.linalg.norm(x) * np.linalg.norm(y)
            sims[b.key].append(float(x @ y / denom) if denom > 0 else 1.0)
    return {k: 1.0 - float(np.mean(v)) for k, v in sims.items()}


def choose(blocks: list[Block], scores: dict[str, float], count: int, names=()) -> list[Block]:
    """The `count` lowest-scoring blocks (or the named ones), none inside another's branch."""
    by_key = {b.key: b for b in blocks}
    if names:
        missing = [n for n in names if n not in by_key]
        if missing:
            raise OptionError("drop_layers", missing[0], "not a removable residual block "
                                 f"(candidates: {', '.join(list(by_key)[:8])}{', ...' if len(by_key) > 8 else ''})")
        ordered = [by_key[n] for n in names]
    else:
        ordered = sorted(blocks, key=lambda b: (scores[b.key], b.key))
    chosen, covered = [], set()
    for block in ordered:
        if len(chosen) == count and not names:
            break
        ids = {id(n) for n in block.nodes} | {id(block.add)}
        if ids & covered or any(id(c.add) in ids or id(block.add) in {id(n) for n in c.nodes} for c in chosen):
            continue
        chosen.append(block)
        covered |= ids
    return chosen


def remove(graph: Graph, chosen: list[Block]) -> None:
    """Send each chosen block's input where its output went; the branch becomes dead code.

    Adjacent blocks chain: a block whose input was a removed block's output takes that block's
    input instead."""
    replaced: dict[str, gs.Tensor] = {}
    for block in chosen:
        y = block.add.outputs[0]
        skip = block.skip
        while skip.name in replaced:
            skip = replaced[skip.name]
        for consumer in list(y.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is y:
                    consumer.inputs[i] = skip
        replaced[y.name] = skip
        block.add.outputs.clear()
    graph.gs.cleanup(remove_unused_graph_inputs=False)
