"""The engine: texts and preferences in, per-model estimates and decisions out. Synchronous.

The one path from text to decision. The service's batch worker, `router route --bundle`,
`router predict`, `router eval`, `router bench` and the trainer's validation all run it, so a
figure in a report is what the service would have decided for the same prompt.

Every stage computes each prompt from that prompt alone (the embedder encodes prompts one at a
time; the heads graph and the policy work row by row), so a prompt's estimates and decision do not
depend on which other prompts share its batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.core.bundle import Bundle, load_bundle
from router.core.embedder import Embedder
from router.core.errors import BundleError, InvalidRequest
from router.core.features import PromptFeatures, featurize
from router.core.heads import Heads
from router.core.latency import Latencies
from router.core.manifest import PolicySpec
from router.core.online import OnlineMemory
from router.core.policy import Decision, Estimate, Preferences, decide
from router.core.pricing import Prices, TokenEstimator

SELF_CHECK_PROMPT = "Which model should answer this question?"


@dataclass(frozen=True)
class Estimates:
    """Rows are prompts, columns the models."""

    models: tuple[str, ...]
    quality: np.ndarray
    cost_usd: np.ndarray
    input_tokens: np.ndarray  # per prompt
    output_tokens: np.ndarray
    latency_ms: np.ndarray  # NaN where a model has no latency data

    def candidates(self, row: int) -> list[Estimate]:
        latencies = [None if math.isnan(x) else x for x in self.latency_ms[row].tolist()]
        return [
            Estimate(model, q, c, lat)
            for model, q, c, lat in zip(
                self.models, self.quality[row].tolist(), self.cost_usd[row].tolist(), latencies, strict=True
            )
        ]


@dataclass(frozen=True)
class Estimated:
    """A batch of prompts' estimates, the features they came from, and where the time went (seconds)."""

    estimates: Estimates
    features: PromptFeatures
    embed_s: float
    heads_s: float


@dataclass(frozen=True)
class Routed:
    """Decisions for a batch of prompts, with their estimates."""

    decisions: list[Decision]
    estimates: Estimates


