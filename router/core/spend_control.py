"""Holding a tenant's spend near a target by steering its cost weight w.

A multiplicative integral controller: every decision's predicted cost updates a moving average of
the tenant's spend per call (SMOOTHING), and log w moves by GAIN times that average's relative
error against the target, so that w rises while the tenant spends above its target and falls while
it spends below it. The average is a linear filter, so the errors it feeds in average to the raw
ones and the mean spend converges to the target itself (clipping each call's error instead, to
tame long prompts, would bias it: costs have a long right tail); it only keeps one long prompt
from throwing w. Integral action holds the target whatever the traffic mix and follows it as the
mix shifts; working on log w fits the policy, whose useful range of w spans five orders of
magnitude.

Predicted costs are corrected by the costs callers report (outcome feedback on the chosen model,
with `cost_usd`), so that the controller steers by the bill rather than the estimate. Two ways at
once: a reported decision's difference from what the average took in for it goes into the average
(late, but the filter's errors sum to the same whatever the delay, so the mean spend it drives to
the target is the billed one); and every prediction is scaled by the ratio of reported to
predicted cost over the decisions reported (exponentially weighted, CORRECTION_SMOOTHING per
report), which corrects the decisions nobody reports and those not reported yet. The ratio
follows the mix, since estimates are off by different amounts for different kinds of prompt; it
starts at 1 and stays there without feedback. State (`ControllerState`, what a restart resumes
from): w, the moving average and the two sums; a changed target is followed from that state.

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
CORRECTION_SMOOTHING = 0.02
RATIO_RANGE = (0.1, 10.0)  # a few odd reports must not make w run away
MAX_ERROR = 10.0  # one step of log w moves at most GAIN * this: a wild report cannot overflow w


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


@dataclass(frozen=True)
class ControllerState:
    cost_weight: float
    average_usd: float | None
    reported_usd: float
    predicted_usd: float


@dataclass
class SpendController:
    target_usd_per_call: float
    cost_weight: float
    gain: float = GAIN
    smoothing: float = SMOOTHING
    average_usd: float | None = None  # the moving average of spend per call; starts at the target
    reported_usd: float = 0.0  # exponentially weighted sums over the decisions with a reported cost
    predicted_usd: float = 0.0

    @classmethod
    def resume(cls, target_usd_per_call: float, state: ControllerState) -> SpendController:
        return cls(
            target_usd_per_call,
            min(max(state.cost_weight, W_MIN), W_MAX),
            average_usd=state.average_usd,
            reported_usd=state.reported_usd,
            predicted_usd=state.predicted_usd,
        )

    @property
    def state(self) -> ControllerState:
        return ControllerState(self.cost_weight, self.average_usd, self.reported_usd, self.predicted_usd)

    @property
    def correction(self) -> float:
        """Reported over predicted cost, over the decisions reported (1 without any)."""
        if self.predicted_usd <= 0.0:
            return 1.0
        return min(max(self.reported_usd / self.predicted_usd, RATIO_RANGE[0]), RATIO_RANGE[1])

    def report(self, predicted_usd: float, reported_usd: float) -> None:
        """A caller's reported cost for one decision this controller steered; taken as at most
        RATIO_RANGE off its prediction, so that one report in the wrong unit cannot outweigh the rest.
        A decision predicted to cost nothing (a model priced at 0) gives that range no scale, so its
        report is left out: taken whole, one report could push the state past any float."""
        if not predicted_usd > 0.0:
            return
        low, high = RATIO_RANGE
        reported_usd = min(max(reported_usd, low * predicted_usd), high * predicted_usd)
        if self.average_usd is not None:
            self.average_usd += self.smoothing * (reported_usd - predicted_usd * self.correction)
        keep = 1.0 - CORRECTION_SMOOTHING
        self.reported_usd = keep * self.reported_usd + reported_usd
        self.predicted_usd = keep * self.predicted_usd + predicted_usd

    def observe(self, cost_usd: float) -> None:
        """One decision's predicted cost."""
        average = self.target_usd_per_call if self.average_usd is None else self.average_usd
        self.average_usd = average + self.smoothing * (cost_usd * self.correction - average)
        error = min(self.average_usd / self.target_usd_per_call - 1.0, MAX_ERROR)
        w = math.exp(math.log(max(self.cost_weight, W_MIN)) + self.gain * error)
        self.cost_weight = min(max(w, W_MIN), W_MAX)
