"""Holding a tenant's spend near a target by steering its cost weight w.

A multiplicative integral controller: every decision's predicted cost updates a moving average of
the tenant's spend per call (SMOOTHING), and log w moves by GAIN times that average's relative
error against the target, so that w rises while the tenant spends above its target and falls while
it spends below it. The average is a linear filter, so the errors it feeds in average to the raw
ones and the mean spend converges to the target itself (clipping each call's error instead, to
tame long prompts, would bias it: costs have a long right tail); it only keeps one long prompt
from throwing w. Integral action holds the target whatever the traffic mix and follows it as the
mix shifts; working on log w fits the policy, whose useful range of w spans five orders of
magnitude. State: w and the moving average.

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
GAIN = 0.16
SMOOTHING = 0.1


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
    smoothing: float = SMOOTHING
    average_usd: float | None = None  # the moving average of spend per call; starts at the target

    def observe(self, cost_usd: float) -> None:
        """One decision's predicted cost."""
        average = self.target_usd_per_call if self.average_usd is None else self.average_usd
        self.average_usd = average + self.smoothing * (cost_usd - average)
        error = self.average_usd / self.target_usd_per_call - 1.0
        w = math.exp(math.log(max(self.cost_weight, W_MIN)) + self.gain * error)
        self.cost_weight = min(max(w, W_MIN), W_MAX)