class Engine:
    def __init__(
        self,
        embedder: Embedder,
        heads: Heads,
        prices: Prices,
        token_estimator: TokenEstimator,
        policy: PolicySpec,
        version: str,
        latencies: Latencies | None = None,
    ) -> None:
        if heads.n_models != len(prices.models):
            raise ValueError(f"heads predict {heads.n_models} models, prices cover {len(prices.models)}")
        self.embedder = embedder
        self.heads = heads
        self.prices = prices
        self.token_estimator = token_estimator
        self.policy = policy
        self.version = version
        n = len(prices.models)
        self.latencies = latencies or Latencies(np.full(n, np.nan), np.full(n, np.nan))
        # Outcome feedback learnt online (router/core/online.py); the service shares one memory
        # between the bundles it swaps in.
        self.online: OnlineMemory | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Engine:
        m = bundle.manifest
        return cls(
            bundle.embedder,
            bundle.heads,
            bundle.prices,
            bundle.token_estimator,
            m.policy,
            m.bundle_version,
            bundle.latencies,
        )

    @property
    def models(self) -> tuple[str, ...]:
        return self.prices.models

    # -- estimates -------------------------------------------------------------------------

    def featurize(self, texts: Sequence[str]) -> PromptFeatures:
        tokens = self.embedder.tokenize(texts)
        return featurize(texts, tokens, self.embedder.embed_tokenized(tokens), self.embedder.max_tokens)

    def estimate_features(self, features: PromptFeatures) -> Estimates:
        quality, out_tokens = self.heads.run(features.features)
        if self.online is not None:  # an empty memory returns the estimates as they are
            quality, out_tokens = self.online.adjust(features.features, self.models, quality, out_tokens)
        in_tokens = self.token_estimator.estimate(features.word_pieces, features.chars)
        return Estimates(
            self.models,
            quality,
            self.prices.cost_usd(in_tokens, out_tokens),
            in_tokens,
            out_tokens,
            self.latencies.latency_ms(out_tokens),
        )

    def estimate(self, texts: Sequence[str]) -> Estimates:
        return self.estimate_features(self.featurize(texts))

    # -- decisions -------------------------------------------------------------------------

    def preferences(
        self,
        *,
        cost_weight: float | None = None,
        preset: str = "",
        allowed_models: Sequence[str] = (),
        max_cost_usd: float | None = None,
        max_latency_ms: float | None = None,
    ) -> Preferences:
        """The caller's wishes as policy preferences, or InvalidRequest naming the wrong field."""
        presets = self.policy.presets
        if preset and cost_weight is not None:
            raise InvalidRequest("preset", "give either cost_weight or preset, not both")
        if preset:
            if preset not in presets:
                raise InvalidRequest(
                    "preset", f"unknown preset {preset[:64]!r}; known: {', '.join(sorted(presets))}"
                )
            w = presets[preset].cost_weight
        elif cost_weight is not None:
            w = cost_weight
            if not math.isfinite(w) or not 0.0 <= w <= 1.0:
                raise InvalidRequest("cost_weight", f"must be a number in [0, 1], got {w}")
        else:
            w = self.policy.default_cost_weight
        allowed = None
        if allowed_models:
            if len(set(allowed_models)) != len(allowed_models):
                raise InvalidRequest("allowed_models", "lists a model more than once")
            known = set(self.models)
            unknown = [m for m in allowed_models if m not in known]
            if unknown:
                raise InvalidRequest("allowed_models", f"unknown model {unknown[0][:128]!r} (see ListModels)")
            allowed = frozenset(allowed_models)
        if max_cost_usd is not None and (not math.isfinite(max_cost_usd) or max_cost_usd < 0):
            raise InvalidRequest("max_cost_usd", f"must be a non-negative number, got {max_cost_usd}")
        if max_latency_ms is not None:
            if not math.isfinite(max_latency_ms) or max_latency_ms < 0:
                raise InvalidRequest("max_latency_ms", f"must be a non-negative number, got {max_latency_ms}")
            if not self.latencies.known:
                raise InvalidRequest(
                    "max_latency_ms",
                    f"bundle {self.version} has no latency data (ttft_ms and tpot_ms in models.csv, "
                    "or router reprice)",
                )
        return Preferences(
            cost_weight=w, allowed_models=allowed, max_cost_usd=max_cost_usd, max_latency_ms=max_latency_ms
        )

    def decide(self, estimates: Estimates, preferences: Sequence[Preferences]) -> list[Decision]:
        """One decision per row of `estimates`, each under its own preferences."""
        c_ref = self.policy.c_ref_usd
        return [decide(estimates.candidates(row), p, c_ref) for row, p in enumerate(preferences)]

    def decide_row(self, estimates: Estimates, row: int, preferences: Preferences) -> Decision:
        """One prompt's decision (the service decides row by row: budgeted tenants through their ledger)."""
        return decide(estimates.candidates(row), preferences, self.policy.c_ref_usd)

    def estimate_timed(self, texts: Sequence[str]) -> Estimated:
        started = time.perf_counter()
        features = self.featurize(texts)
        embedded = time.perf_counter()
        estimates = self.estimate_features(features)
        return Estimated(
            estimates, features, embed_s=embedded - started, heads_s=time.perf_counter() - embedded
        )

    def route(self, texts: Sequence[str], preferences: Sequence[Preferences]) -> Routed:
        estimates = self.estimate(texts)
        return Routed(self.decide(estimates, preferences), estimates)

    def self_check(self) -> None:
        """One prompt end to end: a graph that loads but computes garbage is refused here."""
        est = self.estimate([SELF_CHECK_PROMPT])
        values = [*est.quality.ravel(), *est.cost_usd.ravel()]
        if not all(math.isfinite(float(v)) for v in values):
            raise BundleError("heads produce non-finite estimates on a test prompt")


def open_engine(path: Path | str, *, provider: str = "auto", threads: int = 0) -> tuple[Bundle, Engine]:
    """Loads, verifies and self-checks a bundle: the one way a bundle directory is opened."""
    bundle = load_bundle(path, provider=provider, threads=threads)
    engine = Engine.from_bundle(bundle)
    engine.self_check()
    return bundle, engine
