"""Assembles every model's heads into one ONNX graph, so a batch needs one session call.

Input `features` (batch x F, float32). Outputs `quality` (batch x models, clipped to 0..1) and
`output_tokens` (batch x models, non-negative). The graph is built from parts, each an ONNX model
mapping `features` to one or more (batch x models) tensors: per-model LightGBM boosters (converted
by onnxmltools) or a torch module (exported by torch.onnx). Each output is a weighted sum of part
outputs (an ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "features"
# The default-domain opset of the assembled graph; parts made for a lower one (onnxmltools' LightGBM
# converter stops at 15) use only operators unchanged since.
OPSET = 17
LIGHTGBM_OPSET = 15
ML_OPSET = 1


def _graph_model(nodes: list, inits: list, n_features: int, outputs: dict[str, int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "router_heads",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])
            for name, width in outputs.items()
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="cost-aware-router",
    )
    model.ir_version = 8
    return model


def _inline(part: onnx.ModelProto, prefix: str) -> tuple[list, list]:
    """Nodes and initialisers of `part`, renamed under `prefix` (its outputs too: `prefix` + name),
    its input bound to `features`."""
    graph = part.graph
    (source_input,) = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    rename = {t: f"{prefix}{t}" for n in graph.node for t in n.output}
    rename.update({i.name: f"{prefix}{i.name}" for i in graph.initializer})
    rename[source_input] = INPUT
    nodes = []
    for index, node in enumerate(graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name or index}"
        copy.input[:] = [rename.get(t, t) if t else t for t in node.input]
        copy.output[:] = [rename.get(t, t) for t in node.output]
        nodes.append(copy)
    inits = []
    for init in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename[init.name]
        inits.append(copy)
    return nodes, inits


def _booster_graph(booster: object, n_features: int) -> onnx.ModelProto:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    return onnxmltools.convert_lightgbm(
        booster, initial_types=[(INPUT, FloatTensorType([None, n_features]))], target_opset=LIGHTGBM_OPSET
    )


def per_model_part(heads: Sequence[object], n_features: int) -> onnx.ModelProto:
    """One column per model: a LightGBM booster, or a float constant where nothing could be learnt."""
    nodes: list = []
    inits: list = []
    columns = []
    for j, head in enumerate(heads):
        out = f"col{j}"
        if isinstance(head, float):
            zero = numpy_helper.from_array(np.zeros((n_features, 1), dtype=np.float32), f"c{j}_zero")
            const = numpy_helper.from_array(np.array([head], dtype=np.float32), f"c{j}_const")
            nodes += [
                helper.make_node("MatMul", [INPUT, zero.name], [f"c{j}_z"]),
                helper.make_node("Add", [f"c{j}_z", const.name], [out]),
            ]
            inits += [zero, const]
        else:
            booster = _booster_graph(head, n_features)
            n, i = _inline(booster, f"c{j}_")
            nodes += [*n, helper.make_node("Identity", [f"c{j}_{booster.graph.output[0].name}"], [out])]
            inits += i
        columns.append(out)
    nodes.append(helper.make_node("Concat", columns, ["columns"], axis=1))
    return _graph_model(nodes, inits, n_features, {"columns": len(heads)})


# (part, which of its outputs, weight): one term of a weighted sum of (batch x models) tensors
Term = tuple[onnx.ModelProto, str, float]


def assemble(
    n_features: int, n_models: int, quality: Sequence[Term], output_tokens: Sequence[Term]
) -> onnx.ModelProto:
    """quality = clip(sum of weight x part output, 0, 1); output_tokens = relu(sum of the same).

    A part used by several terms (one graph giving several outputs) is inlined once."""
    nodes: list = []
    inits: list = []
    prefixes: dict[int, str] = {}

    def output_of(part: onnx.ModelProto, name: str) -> str:
        if name not in {o.name for o in part.graph.output}:
            raise ValueError(f"part has no output {name!r}")
        if id(part) not in prefixes:
            prefixes[id(part)] = f"p{len(prefixes)}_"
            n, i = _inline(part, prefixes[id(part)])
            nodes.extend(n)
            inits.extend(i)
        return prefixes[id(part)] + name

    def weighted_sum(terms: Sequence[Term], out: str) -> None:
        summands = []
        for k, (part, name, weight) in enumerate(terms):
            w = numpy_helper.from_array(np.array(weight, dtype=np.float32), f"{out}_w{k}")
            inits.append(w)
            nodes.append(helper.make_node("Mul", [output_of(part, name), w.name], [f"{out}_t{k}"]))
            summands.append(f"{out}_t{k}")
        nodes.append(helper.make_node("Sum", summands, [out]))

    weighted_sum(quality, "quality_raw")
    weighted_sum(output_tokens, "output_tokens_raw")
    inits += [
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one_f"),
    ]
    nodes.append(helper.make_node("Clip", ["quality_raw", "zero_f", "one_f"], ["quality"]))
    nodes.append(helper.make_node("Relu", ["output_tokens_raw"], ["output_tokens"]))
    model = _graph_model(nodes, inits, n_features, {"quality": n_models, "output_tokens": n_models})
    onnx.checker.check_model(model)
    return model
