"""A multi-output MLP quality head: one small network predicts every model's expected score.

Sharing one hidden layer across models lets rare models borrow strength from common ones, which
per-model boosters on a 384-d embedding cannot (they landed below the kNN reference on validation).
Trained with binary cross-entropy on the observed scores (unobserved pairs masked out), so its
outputs are calibrated probabilities; the averaged members go into the quality blend's ONNX export
(training/quality_model.py) with the sigmoid inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch


@dataclass(frozen=True)
class MlpParams:
    hidden: int = 256
    dropout: float = 0.4
    epochs: int = 10
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)


def build_net(n_in: int, n_models: int, hidden: int, dropout: float) -> torch.nn.Sequential:
    nn = torch.nn
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_models))


def fit_quality_mlp(x: np.ndarray, score: np.ndarray, params: MlpParams, seed: int) -> torch.nn.Sequential:
    """One network on (prompts x features) -> logits (prompts x models), masked BCE."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n, m = score.shape
    net = build_net(x.shape[1], m, params.hidden, params.dropout)
    observed = ~np.isnan(score)
    with torch.no_grad():  # start from each model's base rate: early epochs learn differences
        p = np.clip(np.nanmean(score, axis=0), 1e-3, 1 - 1e-3)
        cast(torch.nn.Linear, net[-1]).bias.copy_(torch.tensor(np.log(p / (1 - p)), dtype=torch.float32))
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(np.where(observed, score, 0.0), dtype=torch.float32)
    mt = torch.tensor(observed, dtype=torch.float32)
    optimiser = torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    steps = params.epochs * ((n + params.batch_size - 1) // params.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        # at least two warm-up steps: a small table (one batch per epoch) would otherwise get a
        # warm-up phase of zero length, which OneCycleLR cannot schedule
        optimiser,
        max_lr=params.learning_rate,
        total_steps=steps,
        pct_start=max(0.1, 2.0 / steps),
    )
    for _ in range(params.epochs):
        net.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, params.batch_size):
            idx = order[start : start + params.batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(xt[idx]), yt[idx], reduction="none"
            )
            loss = (loss * mt[idx]).sum() / mt[idx].sum().clamp(min=1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    net.eval()
    return net


class QualityEnsemble:
    """Several seeds of the MLP, averaged in probability space."""

    def __init__(self, nets: Sequence[torch.nn.Module], n_features: int) -> None:
        self.nets = list(nets)
        self.n_features = n_features

    @classmethod
    def fit(cls, x: np.ndarray, score: np.ndarray, params: MlpParams) -> QualityEnsemble:
        return cls([fit_quality_mlp(x, score, params, seed) for seed in params.seeds], x.shape[1])

    def module(self) -> AveragedMembers:
        return AveragedMembers(self.nets)


class AveragedMembers(torch.nn.Module):
    """The members as one wide network: two matrix products per batch instead of two per member,
    which is what a lone prompt's latency pays for (each operator call has a fixed cost).
    forward = the mean of the members' sigmoid outputs.

    Both layers are plain 2-D matrix products (the output layer block-diagonal) and the members are
    added one by one: ONNX Runtime computes a batched product or a reduction over a leading axis by
    another path for a batch of one than for more, and a prompt's estimate must not depend on its
    batch."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        # build_net's layers: Linear, GELU, Dropout, Linear
        first = [cast(torch.nn.Linear, member.get_submodule("0")) for member in members]
        last = [cast(torch.nn.Linear, member.get_submodule("3")) for member in members]
        self.k, self.models = len(first), last[0].out_features
        self.hidden = torch.nn.Linear(first[0].in_features, sum(f.out_features for f in first))
        self.out = torch.nn.Linear(self.hidden.out_features, self.k * self.models)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.cat([f.weight for f in first]))
            self.hidden.bias.copy_(torch.cat([f.bias for f in first]))
            # member i's output layer reads member i's slice of the hidden units only
            self.out.weight.copy_(torch.block_diag(*[o.weight for o in last]))
            self.out.bias.copy_(torch.cat([o.bias for o in last]))
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(self.out(torch.nn.functional.gelu(self.hidden(features))))
        total = probs[:, : self.models]
        for member in range(1, self.k):
            total = total + probs[:, member * self.models : (member + 1) * self.models]
        return total / self.k
