"""Replay: how much of a full retrain does feedback from live traffic bring? (a benchmark, gRPC only)

    python -m training.feedback_replay --data ../shared/data/dcrouter --out reports/feedback/dcrouter

A bundle is trained on 20% of the table's `train` prompts and served with a feedback store; the
other 80% are routed through the server and their outcomes sent back with Feedback, in one of two
ways:

- full information: an outcome for every model the table scored on the prompt (as a team running
  shadow evaluations would send);
- bandit: only the chosen model's outcome, with exploration on (`--explore`, EXPLORE).

Then every test prompt (those every model answered) is routed and the estimates Route returns are
scored with `router eval`'s metrics. Reported: test gap closed of the 20% bundle alone, with each
kind of feedback, and of a bundle trained on all of `train`; the recovered share
(gap with feedback - gap 20%) / (gap 100% - gap 20%), online and after a retrain of the 20% table
with the logged outcomes (`router train --feedback`); for bandit feedback, the cost of exploration
(mean score and spend of the routed calls, against the same calls routed greedily). Also the
Feedback rate and Route throughput at 32 clients with the store on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

from router.v1 import router_pb2, router_pb2_grpc
from training.bench import serving
from training.metrics import evaluate
from training.pipeline import TrainConfig, train_bundle
from training.tables import RoutingTable, complete_rows, load_table

SHARE = 0.2
EXPLORE = 0.2
CLIENTS = 32


def _subtable(table: RoutingTable, train_ids: set[str], out: Path) -> Path:
    """The table with only `train_ids` in train (and the whole test split)."""
    prompts = table.prompts[table.prompts["prompt_id"].isin(train_ids) | (table.prompts["split"] == "test")]
    out.mkdir(parents=True, exist_ok=True)
    prompts.to_parquet(out / "prompts.parquet", index=False)
    table.outcomes[table.outcomes["prompt_id"].isin(set(prompts["prompt_id"]))].to_parquet(
        out / "outcomes.parquet", index=False
    )
    table.prices.to_csv(out / "models.csv", index=False)
    return out


async def _route_all(address: str, texts: list[str]) -> list[router_pb2.RouteResponse]:
    out: list[router_pb2.RouteResponse | None] = [None] * len(texts)
    queue = iter(range(len(texts)))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def client() -> None:
            for i in queue:
                out[i] = await stub.Route(
                    router_pb2.RouteRequest(prompt=texts[i], cost_weight=0.0), timeout=120
                )

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return out  # type: ignore[return-value]


async def _send_feedback(address: str, requests: list[router_pb2.FeedbackRequest]) -> float:
    queue = iter(requests)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def client() -> None:
            for request in queue:
                await stub.Feedback(request, timeout=120)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        return len(requests) / (time.perf_counter() - started)


def _feedback_requests(
    responses: list[router_pb2.RouteResponse], feed: RoutingTable, full: bool
) -> list[router_pb2.FeedbackRequest]:
    o = feed.outcomes.set_index(["prompt_id", "model"])
    requests = []
    for pid, response in zip(feed.prompts["prompt_id"], responses, strict=True):
        models = [e.model for e in response.estimates] if full else [response.model]
        for model in models:
            if (pid, model) not in o.index:
                continue
            row = o.loc[(pid, model)]
            request = router_pb2.FeedbackRequest(
                decision_id=response.decision_id, model=model, score=float(row.score)
            )
            if not pd.isna(row.output_tokens):
                request.output_tokens = int(row.output_tokens)
            if not pd.isna(row.cost_usd):
                request.cost_usd = float(row.cost_usd)
            requests.append(request)
    return requests


def _test_gap(address: str, test: RoutingTable, models: list[str], c_ref: float) -> float:
    complete = complete_rows(test, models)
    texts = list(test.prompts["prompt"][complete])
    responses = asyncio.run(_route_all(address, texts))
    q = np.array([[{e.model: e.quality for e in r.estimates}[m] for m in models] for r in responses])
    c = np.array([[{e.model: e.cost_usd for e in r.estimates}[m] for m in models] for r in responses])
    score, cost = test.matrix("score", models)[complete], test.matrix("cost_usd", models)[complete]
    return float(evaluate(models, score, cost, q, c, c_ref).figures["gap_closed"])


def replay(data_dir: Path, out: Path, seed: int = 0) -> dict:
    from router.core.manifest import Manifest

    table = load_table(data_dir)
    train, test = table.split("train"), table.split("test")
    ids = train.prompts["prompt_id"].sample(frac=1.0, random_state=seed).tolist()
    small, rest = set(ids[: int(SHARE * len(ids))]), ids[int(SHARE * len(ids)) :]
    work = Path(tempfile.mkdtemp(prefix="feedback-replay-"))
    try:
        train_bundle(_subtable(table, small, work / "t20"), work / "b20", TrainConfig())
        train_bundle(data_dir, work / "b100", TrainConfig())
        manifest = Manifest.read(work / "b20")
        models, c_ref = [m.name for m in manifest.models], manifest.policy.c_ref_usd
        feed = train.subset(rest)
        texts = list(feed.prompts["prompt"])
        result: dict = {"table": table.name, "train_prompts": len(ids), "fed_prompts": len(texts)}
        with serving(work / "b20") as plain:
            result["gap_20"] = _test_gap(plain, test, models, c_ref)
        with serving(work / "b100") as full:
            result["gap_100"] = _test_gap(full, test, models, c_ref)
        for kind, extra in (("full_information", ()), ("bandit", ("--explore", str(EXPLORE)))):
            store = f"sqlite://{work / f'{kind}.sqlite'}"
            with serving(work / "b20", "--feedback-store", store, *extra) as address:
                started = time.perf_counter()
                responses = asyncio.run(_route_all(address, texts))
                route_rate = len(texts) / (time.perf_counter() - started)
                requests = _feedback_requests(responses, feed, full=kind == "full_information")
                feedback_rate = asyncio.run(_send_feedback(address, requests))
                time.sleep(3.0)  # the sync thread's next pass
                gap = _test_gap(address, test, models, c_ref)
            entry = {
                "gap": gap,
                "recovered_share": (gap - result["gap_20"]) / (result["gap_100"] - result["gap_20"]),
                "outcomes_sent": len(requests),
                "feedback_calls_per_s": feedback_rate,
                "route_calls_per_s": route_rate,
            }
            if kind == "bandit":
                entry |= _exploration_cost(responses, feed)
            # The offline way to the same outcomes: `router train --data T20 --feedback STORE`.
            retrained = work / f"b20-{kind}"
            train_bundle(work / "t20", retrained, TrainConfig(feedback=store))
            with serving(retrained) as address:
                entry["retrained_gap"] = _test_gap(address, test, models, c_ref)
            entry["retrained_recovered_share"] = (entry["retrained_gap"] - result["gap_20"]) / (
                result["gap_100"] - result["gap_20"]
            )
            result[kind] = entry
        (out / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _exploration_cost(responses: list[router_pb2.RouteResponse], feed: RoutingTable) -> dict[str, float]:
    """Mean score and recorded cost of the routed calls, and of the greedy choice on the same calls."""
    o = feed.outcomes.set_index(["prompt_id", "model"])
    got: list[tuple[float, float]] = []
    greedy: list[tuple[float, float]] = []
    for pid, r in zip(feed.prompts["prompt_id"], responses, strict=True):
        best = max(r.estimates, key=lambda e: e.utility).model
        for model, into in ((r.model, got), (best, greedy)):
            if (pid, model) in o.index:
                row = o.loc[(pid, model)]
                into.append((float(row.score), float(row.cost_usd) if not pd.isna(row.cost_usd) else np.nan))
    g, b = np.array(got), np.array(greedy)
    return {
        "explored_share": float(np.mean([r.reason.startswith("exploration") for r in responses])),
        "quality_routed": float(g[:, 0].mean()),
        "quality_greedy": float(b[:, 0].mean()),
        "cost_per_1k_routed": float(1000 * np.nanmean(g[:, 1])),
        "cost_per_1k_greedy": float(1000 * np.nanmean(b[:, 1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="directory for metrics.json")
    args = parser.parse_args()
    result = replay(Path(args.data), Path(args.out))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
