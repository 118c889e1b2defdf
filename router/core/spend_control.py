"""Holding a tenant's spend near a target by steering its cost weight w.

A multiplicative integral controller: after every decision, log w moves by GAIN times the relative
error of that decision's predicted cost against the target per call (clipped, so that one long
prompt cannot throw it), so that w rises while the tenant spends above its target and falls while
it spends below it. Its state is w alone. Integral action makes the mean spend converge to the
target whatever the traffic mix, and keeps tracking it as the mix shifts; working on log w fits the
policy, whose useful range of w spans five orders of magnitude.

It starts from the bundle's calibrated spend curve (`PolicySpec.spend_curve`: mean predicted cost
per call against w, measured on validation), read off at the target, or from the bundle's default
w where the bundle has no curve. The gain was chosen on `train` prompts ordered by category
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

W_MIN = 1e-6
W_MAX = 1.0
GAIN = 0.02
ERROR_CLIP = 2.0


def initial_cost_weight(
    curve: Sequence[tuple[float, float]], target_usd_per_call: float, default: float
) -> float:
    """The w at which the calibrated curve spends the target per call (log-log interpolation)."""
    points = sorted((w, c) for w, c in curve if w > 0 and c > 0)
    if len(points) < 2:
        return min(max(default, W_MIN), W_MAX)
    log_w = np.log([w for w, _ in points])
    log_c = np.log([c for _, c in points])
    order = np.argsort(log_c)  # spend falls as w rises; np.interp needs increasing x
    w = float(np.exp(np.interp(math.log(target_usd_per_call), log_c[order], log_w[order])))
    return min(max(w, W_MIN), W_MAX)


@dataclass
class SpendController:
    target_usd_per_call: float
    cost_weight: float
    gain: float = GAIN

    def observe(self, cost_usd: float) -> None:
        """One decision's predicted cost."""
        error = min(max(cost_usd / self.target_usd_per_call - 1.0, -1.0), ERROR_CLIP)
        w = math.exp(math.log(max(self.cost_weight, W_MIN)) + self.gain * error)
        self.cost_weight = min(max(w, W_MIN), W_MAX)
