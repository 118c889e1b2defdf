"""Latency ceilings through the real server: models.csv-style ttft_ms / tpot_ms given by `router
reprice`, ModelEstimate.latency_ms, RouteRequest.max_latency_ms, and a bundle without latency data
refusing a ceiling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from router.cli import main
from router.core.manifest import Manifest
from router.v1 import router_pb2
from tests.helpers import router_stub, running_server

PROMPT = "Explain, with an example, how a hash map handles collisions."


@pytest.fixture(scope="module")
def timed_bundle(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small bundle with a time to first token and a time per token for every model but one."""
    models = [m.name for m in Manifest.read(small_bundle).models]
    rows = [f"{m},{100 + 40 * i},{5 + i}" for i, m in enumerate(models[:-1])]
    prices = tmp_path_factory.mktemp("latency") / "latency.csv"
    prices.write_text("model,ttft_ms,tpot_ms\n" + "\n".join(rows) + "\n", encoding="utf-8")
    out = prices.parent / "timed"
    assert main(["reprice", "--bundle", str(small_bundle), "--prices", str(prices), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def stub(timed_bundle: Path) -> Iterator[object]:
    with running_server(bundle=timed_bundle) as srv, router_stub(srv.address) as s:
        yield s


def test_estimates_carry_predicted_latency_where_the_bundle_has_it(stub, timed_bundle: Path) -> None:
    response = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30)
    known = [e for e in response.estimates if e.HasField("latency_ms")]
    assert len(known) == len(response.estimates) - 1 and all(e.latency_ms >= 100 for e in known)
    listed = stub.ListModels(router_pb2.ListModelsRequest(), timeout=10).models
    assert listed[0].ttft_ms == 100 and listed[0].tpot_ms == 5 and not listed[-1].HasField("ttft_ms")
    assert Manifest.read(timed_bundle).changes[-1].op == "reprice"


def test_a_latency_ceiling_excludes_exactly_the_models_above_it(stub) -> None:
    free = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0), timeout=30)
    latencies = sorted(e.latency_ms for e in free.estimates if e.HasField("latency_ms"))
    ceiling = latencies[len(latencies) // 2]
    request = router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0, max_latency_ms=ceiling)
    bounded = stub.Route(request, timeout=30)
    for e in bounded.estimates:
        assert e.eligible == (e.HasField("latency_ms") and e.latency_ms <= ceiling), e.model
    chosen = next(e for e in bounded.estimates if e.model == bounded.model)
    best = max((e for e in bounded.estimates if e.eligible), key=lambda e: e.quality)
    assert chosen.latency_ms <= ceiling and chosen.quality == best.quality


def test_with_no_model_under_the_ceiling_the_fastest_allowed_is_chosen(stub) -> None:
    response = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, max_latency_ms=1.0), timeout=30)
    fastest = min((e for e in response.estimates if e.HasField("latency_ms")), key=lambda e: e.latency_ms)
    assert response.model == fastest.model and "fastest allowed model" in response.reason


def test_a_ceiling_on_a_bundle_without_latency_data_is_refused(server) -> None:
    with router_stub(server.address) as plain, pytest.raises(grpc.RpcError) as info:
        plain.Route(router_pb2.RouteRequest(prompt=PROMPT, max_latency_ms=500.0), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("max_latency_ms:") and "no latency data" in info.value.details()


def test_a_hard_cap_holds_under_a_latency_ceiling_nothing_meets(
    small_bundle: Path, server, tmp_path: Path
) -> None:
    """The cap was one more ceiling the fallback traded against latency: with no model fast enough
    the fastest one was taken though it cost more than the tenant had left (`cheapest`), or the
    call was refused as if no model were affordable (`reject`)."""
    with router_stub(server.address) as plain:
        costs = {
            e.model: e.cost_usd
            for e in plain.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30).estimates
        }
    dearest_first = sorted(costs, key=lambda m: -costs[m])  # the dearest model is the fastest
    prices = tmp_path / "latency.csv"
    rows = [f"{m},{100 * (rank + 1)},0" for rank, m in enumerate(dearest_first)]
    prices.write_text("model,ttft_ms,tpot_ms\n" + "\n".join(rows) + "\n", encoding="utf-8")
    timed = tmp_path / "timed"
    assert main(["reprice", "--bundle", str(small_bundle), "--prices", str(prices), "--out", str(timed)]) == 0
    limit = (min(costs.values()) + costs[dearest_first[0]]) / 2
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(
        "tenants:\n"
        f"  capped: {{limit_usd: {limit!r}, on_exhausted: cheapest}}\n"
        f"  strict: {{limit_usd: {limit!r}, on_exhausted: reject}}\n",
        encoding="utf-8",
    )
    settings = {"budgets": budgets, "spend_store": tmp_path / "spend.sqlite"}
    with running_server(bundle=timed, **settings) as srv, router_stub(srv.address) as stub:
        for tenant in ("capped", "strict"):
            r = stub.Route(
                router_pb2.RouteRequest(prompt=PROMPT, tenant=tenant, max_latency_ms=1.0), timeout=30
            )
            affordable = [e for e in r.estimates if e.cost_usd <= limit]
            fastest = min(affordable, key=lambda e: e.latency_ms)
            assert r.model == fastest.model != dearest_first[0], (tenant, r.reason)
            assert "fastest allowed model" in r.reason and f"tenant {tenant!r} has left" in r.reason
            assert {e.model for e in r.estimates if e.eligible} == {fastest.model}
