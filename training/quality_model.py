"""The quality estimate: an MLP ensemble and a neighbour memory, blended.

- prior = mean of (the MLP ensemble's probabilities, the mean score of the k nearest training
  prompts). The two err differently: the MLP generalises across the embedding space, the
  neighbours keep local detail it smooths away.
- then a similarity kernel over the nearest training prompts pulls the prior towards the observed
  outcomes of near-duplicates: q = (sum_i w_i s_i + alpha * prior) / (sum_i w_i + alpha), with
  w_i = exp((cos_i - 1) / tau). With a small tau only prompts almost identical to a training one
  move; elsewhere q is the prior. Repeated and templated prompts are common in real traffic, and
  their past outcomes are the best evidence there is.

The same neighbours also give an output-length estimate: the mean billed output tokens of the
k_tokens nearest training prompts, per model. The heads model (training/heads_model.py) averages
it with the LightGBM output-length heads; docs/BENCHMARKS.md has how that was chosen.

All of it is one torch module, exported to ONNX as one part of the heads graph; the training
embeddings and outcomes it consults are constants inside that graph.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from training.mlp_heads import MlpParams, QualityEnsemble
from training.onnx_graph import OPSET


@dataclass(frozen=True)
class BlendParams:
    mlp: MlpParams = field(
        default_factory=lambda: MlpParams(hidden=256, dropout=0.4, epochs=10, seeds=(0, 1, 2, 3, 4))
    )
    k_mean: int = 128
    k_kernel: int = 256
    k_tokens: int = 64
    tau: float = 0.02
    alpha: float = 1.0


def _column_means(values: np.ndarray) -> np.ndarray:
    """Per-model mean of the observed values; 0 for a model with none."""
    observed = ~np.isnan(values)
    return np.where(observed, values, 0.0).sum(0) / np.maximum(observed.sum(0), 1)


def _distinct(memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct memory rows, each original row's index among them).

    Tables repeat prompts (mmlu_pro: ~1% of train). As separate entries they tie exactly in
    similarity, and torch and ONNX Runtime break such ties differently; as one entry holding sums
    and counts (`_pooled`) they give the neighbour means and the kernel the same values, with no
    ties to break."""
    distinct, inverse = np.unique(memory, axis=0, return_inverse=True)
    return distinct, inverse.reshape(-1)


