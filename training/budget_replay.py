"""Replay: can a spend target hold while the traffic mix shifts? (a benchmark, through the gRPC API)

    python -m training.budget_replay --bundle bundles/mmlu_pro --data ../shared/data/mmlu_pro

The table's test prompts (those every model answered), ordered by category so that the mix shifts
during the run, are sent one at a time to a `router serve` started with a budgets file that gives
one tenant a spend target: 30% of the most accurate single model's mean cost on these prompts.
Reported, from the first TRANSIENT calls on, over every window of WINDOW consecutive calls and over
the whole run: the tenant's spend per call against the target, both as the router accounts it (the
predicted cost of each decision: what the controller and the caps see) and as the table bills it
(the recorded cost of the chosen model). Twice: without outcome feedback (the controller steers by
predictions alone), and with the table's outcome of the chosen model (score, tokens, cost) sent
back with Feedback after every call, as a team that reports its bills would, so that the controller
steers by reported cost. Beside them, the same prompts at the bundle's fixed `cost-30` preset
(calibrated offline for that share), and a reference no controller can be: each category routed at
the one w at which it bills the target, known in advance (what holding the target in every window
costs in quality when the mix is known, not learnt). Quality: the mean score reached, against the
router's offline cost/quality curve on the same prompts at the realised spend.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

from router.core.engine import open_engine
from router.core.errors import BundleError
from router.core.policy import choose
from router.v1 import router_pb2, router_pb2_grpc
from training.bench import serving
from training.errors import TableError
from training.metrics import hull, sweep
from training.tables import complete_rows, load_table

TRANSIENT = 200
WINDOW = 500
TENANT = "replay"
# Fewer complete test prompts than this make no replay worth reporting.
MIN_CALLS = 30


class ReplayError(ValueError):
    """The table or bundle cannot be replayed (said in one line)."""


def _windows(values: np.ndarray, target: float) -> dict[str, float]:
    """Spend against the target over the whole run and over every window of WINDOW calls after the
    first TRANSIENT; a run too short for those takes its first third as the transient and the rest
    as one window (the sizes used are in the result)."""
    transient = min(TRANSIENT, len(values) // 3)
    window = min(WINDOW, len(values) - transient)
    sliding = np.convolve(values[transient:], np.ones(window) / window, mode="valid")
    return {
        "whole_run_over_target": float(values.mean() / target),
        "worst_window_over_target": float(sliding[np.argmax(np.abs(sliding / target - 1))] / target),
        "windows_within_10pct": float(np.mean(np.abs(sliding / target - 1) <= 0.10)),
        "transient_calls": transient,
        "window_calls": window,
    }


def _categories(prompts: pd.DataFrame) -> np.ndarray:
    """Each prompt's category (`source`; a table without one is a single category)."""
    if "source" not in prompts.columns:
        return np.full(len(prompts), "", dtype=object)
    return prompts["source"].fillna("").astype(str).to_numpy()


@dataclass(frozen=True)
class Calls:
    """The prompts of the replay, in order, and the table's outcome of every model on each."""

    texts: list[str]
    models: list[str]
    score: np.ndarray  # prompts x models
    cost: np.ndarray
    output_tokens: np.ndarray


def _per_category_w(
    est_q: np.ndarray,
    est_c: np.ndarray,
    cost: np.ndarray,
    score: np.ndarray,
    categories: np.ndarray,
    target: float,
    c_ref: float,
) -> np.ndarray:
    """The model chosen for each call when every category is routed at the w of the grid whose
    billed spend on that category is nearest the target."""
    chosen = np.empty(len(cost), dtype=int)
    for category in dict.fromkeys(categories.tolist()):
        rows = np.flatnonzero(categories == category)
        grid, spend, _ = sweep(est_q[rows], est_c[rows], score[rows], cost[rows], c_ref)
        w = float(grid[np.argmin(np.abs(spend / target - 1.0))])
        chosen[rows] = choose(est_q[rows], est_c[rows], w, c_ref)
    return chosen


