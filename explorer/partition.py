"""Deep Architecture Decomposition (DAD): cut a rewritten model into unit blocks.

A unit block is a maximal run of consecutive decision layers placed on one processor. Each block
is extracted as a valid ONNX model whose inputs are the tensors that cross into it (from earlier
blocks or the graph input) and whose outputs are the tensors later blocks or the graph need, so
running the blocks in order reproduces the whole model. Tensor names at layer boundaries survive
every rewrite (factorisation, fp16 casts, int8 QDQ), which is what the cut relies on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.plan import Plan


@dataclass
class UnitBlock:
    """Consecutive layers on one processor, as its own ONNX model."""

    index: int
    processor: str | None
    layer_names: list[str]
    inputs: list[str]  # tensors crossing into the block
    outputs: list[str]  # tensors crossing out of it
    model: onnx.ModelProto

    def input_bytes(self, graph: LayerGraph) -> int:
        """Bytes that must reach the block's processor before it runs (batch 1)."""
        return sum(graph.tensor_bytes(name) for name in self.inputs)


def block_ranges(plan: Plan) -> list[tuple[int, int, str | None]]:
    """(first layer index, end index, processor) of each maximal same-processor run of a plan."""
    ranges: list[tuple[int, int, str | None]] = []
    for index, (_, decision) in enumerate(plan.decisions):
        if ranges and ranges[-1][2] == decision.processor:
            start, _, processor = ranges[-1]
            ranges[-1] = (start, index + 1, processor)
        else:
            ranges.append((index, index + 1, decision.processor))
    return ranges


def unit_blocks(graph: LayerGraph, plan: Plan, model: onnx.ModelProto) -> list[UnitBlock]:
    """Cut `model` (the graph rewritten for `plan`) into the plan's unit blocks."""
    names = [name for name, _ in plan.decisions]
    if names != [layer.name for layer in graph.layers]:
        raise ExplorerError("plan layers are not the model's decision layers in order: make the plan for this model")
    ranges = block_ranges(plan)
    produced_before: list[set[str]] = []
    produced: set[str] = set(graph.input_names)
    for start, end, _ in ranges:
        produced_before.append(set(produced))
        for layer in graph.layers[start:end]:
            for node_name in layer.node_names:
                produced.update(graph.node_by_name[node_name].output)
    needed_after: list[set[str]] = [set() for _ in ranges]
    later_needs = set(graph.output_names)
    for i in range(len(ranges) - 1, -1, -1):
        needed_after[i] = set(later_needs)
        start, end, _ = ranges[i]
        for layer in graph.layers[start:end]:
            later_needs |= set(layer.inputs)
    blocks = []
    for i, (start, end, processor) in enumerate(ranges):
        layers = graph.layers[start:end]
        produced_inside = [o for layer in layers for n in layer.node_names for o in graph.node_by_name[n].output]
        inside = set(produced_inside)
        inputs = list(dict.fromkeys(t for layer in layers for t in layer.inputs if t not in inside))
        outputs = [t for t in produced_inside if t in needed_after[i]]
        missing = set(inputs) - produced_before[i]
        if missing:
            raise ExplorerError(f"block {i} needs tensors no earlier block produces: {sorted(missing)[:3]}")
        blocks.append(UnitBlock(i, processor, [layer.name for layer in layers], inputs, outputs,
                                extract_submodel(model, inputs, outputs, graph, f"block{i}")))
    return blocks


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
        [_value_info(model, graph, t) for t in inputs],
        [_value_info(model, graph, t) for t in outputs],
        [t for t in model.graph.initializer if t.name in keep_inits],
    )
    block = helper.make_model(sub, opset_imports=list(model.opset_import), producer_name="explorer")
    block.ir_version = model.ir_version
    return block


def _value_info(model: onnx.ModelProto, graph: LayerGraph, tensor: str) -> onnx.ValueInfoProto:
    """Type and shape of a boundary tensor, with the original model's symbolic batch dimension."""
    for value in list(graph.model.graph.input) + list(graph.model.graph.value_info) + list(graph.model.graph.output):
        if value.name == tensor:
            return value
    return helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)


def run_blocks(blocks: list[UnitBlock], feeds: dict[str, np.ndarray], sessions=None) -> dict[str, np.ndarray]:
    """Run the blocks in order on CPU ONNX Runtime sessions; returns every tensor that crossed."""
    from explorer.accuracy import inference_session

    values = dict(feeds)
    for i, block in enumerate(blocks):
        session = sessions[i] if sessions else inference_session(block.model)
        results = session.run(block.outputs, {name: values[name] for name in block.inputs})
        values.update(zip(block.outputs, results))
    return values
