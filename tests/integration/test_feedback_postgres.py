"""Feedback on a real PostgreSQL server shared by two replicas: an outcome reported to one moves
the other's estimates within 10 s; acknowledged outcomes survive SIGKILL; a store that goes down
makes Feedback UNAVAILABLE while Route keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from router.v1 import router_pb2
from tests.helpers import killed_afterwards, router_stub, running_server, send_feedback
from tests.postgres import Postgres, running_postgres

PROMPT = "Explain why the sky is blue in two sentences."


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def _quality(stub, request: router_pb2.RouteRequest) -> dict[str, float]:
    return {e.model: e.quality for e in stub.Route(request, timeout=30).estimates}


def test_two_replicas_on_one_store_learn_from_each_other(small_bundle: Path, postgres: Postgres) -> None:
    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url) as a,
        running_server(bundle=small_bundle, feedback_store=postgres.url) as b,
        router_stub(a.address) as stub_a,
        router_stub(b.address) as stub_b,
    ):
        request = router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0)
        on_b = _quality(stub_b, request)
        routed = stub_a.Route(request, timeout=30)
        assert send_feedback(stub_a, routed.decision_id, 0.0).recorded
        started = time.monotonic()
        while _quality(stub_b, request)[routed.model] >= on_b[routed.model]:
            assert time.monotonic() - started < 10, "replica b never saw replica a's outcome"
            time.sleep(0.2)
        # the same outcome sent to the other replica is recognised as already recorded
        again = send_feedback(stub_b, routed.decision_id, 0.0)
        assert not again.recorded and "already recorded" in again.message


def test_acknowledged_outcomes_survive_sigkill(small_bundle: Path, postgres: Postgres) -> None:
    acknowledged = set()
    with killed_afterwards(small_bundle, "--feedback-store", postgres.url) as stub:
        for i in range(25):
            r = stub.Route(router_pb2.RouteRequest(prompt=f"{PROMPT} #{i}"), timeout=30)
            if send_feedback(stub, r.decision_id, 0.25).recorded:
                acknowledged.add(r.decision_id)
    with psycopg.connect(postgres.url) as conn:
        stored = {row[0] for row in conn.execute("SELECT decision_id FROM outcomes WHERE score = 0.25")}
    assert len(acknowledged) == 25 and acknowledged <= stored


def test_a_store_that_goes_down_makes_feedback_unavailable_and_route_keeps_serving(
    small_bundle: Path, postgres: Postgres
) -> None:
    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url) as srv,
        router_stub(srv.address) as stub,
    ):
        routed = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30)
        postgres.stop("immediate")
        try:
            with pytest.raises(grpc.RpcError) as info:
                send_feedback(stub, routed.decision_id, 0.5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            for i in range(5):
                while_down = stub.Route(router_pb2.RouteRequest(prompt=f"{PROMPT} {i}"), timeout=30)
                assert while_down.model
        finally:
            postgres.start()
        # back up: the decision made while it was down was kept in the queue and can now be scored
        deadline = time.monotonic() + 20
        while True:
            try:
                assert send_feedback(stub, while_down.decision_id, 0.5).recorded
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.5)