def replay(bundle_dir: Path, data_dir: Path, split: str = "test", every: int = 1) -> dict:
    """`every`: keep every k-th prompt of the ordered split (a shorter run, same mix shifts)."""
    _, engine = open_engine(bundle_dir, provider="cpu")
    table = load_table(data_dir).split(split)
    keep = complete_rows(table, engine.models)
    prompts = table.prompts[keep].reset_index(drop=True)
    if len(prompts) // every < MIN_CALLS:
        raise ReplayError(
            f"{data_dir}: {len(prompts)} {split} prompts have an outcome of every model of the bundle; "
            f"a replay needs at least {MIN_CALLS}"
        )
    order = np.argsort(_categories(prompts), kind="stable")[::every]
    calls = Calls(
        [str(t) for t in prompts["prompt"].to_numpy()[order]],
        list(engine.models),
        *(table.matrix(c, engine.models)[keep][order] for c in ("score", "cost_usd", "output_tokens")),
    )
    score, cost, texts = calls.score, calls.cost, calls.texts
    best = int(np.argmax(score.mean(axis=0)))
    target = 0.3 * float(cost[:, best].mean())
    if not target > 0:
        raise ReplayError(
            f"{data_dir}: the most accurate model, {engine.models[best]}, costs nothing: no spend to hold"
        )
    rows = np.arange(len(texts))

    est = engine.estimate(texts)
    curve = hull(*sweep(est.quality, est.cost_usd, score, cost, engine.policy.c_ref_usd)[1:])

    def controlled(feedback: bool) -> dict:
        chosen, predicted = _through_the_server(bundle_dir, calls, target, feedback)
        index = [engine.models.index(m) for m in chosen]
        realised = cost[rows, index]
        return {
            "predicted": _windows(np.array(predicted), target),
            "billed": _windows(realised, target),
            "quality": float(score[rows, index].mean()),
            "curve_quality_at_billed_spend": curve.at(float(realised.mean())),
        }

    preset = engine.policy.presets["cost-30"].cost_weight
    fixed = choose(est.quality, est.cost_usd, preset, engine.policy.c_ref_usd)
    categories = _categories(prompts)[order]
    known = _per_category_w(
        est.quality, est.cost_usd, cost, score, categories, target, engine.policy.c_ref_usd
    )
    return {
        "split": split,
        "prompts": len(texts),
        "categories_in_order": list(dict.fromkeys(categories.tolist())),
        "most_accurate_model": engine.models[best],
        "target_usd_per_1k": 1000 * target,
        "controller": controlled(feedback=False),
        "controller_with_cost_feedback": controlled(feedback=True),
        "fixed_preset_cost_30": {
            "cost_weight": preset,
            "predicted": _windows(est.cost_usd[rows, fixed], target),
            "billed": _windows(cost[rows, fixed], target),
            "quality": float(score[rows, fixed].mean()),
        },
        "per_category_w_known_in_advance": {
            "billed": _windows(cost[rows, known], target),
            "quality": float(score[rows, known].mean()),
            "curve_quality_at_billed_spend": curve.at(float(cost[rows, known].mean())),
        },
    }


def _through_the_server(
    bundle_dir: Path, calls: Calls, target: float, feedback: bool
) -> tuple[list[str], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        budgets = Path(tmp) / "budgets.yaml"
        budgets.write_text(f"tenants:\n  {TENANT}:\n    target_usd_per_1k: {1000 * target!r}\n")
        flags = ["--budgets", str(budgets), "--spend-store", str(Path(tmp) / "spend.sqlite")]
        if feedback:
            flags += ["--feedback-store", f"sqlite:///{Path(tmp) / 'feedback.sqlite'}"]
        with serving(bundle_dir, *flags) as address, grpc.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            chosen, predicted = [], []
            for i, text in enumerate(calls.texts):
                r = stub.Route(router_pb2.RouteRequest(prompt=text, tenant=TENANT), timeout=60)
                chosen.append(r.model)
                predicted.append(next(e.cost_usd for e in r.estimates if e.model == r.model))
                if feedback:
                    m = calls.models.index(r.model)
                    tokens = calls.output_tokens[i, m]
                    outcome = router_pb2.FeedbackRequest(
                        decision_id=r.decision_id, score=calls.score[i, m], cost_usd=calls.cost[i, m]
                    )
                    if np.isfinite(tokens):
                        outcome.output_tokens = int(tokens)
                    stub.Feedback(outcome, timeout=60)
    return chosen, predicted


def report(r: dict) -> str:
    c, cf, f = r["controller"], r["controller_with_cost_feedback"], r["fixed_preset_cost_30"]
    k = r["per_category_w_known_in_advance"]

    def line(name: str, d: dict) -> str:
        within = 100 * d["windows_within_10pct"]
        return (
            f"{name}: whole run {d['whole_run_over_target']:.3f}x the target, worst "
            f"{d['window_calls']}-call window after the first {d['transient_calls']} "
            f"{d['worst_window_over_target']:.3f}x, windows within 10%: {within:.0f}%"
        )

    return "\n".join(
        [
            f"{r['prompts']} {r['split']} prompts in {len(r['categories_in_order'])} categories, in order; "
            f"target {r['target_usd_per_1k']:.4f} USD per 1k calls "
            f"(30% of {r['most_accurate_model']}'s mean cost)",
            line("spend target, as the router accounts it (predicted)", c["predicted"]),
            line("spend target, as billed (recorded costs)", c["billed"]),
            f"  quality {c['quality']:.4f}; the offline curve at the billed spend: "
            f"{c['curve_quality_at_billed_spend']:.4f}",
            line("spend target with cost feedback, predicted", cf["predicted"]),
            line("spend target with cost feedback, billed", cf["billed"]),
            f"  quality {cf['quality']:.4f}; the offline curve at the billed spend: "
            f"{cf['curve_quality_at_billed_spend']:.4f}",
            line(f"fixed cost-30 preset (w={f['cost_weight']:g}), predicted", f["predicted"]),
            line("fixed cost-30 preset, billed", f["billed"]),
            f"  quality {f['quality']:.4f}",
            line("each category at its own w, known in advance, billed", k["billed"]),
            f"  quality {k['quality']:.4f}; the offline curve at the billed spend: "
            f"{k['curve_quality_at_billed_spend']:.4f}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/default")
    parser.add_argument("--data", default="../shared/data/mmlu_pro")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    try:
        result = replay(Path(args.bundle), Path(args.data))
    except (ReplayError, TableError, BundleError) as exc:
        parser.exit(2, f"budget_replay: error: {exc}\n")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