def _pooled(inverse: np.ndarray, n: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct row: the sum of its observed values and how many were observed."""
    observed = ~np.isnan(values)
    sums = np.zeros((n, values.shape[1]))
    counts = np.zeros((n, values.shape[1]))
    np.add.at(sums, inverse, np.where(observed, values, 0.0))
    np.add.at(counts, inverse, observed.astype(float))
    return sums, counts


class NeighbourBlend(torch.nn.Module):
    """forward = combine(features, *neighbours(features)); the ONNX export runs `combine` after its
    own, cheaper neighbour search (see `_search_graph`). Returns (quality, output tokens): the second
    is the mean billed output length of the k_tokens nearest training prompts. Each distinct
    training prompt is one entry of the memory, holding the sum and count of its outcomes."""

    memory: torch.Tensor
    scores: torch.Tensor
    observed: torch.Tensor
    fallback: torch.Tensor
    tokens: torch.Tensor
    has_tokens: torch.Tensor
    tokens_fallback: torch.Tensor
    ones_mean: torch.Tensor
    ones_tokens: torch.Tensor

    def __init__(
        self,
        ensemble: QualityEnsemble,
        memory: np.ndarray,
        score: np.ndarray,
        tokens: np.ndarray,
        dim: int,
        params: BlendParams,
    ) -> None:
        super().__init__()
        memory, inverse = _distinct(memory)
        scores, observed = _pooled(inverse, len(memory), score)
        tokens_sum, has_tokens = _pooled(inverse, len(memory), tokens)
        self.dim = dim
        self.k_kernel = min(params.k_kernel, len(memory))
        self.k_mean = min(params.k_mean, self.k_kernel)
        self.k_tokens = min(params.k_tokens, self.k_kernel)
        self.tau = params.tau
        self.alpha = params.alpha
        self.mlp = ensemble.module()
        self.register_buffer("memory", torch.tensor(memory.T.copy(), dtype=torch.float32))  # dim x n
        self.register_buffer("scores", torch.tensor(scores, dtype=torch.float32))
        self.register_buffer("observed", torch.tensor(observed, dtype=torch.float32))
        self.register_buffer("fallback", torch.tensor(np.nanmean(score, axis=0), dtype=torch.float32))
        self.register_buffer("tokens", torch.tensor(tokens_sum, dtype=torch.float32))
        self.register_buffer("has_tokens", torch.tensor(has_tokens, dtype=torch.float32))
        self.register_buffer("tokens_fallback", torch.tensor(_column_means(tokens), dtype=torch.float32))
        self.register_buffer("ones_mean", torch.ones((1, 1, self.k_mean)))
        self.register_buffer("ones_tokens", torch.ones((1, 1, self.k_tokens)))
        self.eval()

    def distinct_memory(self) -> np.ndarray:
        """The distinct training embeddings, n x dim."""
        return self.memory.numpy().T.copy()

    def neighbours(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity and index of the k_kernel nearest training prompts, most similar first."""
        sims, idx = torch.topk(features[:, : self.dim] @ self.memory, self.k_kernel, dim=1)
        return sims, idx

    def combine(
        self, features: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums over neighbours are (1 x k) @ (k x models) products, one per prompt, in
        batch x 1 x models shapes until the end: ONNX Runtime sums a middle axis by another path
        for a batch of one than for more, and a prompt's estimate must not depend on its batch;
        a batched product has the same shape per prompt whatever the batch size."""
        near_idx = idx[:, : self.k_tokens]
        counted = self.ones_tokens @ self.has_tokens[near_idx]  # batch x 1 x models
        total = self.ones_tokens @ self.tokens[near_idx]
        out_tokens = torch.where(counted > 0, total / counted.clamp(min=1.0), self.tokens_fallback)
        got, seen = self.scores[idx], self.observed[idx]  # batch x k x models
        count = self.ones_mean @ seen[:, : self.k_mean]
        near = torch.where(
            count > 0, (self.ones_mean @ got[:, : self.k_mean]) / count.clamp(min=1.0), self.fallback
        )
        prior = 0.5 * (self.mlp(features).unsqueeze(1) + near)
        weight = torch.exp((sims.unsqueeze(1) - 1.0) / self.tau)  # batch x 1 x k
        quality = (weight @ got + self.alpha * prior) / (weight @ seen + self.alpha)
        return quality.squeeze(1), out_tokens.squeeze(1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.combine(features, *self.neighbours(features))


class _Combine(torch.nn.Module):
    """`combine` alone, with the neighbours as inputs: the part of the blend torch exports."""

    def __init__(self, blend: NeighbourBlend) -> None:
        super().__init__()
        self.blend = blend

    def forward(
        self, features: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blend.combine(features, sims, idx)


# The exported graph finds neighbours in two steps: int8 similarities over the whole memory pick
# CANDIDATE_FACTOR x k_kernel candidates, whose exact float similarities then choose and rank the
# k_kernel. The int8 memory is a quarter of the float one's size, and reading it is most of a lone
# prompt's head time. Int8 errors are ~0.003 in cosine, far below the spread between a prompt's k-th
# and (1.25 k)-th neighbour, so the result is the exact search's but for rare near-ties, which the
# bundle's parity check allows for. Each query is quantised with a scale of its own row (never one
# for the whole batch), so a prompt's neighbours do not depend on the prompts beside it.
CANDIDATE_FACTOR = 1.25
SEARCH_OUTPUTS = ("sims", "idx", "features_out")


def _search_graph(memory: np.ndarray, n_features: int, dim: int, k: int) -> onnx.ModelProto:
    """features -> (sims, idx) of the k nearest rows of `memory` (n x dim), and features unchanged."""
    n = len(memory)
    candidates = min(n, int(np.ceil(CANDIDATE_FACTOR * k)))
    scale = np.maximum(np.abs(memory).max(axis=1), 1e-12) / 127.0  # per training prompt
    quantised = np.clip(np.rint(memory / scale[:, None]), -127, 127).astype(np.int8)
    constants = {
        "zero": np.array([0], dtype=np.int64),
        "dim": np.array([dim], dtype=np.int64),
        "axis1": np.array([1], dtype=np.int64),
        "axis2": np.array([2], dtype=np.int64),
        "eps": np.array(1e-12, dtype=np.float32),
        "q_max": np.array(127.0, dtype=np.float32),
        "q_min": np.array(-127.0, dtype=np.float32),
        "q_shift": np.array(128.0, dtype=np.float32),
        "q_zero": np.array(128, dtype=np.uint8),
        "memory_int8": quantised.T.copy(),  # dim x n
        "memory_scale": scale.astype(np.float32)[None, :],
        "memory": memory.astype(np.float32),  # n x dim
        "candidates": np.array([candidates], dtype=np.int64),
        "k": np.array([k], dtype=np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Slice", ["features", "zero", "dim", "axis1"], ["query"]),
        # symmetric int8 per row, stored as uint8 around 128 (the fast u8 x s8 integer product)
        node("Abs", ["query"], ["query_abs"]),
        node("ReduceMax", ["query_abs"], ["query_max"], axes=[1], keepdims=1),
        node("Max", ["query_max", "eps"], ["query_max_pos"]),
        node("Div", ["query_max_pos", "q_max"], ["query_scale"]),
        node("Div", ["query", "query_scale"], ["query_scaled"]),
        node("Round", ["query_scaled"], ["query_rounded"]),
        node("Clip", ["query_rounded", "q_min", "q_max"], ["query_clipped"]),
        node("Add", ["query_clipped", "q_shift"], ["query_shifted"]),
        node("Cast", ["query_shifted"], ["query_u8"], to=TensorProto.UINT8),
        node("MatMulInteger", ["query_u8", "memory_int8", "q_zero"], ["dot_int"]),
        node("Cast", ["dot_int"], ["dot_raw"], to=TensorProto.FLOAT),
        # the query's own scale is left out: it is positive and one per row, so ranks do not move
        node("Mul", ["dot_raw", "memory_scale"], ["approx"]),
        # candidates need no order among themselves (the exact ranking below gives it)
        node("TopK", ["approx", "candidates"], ["approx_top", "cand"], axis=1, sorted=0),
        node("Gather", ["memory", "cand"], ["cand_vec"], axis=0),  # batch x c x dim
        node("Unsqueeze", ["query", "axis2"], ["query_col"]),  # batch x dim x 1
        node("MatMul", ["cand_vec", "query_col"], ["exact_col"]),
        node("Squeeze", ["exact_col", "axis2"], ["exact"]),
        node("TopK", ["exact", "k"], ["sims", "pos"], axis=1),
        node("GatherElements", ["cand", "pos"], ["idx"], axis=1),
        node("Identity", ["features"], ["features_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "neighbour_search",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_features])],
        [
            helper.make_tensor_value_info("sims", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", k]),
            helper.make_tensor_value_info("features_out", TensorProto.FLOAT, ["batch", n_features]),
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


OUTPUTS = ("quality", "neighbour_output_tokens")


class QualityBlend:
    """The fitted blend: its own prediction (torch) and its ONNX export, a tested pair."""

    def __init__(self, module: NeighbourBlend, n_features: int) -> None:
        self.n_features = n_features
        self.module = module

    @classmethod
    def fit(
        cls, features: np.ndarray, score: np.ndarray, tokens: np.ndarray, dim: int, params: BlendParams
    ) -> QualityBlend:
        """features: the training prompts' head features, the first `dim` the unit embedding;
        score and tokens: their observed scores and billed output tokens (NaN where unknown)."""
        ensemble = QualityEnsemble.fit(features, score, params.mlp)
        memory = features[:, :dim].astype(np.float32)
        return cls(NeighbourBlend(ensemble, memory, score, tokens, dim, params), ensemble.n_features)

    def predict(self, features: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(quality, neighbour output tokens), each prompts x models."""
        quality, tokens = [], []
        with torch.no_grad():
            for start in range(0, len(features), chunk):
                q, t = self.module(torch.tensor(features[start : start + chunk], dtype=torch.float32))
                quality.append(q.numpy().astype(float))
                tokens.append(t.numpy().astype(float))
        if not quality:
            return np.empty((0, 0)), np.empty((0, 0))
        return np.concatenate(quality), np.concatenate(tokens)

    def to_onnx(self) -> onnx.ModelProto:
        """One graph from `features` to OUTPUTS: the int8 neighbour search, then `combine`."""
        example = torch.zeros((2, self.n_features), dtype=torch.float32)
        sims, idx = self.module.neighbours(example)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Combine(self.module).eval(),
                (example, sims, idx),
                buffer,  # type: ignore[arg-type]  # torch accepts a file-like object
                dynamo=False,
                input_names=["features", "sims", "idx"],
                output_names=list(OUTPUTS),
                dynamic_axes={name: {0: "batch"} for name in ("features", "sims", "idx", *OUTPUTS)},
                opset_version=OPSET,
            )
        combine = onnx.load_from_string(buffer.getvalue())
        search = _search_graph(
            self.module.distinct_memory(), self.n_features, self.module.dim, int(sims.shape[1])
        )
        search.ir_version = combine.ir_version
        search = onnx.compose.add_prefix(search, "search/", rename_inputs=False, rename_outputs=False)
        model = onnx.compose.merge_models(
            search, combine, io_map=[("sims", "sims"), ("idx", "idx"), ("features_out", "features")]
        )
        onnx.checker.check_model(model)
        return model
