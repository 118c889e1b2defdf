"""Assembles every model's heads into one ONNX graph, so a batch needs one session call.

Input `features` (batch x F, float32). Outputs `quality` (batch x models, clipped to 0..1) and
`output_tokens` (batch x models, non-negative). Boosters are converted by onnxmltools; constant
heads become a constant column.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from training.heads import TrainedHeads

INPUT = "features"
# onnxmltools' LightGBM converter supports the default domain up to this opset.
OPSET = 15
ML_OPSET = 1


def _booster_graph(booster: object, n_features: int) -> onnx.ModelProto:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    return onnxmltools.convert_lightgbm(
        booster, initial_types=[(INPUT, FloatTensorType([None, n_features]))], target_opset=OPSET
    )


def _column_nodes(head: object, n_features: int, prefix: str) -> tuple[list, list, str]:
    """Nodes and initialisers computing one (batch x 1) column named `{prefix}out`."""
    out = f"{prefix}out"
    if isinstance(head, float):
        zero = numpy_helper.from_array(np.zeros((n_features, 1), dtype=np.float32), f"{prefix}zero")
        const = numpy_helper.from_array(np.array([head], dtype=np.float32), f"{prefix}const")
        nodes = [
            helper.make_node("MatMul", [INPUT, zero.name], [f"{prefix}z"]),
            helper.make_node("Add", [f"{prefix}z", const.name], [out]),
        ]
        return nodes, [zero, const], out
    sub = _booster_graph(head, n_features).graph
    rename = {t: f"{prefix}{t}" for n in sub.node for t in n.output}
    rename.update({i.name: f"{prefix}{i.name}" for i in sub.initializer})
    rename[sub.output[0].name] = out
    nodes = []
    for node in sub.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name}"
        copy.input[:] = [rename.get(t, t) for t in node.input]
        copy.output[:] = [rename.get(t, t) for t in node.output]
        nodes.append(copy)
    inits = []
    for init in sub.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename[init.name]
        inits.append(copy)
    return nodes, inits, out


def heads_to_onnx(heads: TrainedHeads, n_features: int) -> onnx.ModelProto:
    nodes: list = []
    inits: list = []
    outputs = {}
    for kind, column_heads in (("quality", heads.quality), ("output_tokens", heads.output_tokens)):
        columns = []
        for j, head in enumerate(column_heads):
            n, i, out = _column_nodes(head, n_features, f"{kind}_{j}_")
            nodes += n
            inits += i
            columns.append(out)
        nodes.append(helper.make_node("Concat", columns, [f"{kind}_raw"], axis=1))
        outputs[kind] = f"{kind}_raw"
    lo = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f")
    hi = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one_f")
    inits += [lo, hi]
    nodes.append(helper.make_node("Clip", ["quality_raw", "zero_f", "one_f"], ["quality"]))
    nodes.append(helper.make_node("Relu", ["output_tokens_raw"], ["output_tokens"]))
    m = len(heads.models)
    graph = helper.make_graph(
        nodes,
        "router_heads",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
        [
            helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["batch", m]),
            helper.make_tensor_value_info("output_tokens", TensorProto.FLOAT, ["batch", m]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="cost-aware-router",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
