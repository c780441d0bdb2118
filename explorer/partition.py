"""Deep Architecture Decomposition (DAD): cut a rewritten model into unit blocks.

A unit block is a maximal run of consecutive decision layers placed on one processor. Each block
is extracted as a valid ONNX model whose inputs are the tensors that cross into it (from earlier
blocks or the graph input) and whose outputs are the tensors later blocks or the graph need, so
running the blocks in order reproduces the whole model. Tensor names at layer boundaries survive
every rewrite (factorisation, fp16 casts, int8 QDQ), which is what the cut relies on.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.plan import Plan
from explorer.sessions import ChainStep, run_chain, scoring_session


@dataclass(frozen=True)
class BlockBoundary:
    """Where a unit block sits: its layer range, processor and the tensors that cross its edges."""

    start: int  # index of its first layer
    end: int  # one past its last layer
    processor: str
    layer_names: tuple[str, ...]
    inputs: tuple[str, ...]  # tensors crossing into the block (from earlier blocks or the graph input)
    outputs: tuple[str, ...]  # tensors crossing out of it (to later blocks or the graph output)


@dataclass
class UnitBlock:
    """A unit block with its own ONNX model."""

    index: int
    boundary: BlockBoundary
    model: onnx.ModelProto

    @property
    def processor(self) -> str:
        return self.boundary.processor

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.boundary.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.boundary.outputs


def block_boundaries(graph: LayerGraph, plan: Plan) -> list[BlockBoundary]:
    """The plan's unit blocks: maximal runs of consecutive layers on one processor, with crossings.

    Computed from the LayerGraph alone (no ONNX rewrite), so simulators can call it cheaply.
    """
    names = [name for name, _ in plan.decisions]
    if names != [layer.name for layer in graph.layers]:
        raise ExplorerError("plan layers are not the model's decision layers in order: make the plan for this model")
    runs: list[list[int]] = []
    for index, (_, decision) in enumerate(plan.decisions):
        if runs and plan.decisions[runs[-1][0]][1].processor == decision.processor:
            runs[-1].append(index)
        else:
            runs.append([index])
    needed_later: list[set[str]] = []
    later = set(graph.output_names)
    for run in reversed(runs):
        needed_later.append(set(later))
        for i in run:
            later |= set(graph.layers[i].inputs)
    needed_later.reverse()
    boundaries = []
    for run, needed in zip(runs, needed_later):
        layers = [graph.layers[i] for i in run]
        produced = [o for layer in layers for n in layer.node_names for o in graph.node_by_name[n].output]
        outputs = tuple(t for t in produced if t in needed)
        boundaries.append(BlockBoundary(run[0], run[-1] + 1, plan.decisions[run[0]][1].placed_processor,
                                        tuple(layer.name for layer in layers), run_inputs(graph, run[0], run[-1] + 1), outputs))
    return boundaries


def run_inputs(graph: LayerGraph, start: int, end: int) -> tuple[str, ...]:
    """Tensors that layers start..end-1 consume from earlier layers or the graph input."""
    layers = graph.layers[start:end]
    inside = {o for layer in layers for n in layer.node_names for o in graph.node_by_name[n].output}
    return tuple(dict.fromkeys(t for layer in layers for t in layer.inputs if t not in inside))


def unit_blocks(graph: LayerGraph, plan: Plan, model: onnx.ModelProto) -> list[UnitBlock]:
    """Cut `model` (the graph rewritten for `plan`) into the plan's unit blocks (see :func:`iter_unit_blocks`)."""
    return list(iter_unit_blocks(graph, plan, model))


