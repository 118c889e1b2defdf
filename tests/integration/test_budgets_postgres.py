"""Hard caps shared by replicas through a real PostgreSQL spend store: two servers hold one cap
together under concurrent calls, spend acted on survives SIGKILL, and a row another process holds
locked fails only the budgeted calls, quickly."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest

from router.serving.spend_store import open_spend_store, with_session_options
from router.v1 import router_pb2
from tests.helpers import killed_afterwards, route_once_the_store_is_retried, router_stub, running_server
from tests.postgres import Postgres, running_postgres

PROMPTS = [
    "What is the capital of Australia?",
    "Prove that there are infinitely many prime numbers.",
    "Write a Python function that merges two sorted lists in linear time.",
    "Summarise the causes of the First World War in three sentences.",
]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def _budgets(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _route(stub, prompt: str, tenant: str = "") -> router_pb2.RouteResponse:
    return stub.Route(router_pb2.RouteRequest(prompt=prompt, tenant=tenant), timeout=30)


def _cost(response: router_pb2.RouteResponse) -> float:
    return next(e.cost_usd for e in response.estimates if e.model == response.model)


def _stored(postgres: Postgres, tenant: str) -> tuple[float, int]:
    with psycopg.connect(postgres.url) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(spent_usd), 0), COALESCE(SUM(calls), 0) FROM spend WHERE tenant = %s",
            (tenant,),
        ).fetchone()
    assert row is not None
    return float(row[0]), int(row[1])


def test_two_replicas_on_one_spend_store_hold_one_cap_together(
    server, postgres: Postgres, tmp_path: Path
) -> None:
    """With a store per replica each would let the tenant spend the whole limit. Calls of a second
    capped tenant and of a steered one share the batches, so that the replicas' writes lock
    several rows at once: none of them may fail for waiting on the other replica."""
    with router_stub(server.address) as plain:
        typical = max(_cost(_route(plain, p)) for p in PROMPTS)
    limit = 6 * typical
    budgets = _budgets(
        tmp_path,
        "tenants:\n"
        f"  shared: {{limit_usd: {limit!r}, on_exhausted: reject}}\n"
        "  roomy: {limit_usd: 1000.0}\n"
        f"  steered: {{target_usd_per_1k: {500 * typical!r}}}\n",
    )
    settings = {"bundle": server.settings.bundle, "budgets": budgets, "spend_store": postgres.url}
    with (
        running_server(**settings) as a,
        running_server(**settings) as b,
        router_stub(a.address) as stub_a,
        router_stub(b.address) as stub_b,
    ):

        def call(i: int) -> tuple[int, float | None]:
            stub = (stub_a, stub_b)[i % 2]
            for other in ("roomy", "steered"):
                assert _route(stub, PROMPTS[(i + 1) % len(PROMPTS)], other).model
            try:
                return i % 2, _cost(_route(stub, PROMPTS[i % len(PROMPTS)], "shared"))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                return i % 2, None

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(48)))
        served = [cost for _, cost in results if cost is not None]
        assert len(served) >= 2 and sum(served) <= limit * (1 + 1e-9)
        assert {replica for replica, cost in results if cost is not None} == {0, 1}
        for stub in (stub_a, stub_b):  # each replica refuses now: it sees what the other spent
            with pytest.raises(grpc.RpcError) as info:
                _route(stub, PROMPTS[1], "shared")
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    spent, calls = _stored(postgres, "shared")
    assert calls == len(served) and spent == pytest.approx(sum(served), rel=1e-9)


def test_spend_acted_on_survives_sigkill(small_bundle: Path, postgres: Postgres, tmp_path: Path) -> None:
    budgets = _budgets(tmp_path, "tenants:\n  durable: {limit_usd: 1000.0}\n")
    with killed_afterwards(small_bundle, "--budgets", str(budgets), "--spend-store", postgres.url) as stub:
        costs = [_cost(_route(stub, PROMPTS[i % len(PROMPTS)], "durable")) for i in range(25)]
    spent, calls = _stored(postgres, "durable")
    assert calls == 25 and spent == pytest.approx(sum(costs), rel=1e-9)


def test_a_spend_store_url_keeps_its_own_session_options(postgres: Postgres) -> None:
    # a search_path in the URL's options used to be replaced by the store's timeouts
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS budgets")
    url = f"{postgres.url}?options=-c%20search_path%3Dbudgets"
    assert with_session_options(url, "-c lock_timeout=500") == "-c search_path=budgets -c lock_timeout=500"
    store = open_spend_store(url)
    try:
        with psycopg.connect(postgres.url) as conn:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'budgets'"
                )
            }
        assert "spend" in tables
    finally:
        store.close()


def test_a_window_another_process_holds_locked_fails_only_the_budgeted_calls(
    server, postgres: Postgres, tmp_path: Path
) -> None:
    budgets = _budgets(tmp_path, "tenants:\n  locked: {limit_usd: 1000.0}\n  free: {limit_usd: 1000.0}\n")
    settings = {"bundle": server.settings.bundle, "budgets": budgets, "spend_store": postgres.url}
    with running_server(**settings) as srv, router_stub(srv.address) as stub:
        _route(stub, PROMPTS[0], "locked")  # its window's row now exists
        with psycopg.connect(postgres.url) as holder:
            holder.execute("SELECT * FROM spend WHERE tenant = 'locked' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                _route(stub, PROMPTS[1], "locked")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "spend store" in info.value.details() and time.monotonic() - started < 5
            assert (
                srv.server.metrics.registry.get_sample_value(
                    "router_spend_store_errors_total", {"op": "read"}
                )
                == 1
            )
            # a contended row is not a failing store: another capped tenant is served at once
            assert _route(stub, PROMPTS[2], "free").model
            for prompt in PROMPTS:  # the default tenant locks nothing and waits for nothing
                assert stub.Route(router_pb2.RouteRequest(prompt=prompt), timeout=2.5).model
            holder.rollback()
        assert route_once_the_store_is_retried(
            stub, router_pb2.RouteRequest(prompt=PROMPTS[3], tenant="locked")
        ).model
    _, calls = _stored(postgres, "locked")
    assert calls == 2  # the refused call was not decided, so nothing of it is booked


def _cluster_pids(postgres: Postgres) -> list[int]:
    """The postmaster and every process it started (the backends serving connections)."""
    postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields.get("PPid", "0").strip()) == postmaster:
                pids.append(int(status.parent.name))
    return pids


def test_a_database_that_stops_answering_fails_the_capped_calls_and_holds_up_nothing_else(
    server, tmp_path: Path
) -> None:
    """A paused server (or a pooler queueing) honours neither statement_timeout nor lock_timeout:
    the engine thread must not wait on it without end."""
    budgets = _budgets(tmp_path, "tenants:\n  paused: {limit_usd: 1000.0}\n")
    with running_postgres() as paused:
        settings = {"bundle": server.settings.bundle, "budgets": budgets, "spend_store": paused.url}
        with running_server(**settings) as srv, router_stub(srv.address) as stub:
            _route(stub, PROMPTS[0], "paused")
            stopped = _cluster_pids(paused)
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    _route(stub, PROMPTS[1], "paused")
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 10
                for prompt in PROMPTS:  # the default tenant waits for nothing
                    assert stub.Route(router_pb2.RouteRequest(prompt=prompt), timeout=2.5).model
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
            assert route_once_the_store_is_retried(
                stub, router_pb2.RouteRequest(prompt=PROMPTS[2], tenant="paused")
            )
