"""Assembling ONNX graphs from parts with `onnx.compose`, so that a batch needs one session call.

A part is an ONNX model whose one input is `features` (batch x F, float32) and whose outputs are
(batch x models) tensors: the quality blend exported by torch, the LightGBM boosters as one tree
ensemble. `fan_out` feeds `features` to several parts at once; `assemble` turns their outputs
into the heads graph's two outputs, each a weighted sum of part outputs:

    quality = clip(sum of weight x part output, 0, 1),  output_tokens = relu(sum of the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "features"
OPSET = 17
ML_OPSET = 1
# Every part is brought to these before merging (onnx.compose merges only equal versions).
IR_VERSION = 8

# (part name, which of its outputs, weight): one term of a weighted sum of (batch x models) tensors
Term = tuple[str, str, float]


def model_of(graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` as a model at this module's IR version and opsets."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="cost-aware-router",
    )
    model.ir_version = IR_VERSION
    return model


def _normalised(part: onnx.ModelProto) -> onnx.ModelProto:
    """`part` at this module's IR version, importing both opsets (onnx.compose merges only models
    whose versions agree). A part written for another default-domain opset is refused."""
    versions = {o.domain or "ai.onnx": o.version for o in part.opset_import}
    if versions.get("ai.onnx", OPSET) != OPSET:
        raise ValueError(f"part uses opset {versions['ai.onnx']}, the heads graph {OPSET}")
    copy = onnx.ModelProto()
    copy.CopyFrom(part)
    copy.ir_version = IR_VERSION
    del copy.opset_import[:]
    copy.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)])
    onnx.checker.check_model(copy)
    return copy


def fan_out(n_features: int, parts: Mapping[str, onnx.ModelProto]) -> onnx.ModelProto:
    """One model: `features` in, every part's outputs out, named `<part>/<output>`."""
    splitter = model_of(
        helper.make_graph(
            [helper.make_node("Identity", [INPUT], [f"{name}/{INPUT}"]) for name in parts],
            "fan_out",
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
            [
                helper.make_tensor_value_info(f"{name}/{INPUT}", TensorProto.FLOAT, ["batch", n_features])
                for name in parts
            ],
        )
    )
    merged = splitter
    for name, part in parts.items():
        (source,) = [
            i.name for i in part.graph.input if i.name not in {t.name for t in part.graph.initializer}
        ]
        if source != INPUT:
            raise ValueError(f"part {name!r} reads {source!r}, not {INPUT!r}")
        prefixed = onnx.compose.add_prefix(_normalised(part), f"{name}/")
        merged = onnx.compose.merge_models(merged, prefixed, io_map=[(f"{name}/{INPUT}", f"{name}/{INPUT}")])
    return merged


def assemble(
    n_features: int,
    n_models: int,
    parts: Mapping[str, onnx.ModelProto],
    quality: Sequence[Term],
    output_tokens: Sequence[Term],
) -> onnx.ModelProto:
    """The heads graph: `features` -> `quality` and `output_tokens`, each a weighted sum of terms."""
    sources = sorted({f"{part}/{out}" for part, out, _ in (*quality, *output_tokens)})
    for source in sources:
        part, out = source.split("/", 1)
        if part not in parts or out not in {o.name for o in parts[part].graph.output}:
            raise ValueError(f"no part output {source!r}")
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]

    def weighted_sum(terms: Sequence[Term], out: str) -> None:
        summands = []
        for k, (part, name, weight) in enumerate(terms):
            inits.append(numpy_helper.from_array(np.array(weight, dtype=np.float32), f"{out}_w{k}"))
            nodes.append(helper.make_node("Mul", [f"{part}/{name}", f"{out}_w{k}"], [f"{out}_t{k}"]))
            summands.append(f"{out}_t{k}")
        nodes.append(helper.make_node("Sum", summands, [out]))

    weighted_sum(quality, "quality_raw")
    weighted_sum(output_tokens, "output_tokens_raw")
    nodes.append(helper.make_node("Clip", ["quality_raw", "zero", "one"], ["quality"]))
    nodes.append(helper.make_node("Relu", ["output_tokens_raw"], ["output_tokens"]))
    combiner = model_of(
        helper.make_graph(
            nodes,
            "combine",
            [helper.make_tensor_value_info(s, TensorProto.FLOAT, ["batch", n_models]) for s in sources],
            [
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n_models])
                for name in ("quality", "output_tokens")
            ],
            initializer=inits,
        )
    )
    model = onnx.compose.merge_models(
        fan_out(n_features, parts),
        combiner,
        io_map=[(s, s) for s in sources],
        outputs=["quality", "output_tokens"],
    )
    onnx.checker.check_model(model)
    return model


# A column edit reads the heads graph's two outputs under these names and writes new ones.
EDIT_INPUTS = ("quality_in", "output_tokens_in")
HEADS_OUTPUTS = ("quality", "output_tokens")


def batch_tensors(names: Sequence[str], width: int) -> list[onnx.ValueInfoProto]:
    """Float (batch x width) graph inputs or outputs of these names."""
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]) for name in names]


def select_columns(n_models: int, keep: Sequence[int]) -> onnx.ModelProto:
    """The edit part that keeps the model columns `keep`, in that order."""
    nodes = [
        helper.make_node("Gather", [source, "keep"], [target], axis=1)
        for source, target in zip(EDIT_INPUTS, HEADS_OUTPUTS, strict=True)
    ]
    graph = helper.make_graph(
        nodes,
        "select_columns",
        batch_tensors(EDIT_INPUTS, n_models),
        batch_tensors(HEADS_OUTPUTS, len(keep)),
        initializer=[numpy_helper.from_array(np.asarray(keep, dtype=np.int64), "keep")],
    )
    return model_of(graph)


def chain(base: onnx.ModelProto, edit: onnx.ModelProto, tag: str) -> onnx.ModelProto:
    """The heads graph `base` followed by a column edit: `features` in, the edited outputs out.

    Everything of `base` but its input is renamed under `tag/`, so that edits can be stacked; the
    base's nodes are untouched, so the columns an edit passes through keep their values."""
    inner = onnx.compose.add_prefix(_normalised(base), f"{tag}/", rename_inputs=False)
    model = onnx.compose.merge_models(
        inner,
        _normalised(edit),
        io_map=[(f"{tag}/{out}", name) for out, name in zip(HEADS_OUTPUTS, EDIT_INPUTS, strict=True)],
        outputs=list(HEADS_OUTPUTS),
    )
    onnx.checker.check_model(model)
    return model