def iter_unit_blocks(graph: LayerGraph, plan: Plan, model: onnx.ModelProto) -> Iterator[UnitBlock]:
    """The plan's unit blocks of `model` (the graph rewritten for `plan`), each its own ONNX model, one at
    a time (a caller that writes each away holds one block's weights at once).

    A crossing tensor that the rewrite quantises (its only consumer is a QuantizeLinear: an int8 layer's
    output) crosses as that uint8 tensor instead: the producing block then ends with the QuantizeLinear,
    so ONNX Runtime fuses the layer into the same integer kernel as in the whole model (the blocks
    compute exactly what `model` computes), and a quarter of the bytes cross.
    """
    quantised = _quantised_crossings(model)
    for i, b in enumerate(block_boundaries(graph, plan)):
        b = replace(b, inputs=tuple(quantised.get(t, t) for t in b.inputs),
                    outputs=tuple(quantised.get(t, t) for t in b.outputs))
        yield UnitBlock(i, b, extract_submodel(model, list(b.inputs), list(b.outputs), graph, f"block{i}"))


def _quantised_crossings(model: onnx.ModelProto) -> dict[str, str]:
    """Float tensor -> its uint8 QuantizeLinear output, for tensors consumed by that QuantizeLinear alone."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    graph_ends = {v.name for v in (*model.graph.input, *model.graph.output)}  # their type is the model's
    return {tensor: users[0].output[0] for tensor, users in consumers.items()
            if len(users) == 1 and users[0].op_type == "QuantizeLinear" and tensor not in graph_ends}


def extract_submodel(model: onnx.ModelProto, inputs: list[str], outputs: list[str],
                     graph: LayerGraph, name: str) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` from `inputs` (and initializers), as a model."""
    producer = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    stop = set(inputs)
    keep_nodes: dict[int, onnx.NodeProto] = {}
    keep_inits: set[str] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor in stop or not tensor:
            continue
        seen.add(tensor)
        if tensor in initializers:
            keep_inits.add(tensor)
            continue
        node = producer.get(tensor)
        if node is None:
            raise ExplorerError(f"{name}: tensor {tensor!r} is neither produced inside the block nor one of its inputs")
        keep_nodes[id(node)] = node
        stack.extend(node.input)
        for attribute in node.attribute:  # subgraphs (If/Loop) may read outer tensors
            if attribute.type == onnx.AttributeProto.GRAPH:
                stack.extend(i for n in attribute.g.node for i in n.input)
    order = {id(node): i for i, node in enumerate(model.graph.node)}
    nodes = sorted(keep_nodes.values(), key=lambda n: order[id(n)])
    sub = helper.make_graph(
        nodes, name,
        [_value_info(model, graph, t, initializers) for t in inputs],
        [_value_info(model, graph, t, initializers) for t in outputs],
        [t for t in model.graph.initializer if t.name in keep_inits],
    )
    block = helper.make_model(sub, opset_imports=list(model.opset_import), producer_name="explorer")
    block.ir_version = model.ir_version
    return block


def _value_info(model: onnx.ModelProto, graph: LayerGraph, tensor: str,
                initializers: dict[str, onnx.TensorProto]) -> onnx.ValueInfoProto:
    """Type and shape of a boundary tensor, with the original model's symbolic batch dimension; a
    QuantizeLinear output (a quantised crossing) has its zero point's type and its input's shape."""
    for value in list(graph.model.graph.input) + list(graph.model.graph.value_info) + list(graph.model.graph.output):
        if value.name == tensor:
            return value
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] == tensor:
            source = _value_info(model, graph, node.input[0], initializers)
            zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else None
            quantised = onnx.ValueInfoProto()
            quantised.CopyFrom(source)
            quantised.name = tensor
            quantised.type.tensor_type.elem_type = zero_point.data_type if zero_point else onnx.TensorProto.UINT8
            return quantised
    return helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)


def run_blocks(blocks: list[UnitBlock], feeds: dict[str, np.ndarray],
               sessions: list[ort.InferenceSession] | None = None) -> dict[str, np.ndarray]:
    """Run the blocks in order on CPU ONNX Runtime sessions (`sessions`, or scoring sessions opened one at a
    time); returns every tensor that crossed."""
    def runner(i: int, block: UnitBlock):
        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            session = sessions[i] if sessions else scoring_session(block.model)
            return session.run(list(block.outputs), feed)
        return run

    return run_chain([ChainStep(block.inputs, block.outputs, runner(i, block)) for i, block in enumerate(blocks)], feeds)
