"""The quality estimate: an MLP ensemble and a neighbour memory, blended.

- prior = mean of (the MLP ensemble's probabilities, the mean score of the k nearest training
  prompts). The two err differently: the MLP generalises across the embedding space, the
  neighbours keep local detail it smooths away.
- then a similarity kernel over the nearest training prompts pulls the prior towards the observed
  outcomes of near-duplicates: q = (sum_i w_i s_i + alpha * prior) / (sum_i w_i + alpha), with
  w_i = exp((cos_i - 1) / tau). With a small tau only prompts almost identical to a training one
  move; elsewhere q is the prior. Repeated and templated prompts are common in real traffic, and
  their past outcomes are the best evidence there is.

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
    tau: float = 0.02
    alpha: float = 1.0


def _module(
    ensemble: QualityEnsemble, memory: np.ndarray, score: np.ndarray, dim: int, params: BlendParams
) -> Any:
    import torch

    observed = ~np.isnan(score)
    k_kernel = min(params.k_kernel, len(memory))
    k_mean = min(params.k_mean, k_kernel)
    fallback = np.nanmean(score, axis=0)

    class Blend(torch.nn.Module):
        memory: torch.Tensor
        scores: torch.Tensor
        observed: torch.Tensor
        fallback: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.mlp = ensemble.module()
            self.register_buffer("memory", torch.tensor(memory.T.copy(), dtype=torch.float32))  # dim x n
            self.register_buffer("scores", torch.tensor(np.where(observed, score, 0.0), dtype=torch.float32))
            self.register_buffer("observed", torch.tensor(observed, dtype=torch.float32))
            self.register_buffer("fallback", torch.tensor(fallback, dtype=torch.float32))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            mlp = self.mlp(features)
            sims, idx = torch.topk(features[:, :dim] @ self.memory, k_kernel, dim=1)  # sorted
            got, seen = self.scores[idx], self.observed[idx]  # batch x k x models
            count = seen[:, :k_mean].sum(1)
            near = torch.where(
                count > 0, (got[:, :k_mean] * seen[:, :k_mean]).sum(1) / count.clamp(min=1.0), self.fallback
            )
            prior = 0.5 * (mlp + near)
            weight = torch.exp((sims - 1.0) / params.tau).unsqueeze(-1)
            numerator = (got * seen * weight).sum(1) + params.alpha * prior
            denominator = (seen * weight).sum(1) + params.alpha
            return numerator / denominator

    return Blend().eval()


class QualityBlend:
    def __init__(
        self, ensemble: QualityEnsemble, memory: np.ndarray, score: np.ndarray, dim: int, params: BlendParams
    ) -> None:
        self.n_features = ensemble.n_features
        self._module = _module(ensemble, memory, score, dim, params)

    @classmethod
    def fit(cls, features: np.ndarray, score: np.ndarray, dim: int, params: BlendParams) -> QualityBlend:
        """features: the training prompts' head features; the first `dim` are the unit embedding."""
        ensemble = QualityEnsemble.fit(features, score, params.mlp)
        return cls(ensemble, features[:, :dim].astype(np.float32), score, dim, params)

    def predict(self, features: np.ndarray, chunk: int = 1024) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(features), chunk):
                x = torch.tensor(features[start : start + chunk], dtype=torch.float32)
                out.append(self._module(x).numpy().astype(float))
        return np.concatenate(out) if out else np.empty((0, 0))

    def to_onnx(self) -> onnx.ModelProto:
        import torch

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self._module,
                (torch.zeros((2, self.n_features), dtype=torch.float32),),
                buffer,  # type: ignore[arg-type]  # torch accepts a file-like object
                dynamo=False,
                input_names=["features"],
                output_names=["quality"],
                dynamic_axes={"features": {0: "batch"}, "quality": {0: "batch"}},
                opset_version=17,
            )
        return onnx.load_from_string(buffer.getvalue())
