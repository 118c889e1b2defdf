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
k_tokens nearest training prompts, per model. The heads average it with the LightGBM output-length
heads (training/pipeline.py): on validation carved from mmlu_pro's train split (5 carvings, mean
gap closed) the average reached 0.1196, the neighbours alone 0.1196, LightGBM alone 0.1174, and the
earlier LightGBM (lr 0.15, twice the trees) 0.1163 (docs/BENCHMARKS.md).

All of it is one torch module, exported to ONNX as one part of the heads graph; the training
embeddings and outcomes it consults are constants inside that graph.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from training.mlp_heads import MlpParams, QualityEnsemble


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


def _module(
    ensemble: QualityEnsemble,
    memory: np.ndarray,
    score: np.ndarray,
    tokens: np.ndarray,
    dim: int,
    params: BlendParams,
) -> Any:
    import torch

    memory, inverse = _distinct(memory)
    scores, observed = _pooled(inverse, len(memory), score)
    tokens_sum, has_tokens = _pooled(inverse, len(memory), tokens)
    k_kernel = min(params.k_kernel, len(memory))
    k_mean = min(params.k_mean, k_kernel)
    k_tokens = min(params.k_tokens, k_kernel)
    fallback = np.nanmean(score, axis=0)

    class Blend(torch.nn.Module):
        """forward = combine(features, *neighbours(features)); the ONNX export runs `combine` after
        its own, cheaper neighbour search (see `_int8_search`). Returns (quality, output tokens):
        the second is the mean billed output length of the k_tokens nearest training prompts.
        Each distinct training prompt is one entry, holding the sum and count of its outcomes."""

        memory: torch.Tensor
        scores: torch.Tensor
        observed: torch.Tensor
        fallback: torch.Tensor
        tokens: torch.Tensor
        has_tokens: torch.Tensor
        tokens_fallback: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.mlp = ensemble.module()
            self.register_buffer("memory", torch.tensor(memory.T.copy(), dtype=torch.float32))  # dim x n
            self.register_buffer("scores", torch.tensor(scores, dtype=torch.float32))
            self.register_buffer("observed", torch.tensor(observed, dtype=torch.float32))
            self.register_buffer("fallback", torch.tensor(fallback, dtype=torch.float32))
            self.register_buffer("tokens", torch.tensor(tokens_sum, dtype=torch.float32))
            self.register_buffer("has_tokens", torch.tensor(has_tokens, dtype=torch.float32))
            self.register_buffer("tokens_fallback", torch.tensor(_column_means(tokens), dtype=torch.float32))

        def neighbours(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Cosine similarity and index of the k_kernel nearest training prompts, most similar first."""
            sims, idx = torch.topk(features[:, :dim] @ self.memory, k_kernel, dim=1)
            return sims, idx

        def combine(
            self, features: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            near_idx = idx[:, :k_tokens]
            counted = self.has_tokens[near_idx].sum(1)
            total = self.tokens[near_idx].sum(1)
            out_tokens = torch.where(counted > 0, total / counted.clamp(min=1.0), self.tokens_fallback)
            mlp = self.mlp(features)
            got, seen = self.scores[idx], self.observed[idx]  # batch x k x models
            count = seen[:, :k_mean].sum(1)
            near = torch.where(count > 0, got[:, :k_mean].sum(1) / count.clamp(min=1.0), self.fallback)
            prior = 0.5 * (mlp + near)
            weight = torch.exp((sims - 1.0) / params.tau).unsqueeze(-1)
            numerator = (got * weight).sum(1) + params.alpha * prior
            denominator = (seen * weight).sum(1) + params.alpha
            return numerator / denominator, out_tokens

        def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.combine(features, *self.neighbours(features))

    return Blend().eval()


# The exported graph finds neighbours in two steps: int8 similarities over the whole memory pick
# CANDIDATE_FACTOR x k_kernel candidates, whose exact float similarities then choose and rank the
# k_kernel. The int8 memory is a quarter of the float one's size, and reading it is most of a lone
# prompt's head time (measured on the 29-model mmlu_pro bundle). Int8 errors are ~0.003 in cosine,
# far below the spread between a prompt's k-th and (1.25 k)-th neighbour, so the result is the exact
# search's but for rare near-ties, which the bundle's parity check allows for.
CANDIDATE_FACTOR = 1.25


def _int8_search(memory: np.ndarray, dim: int, k: int, sims: str, idx: str) -> tuple[list, list]:
    """Nodes and initialisers computing `sims`, `idx` (batch x k) from `features`."""
    from onnx import TensorProto, helper, numpy_helper

    n = len(memory)
    candidates = min(n, int(np.ceil(CANDIDATE_FACTOR * k)))
    scale = np.maximum(np.abs(memory).max(axis=1), 1e-12) / 127.0  # per training prompt
    quantised = np.clip(np.rint(memory / scale[:, None]), -127, 127).astype(np.int8)
    p = "search/"
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), p + "zero"),
        numpy_helper.from_array(np.array([dim], dtype=np.int64), p + "dim"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), p + "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), p + "axis2"),
        numpy_helper.from_array(quantised.T.copy(), p + "memory_int8"),  # dim x n
        numpy_helper.from_array(scale.astype(np.float32)[None, :], p + "scale"),
        numpy_helper.from_array(memory.astype(np.float32), p + "memory"),  # n x dim
        numpy_helper.from_array(np.array([candidates], dtype=np.int64), p + "candidates"),
        numpy_helper.from_array(np.array([k], dtype=np.int64), p + "k"),
    ]
    node = helper.make_node
    nodes = [
        node("Slice", ["features", p + "zero", p + "dim", p + "axis1"], [p + "query"]),
        node("DynamicQuantizeLinear", [p + "query"], [p + "q8", p + "q_scale", p + "q_zero"]),
        node("MatMulInteger", [p + "q8", p + "memory_int8", p + "q_zero"], [p + "dot_int"]),
        node("Cast", [p + "dot_int"], [p + "dot_raw"], to=TensorProto.FLOAT),
        node("Mul", [p + "dot_raw", p + "scale"], [p + "approx"]),
        node("TopK", [p + "approx", p + "candidates"], [p + "approx_top", p + "cand"], axis=1),
        node("Gather", [p + "memory", p + "cand"], [p + "cand_vec"], axis=0),  # batch x c x dim
        node("Unsqueeze", [p + "query", p + "axis2"], [p + "query_col"]),  # batch x dim x 1
        node("MatMul", [p + "cand_vec", p + "query_col"], [p + "exact_col"]),
        node("Squeeze", [p + "exact_col", p + "axis2"], [p + "exact"]),
        node("TopK", [p + "exact", p + "k"], [sims, p + "pos"], axis=1),
        node("GatherElements", [p + "cand", p + "pos"], [idx], axis=1),
    ]
    return nodes, inits


OUTPUTS = ("quality", "neighbour_output_tokens")


class QualityBlend:
    def __init__(self, module: Any, n_features: int, dim: int) -> None:
        """module: as `_module` builds it; use `fit`."""
        self.n_features = n_features
        self._dim = dim
        self._module = module

    @classmethod
    def fit(
        cls, features: np.ndarray, score: np.ndarray, tokens: np.ndarray, dim: int, params: BlendParams
    ) -> QualityBlend:
        """features: the training prompts' head features, the first `dim` the unit embedding;
        score and tokens: their observed scores and billed output tokens (NaN where unknown)."""
        ensemble = QualityEnsemble.fit(features, score, params.mlp)
        memory = features[:, :dim].astype(np.float32)
        return cls(_module(ensemble, memory, score, tokens, dim, params), ensemble.n_features, dim)

    def predict(self, features: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(quality, neighbour output tokens), each prompts x models."""
        import torch

        quality, tokens = [], []
        with torch.no_grad():
            for start in range(0, len(features), chunk):
                q, t = self._module(torch.tensor(features[start : start + chunk], dtype=torch.float32))
                quality.append(q.numpy().astype(float))
                tokens.append(t.numpy().astype(float))
        if not quality:
            return np.empty((0, 0)), np.empty((0, 0))
        return np.concatenate(quality), np.concatenate(tokens)

    def to_onnx(self) -> onnx.ModelProto:
        """One graph from `features` to OUTPUTS: the int8 neighbour search, then `combine`."""
        import torch

        module = self._module

        class Combine(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.blend = module

            def forward(
                self, features: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return self.blend.combine(features, sims, idx)

        example = torch.zeros((2, self.n_features), dtype=torch.float32)
        sims, idx = module.neighbours(example)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Combine().eval(),
                (example, sims, idx),
                buffer,  # type: ignore[arg-type]  # torch accepts a file-like object
                dynamo=False,
                input_names=["features", "sims", "idx"],
                output_names=list(OUTPUTS),
                dynamic_axes={name: {0: "batch"} for name in ("features", "sims", "idx", *OUTPUTS)},
                opset_version=17,
            )
        model = onnx.load_from_string(buffer.getvalue())
        graph = model.graph
        distinct_memory = module.memory.numpy().T.copy()  # n x dim; the module keeps it transposed
        nodes, inits = _int8_search(distinct_memory, self._dim, sims.shape[1], "sims", "idx")
        kept = [i for i in graph.input if i.name == "features"]
        del graph.input[:]
        graph.input.extend(kept)
        combined = [*nodes, *graph.node]
        del graph.node[:]
        graph.node.extend(combined)
        graph.initializer.extend(inits)
        # the memory only feeds the search now; drop torch's copy if the export kept it
        used = {t for n in graph.node for t in n.input}
        unused = [i for i in graph.initializer if i.name not in used]
        for i in unused:
            graph.initializer.remove(i)
        onnx.checker.check_model(model)
        return model
