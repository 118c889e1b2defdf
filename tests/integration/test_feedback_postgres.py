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


def _lower_within(stub, prompt: str, model: str, below: float, seconds: float) -> bool:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if _quality(stub, router_pb2.RouteRequest(prompt=prompt, cost_weight=0.0))[model] < below:
            return True
        time.sleep(0.2)
    return False


def test_an_outcome_committed_after_a_later_one_is_still_learnt(
    small_bundle: Path, postgres: Postgres
) -> None:
    # Another replica's write takes its sequence number, then commits only after a later number's
    # write has committed and been synced past.
    late_prompt = "Name three rivers of South America and the countries they cross."
    soon_prompt = "Write a haiku about a lighthouse in winter fog."
    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url) as srv,
        router_stub(srv.address) as stub,
    ):
        late = stub.Route(router_pb2.RouteRequest(prompt=late_prompt, cost_weight=0.0), timeout=30)
        soon = stub.Route(router_pb2.RouteRequest(prompt=soon_prompt, cost_weight=0.0), timeout=30)
        late_before = _quality(stub, router_pb2.RouteRequest(prompt=late_prompt, cost_weight=0.0))[late.model]
        soon_before = _quality(stub, router_pb2.RouteRequest(prompt=soon_prompt, cost_weight=0.0))[soon.model]
        with psycopg.connect(postgres.url) as replica:
            replica.execute(
                "INSERT INTO outcomes (decision_id, model, score, received_at) VALUES (%s, %s, 0.0, %s)",
                (late.decision_id, late.model, time.time()),
            )
            assert send_feedback(stub, soon.decision_id, 0.0).recorded
            assert _lower_within(stub, soon_prompt, soon.model, soon_before * 0.9, 10)
            replica.commit()
        assert _lower_within(stub, late_prompt, late.model, late_before * 0.9, 10), (
            "the outcome committed late never reached the online memory"
        )


def test_a_decision_the_store_refuses_does_not_hold_up_the_others(
    small_bundle: Path, postgres: Postgres
) -> None:
    # PostgreSQL text cannot hold a NUL character: with --store-prompts such a decision can never
    # be written, and the decisions queued with it must be written all the same.
    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url, store_prompts=True) as srv,
        router_stub(srv.address) as stub,
    ):
        refused = stub.Route(router_pb2.RouteRequest(prompt="before\x00after, in one prompt"), timeout=30)
        kept = [stub.Route(router_pb2.RouteRequest(prompt=f"{PROMPT} ({i})"), timeout=30) for i in range(3)]
        for routed in kept:
            assert send_feedback(stub, routed.decision_id, 0.5).recorded
        with pytest.raises(grpc.RpcError) as info:
            send_feedback(stub, refused.decision_id, 0.5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30).model  # still serving


def test_a_decision_id_no_store_can_hold_is_refused_and_its_batch_mates_are_recorded(
    small_bundle: Path, postgres: Postgres
) -> None:
    """A NUL in a decision_id reached PostgreSQL's lookup and failed every outcome committed in the
    same batch with UNAVAILABLE, the sender's own included, so that it retried forever."""
    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url) as srv,
        router_stub(srv.address) as stub,
    ):
        routed = [stub.Route(router_pb2.RouteRequest(prompt=f"{PROMPT} [{i}]"), timeout=30) for i in range(8)]
        good, bad = [], []
        for r in routed:  # interleaved, so that they share commit batches
            for ids, decision_id in ((good, r.decision_id), (bad, f"{r.decision_id}\x00")):
                request = router_pb2.FeedbackRequest(decision_id=decision_id, score=0.5)
                ids.append(stub.Feedback.future(request, timeout=30))
        assert all(call.result().recorded for call in good)
        for call in bad:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("decision_id:")


def test_a_store_that_stops_answering_makes_feedback_unavailable_not_hang(
    small_bundle: Path, postgres: Postgres
) -> None:
    """Another session holds the outcomes table locked: the store call waits for the lock, and
    without a statement timeout the commit thread (and every Feedback behind it) waited until each
    caller's deadline, and shutdown waited for it."""
    from router.core.feedback_store import WAIT_S

    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url) as srv,
        router_stub(srv.address) as stub,
    ):
        routed = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30)
        with psycopg.connect(postgres.url) as blocker:
            blocker.execute("LOCK TABLE outcomes IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                request = router_pb2.FeedbackRequest(decision_id=routed.decision_id, score=0.5)
                stub.Feedback(request, timeout=4 * WAIT_S)
            waited = time.monotonic() - started
            blocker.rollback()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert waited < 2.5 * WAIT_S
        assert send_feedback(stub, routed.decision_id, 0.5).recorded  # the lock gone, it is taken


def test_feedback_for_a_decision_not_yet_written_is_unavailable_then_recorded(
    small_bundle: Path, postgres: Postgres
) -> None:
    """Writes fail while reads work (a full disk, a read-only server after a failover): the
    decision waits in the queue, so its outcome is UNAVAILABLE (retry), not NOT_FOUND (give up);
    once writes work again the same outcome is recorded."""
    with (
        running_server(bundle=small_bundle, feedback_store=postgres.url) as srv,
        router_stub(srv.address) as stub,
        psycopg.connect(postgres.url, autocommit=True) as admin,
    ):
        admin.execute(
            "CREATE OR REPLACE FUNCTION refuse_writes() RETURNS trigger AS "
            "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$ "
            "LANGUAGE plpgsql"
        )
        admin.execute(
            "CREATE TRIGGER refuse_writes BEFORE INSERT ON decisions EXECUTE FUNCTION refuse_writes()"
        )
        try:
            routed = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                send_feedback(stub, routed.decision_id, 0.5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "not in the feedback store yet" in info.value.details()
        finally:
            admin.execute("DROP TRIGGER IF EXISTS refuse_writes ON decisions")
        started = time.monotonic()
        while True:
            try:
                assert send_feedback(stub, routed.decision_id, 0.5).recorded
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 15
                time.sleep(0.2)


def test_replicas_committing_the_same_outcomes_in_opposite_orders_do_not_deadlock(postgres: Postgres) -> None:
    """A client that retries on another replica: two commits of the same 200 outcomes, one in
    reverse order. Each outcome is recorded once, and neither commit fails."""
    import threading
    import uuid

    import numpy as np

    from router.core.feedback_store import DecisionRecord, Outcome, PostgresStore, StoreError

    a, b = PostgresStore(postgres.url), PostgresStore(postgres.url)
    ids = [uuid.uuid4().hex for _ in range(200)]
    features = np.zeros(4, np.float32)
    a.record([
        DecisionRecord(i, time.time(), "t", "v", "m1", 0.5, 1.0, ("m1", "m2"), np.zeros(2), np.zeros(2),
                       np.zeros(2), 3, features, None)
        for i in ids
    ])  # fmt: skip
    results: list[list[bool]] = []
    errors: list[StoreError] = []

    def commit(store: PostgresStore, order: list[str]) -> None:
        try:
            results.append(
                store.add_outcomes([Outcome(i, "m1", 0.5, None, None, None, time.time()) for i in order])
            )
        except StoreError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=commit, args=(a, ids)),
        threading.Thread(target=commit, args=(b, ids[::-1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    a.close()
    b.close()
    assert not errors and len(results) == 2
    assert sum(map(sum, results)) == len(ids)  # each recorded by exactly one of the commits
