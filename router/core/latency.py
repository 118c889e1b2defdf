"""Predicted latency: time to first token + predicted output tokens x time per output token.

Per-model ttft_ms and tpot_ms come from the routing table's models.csv (optional columns) or a
reprice; a model without them has no latency estimate (NaN), and so never meets a latency ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Latencies:
    """Per model, in the bundle's model order; NaN where unknown."""

    ttft_ms: np.ndarray
    tpot_ms: np.ndarray

    @classmethod
    def from_specs(cls, specs: list[tuple[float | None, float | None]]) -> Latencies:
        def column(i: int) -> np.ndarray:
            return np.array([np.nan if s[i] is None else s[i] for s in specs], dtype=float)

        return cls(column(0), column(1))

    @property
    def known(self) -> bool:
        """Whether any model has latency data (a latency ceiling is refused otherwise)."""
        return bool(np.any(~np.isnan(self.ttft_ms) & ~np.isnan(self.tpot_ms)))

    def latency_ms(self, output_tokens: np.ndarray) -> np.ndarray:
        """(prompts x models) from (prompts x models) predicted output tokens."""
        return self.ttft_ms[None, :] + np.asarray(output_tokens, dtype=float) * self.tpot_ms[None, :]
