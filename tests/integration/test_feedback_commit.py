"""The feedback threads with a real SQLite store on disk: a caller that goes away (its call
cancelled or past its deadline, which cancels its future) must not cost the outcomes committed
with it their answers; outcomes of decisions made under a bundle with another embedding size must
not stop the online memory from learning the others; outcomes still queued when the service
closes must be committed or answered, never left waiting."""

from __future__ import annotations

import time
from pathlib import Path

from router.core.errors import StoreUnavailable
from router.core.feedback_store import Outcome, open_store
from router.core.online import OnlineMemory
from router.serving.feedback import FeedbackQuery, FeedbackService
from router.serving.metrics import Metrics
from tests.helpers import decision_record

MODELS = ("small", "large")


def test_a_cancelled_caller_leaves_the_rest_of_its_commit_batch_answered(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    service = FeedbackService(store, Metrics(), OnlineMemory(384), retention_s=3600)
    service.record([decision_record("a" * 32), decision_record("b" * 32)])
    gone = service.submit(FeedbackQuery("a" * 32, "", 1.0, None, None, None))
    assert gone.cancel()  # queued, not yet taken: as a call cancelled before its commit
    waiting = service.submit(FeedbackQuery("b" * 32, "", 0.0, None, 50, None))
    service.start()  # both are queued before the commit thread runs: one batch
    try:
        recorded, message = waiting.result(timeout=10)
        assert recorded, message
        assert service.store.decisions(["b" * 32])  # the decisions were written with the batch
    finally:
        service.close()


def test_outcomes_of_another_embedding_size_are_left_out_and_the_rest_learnt(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    service = FeedbackService(store, Metrics(), OnlineMemory(384), retention_s=3600)
    # a hot swap to a 768-dimensional bundle and back leaves both kinds of decision in the store
    dims = {"a" * 32: 384, "b" * 32: 768, "c" * 32: 384}
    service.record([decision_record(key, dim) for key, dim in dims.items()])
    service.start()
    try:
        for key in dims:
            assert service.submit(FeedbackQuery(key, "", 1.0, None, None, None)).result(timeout=10)[0]
        service.sync()
        assert len(service.memory) == 2
    finally:
        service.close()
    # and a restart reads them back the same way
    again = FeedbackService(
        open_store(f"sqlite:///{tmp_path / 'feedback.sqlite'}"),
        Metrics(),
        OnlineMemory(384),
        retention_s=3600,
    )
    again.start()
    try:
        assert len(again.memory) == 2
    finally:
        again.close()


def test_outcomes_queued_when_the_service_closes_are_committed_or_answered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    service = FeedbackService(open_store(url), Metrics(), OnlineMemory(384), retention_s=3600)
    ids = [f"{i:032x}" for i in range(600)]
    service.record([decision_record(key) for key in ids])
    service.start()
    futures = [service.submit(FeedbackQuery(key, "", 1.0, None, None, None)) for key in ids]
    service.close()  # as a SIGTERM's drain ends: with most of them still queued
    answered = []
    for future in futures:
        assert future.done(), "a caller was left waiting"
        try:
            answered.append(future.result()[0])
        except StoreUnavailable:
            answered.append(False)
    assert any(answered)
    again = FeedbackService(open_store(url), Metrics(), OnlineMemory(384), retention_s=3600)
    again.start()
    try:
        assert len(again.memory) == sum(answered)  # each one acknowledged is in the store
    finally:
        again.close()


def test_outcomes_beyond_the_queue_bound_are_refused_at_once_and_the_queued_all_answered(
    tmp_path: Path,
) -> None:
    """A stalled store (here: the commit thread not started yet) lets outcomes wait; past the bound
    each further one is RESOURCE_EXHAUSTED at once instead of joining an unbounded queue."""
    from router.core.errors import Overloaded
    from router.serving.feedback import MAX_QUEUED_OUTCOMES

    store = open_store(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    metrics = Metrics()
    service = FeedbackService(store, metrics, OnlineMemory(384), retention_s=3600)
    ids = [f"{i:032x}" for i in range(MAX_QUEUED_OUTCOMES // 2 + 5)]
    service.record([decision_record(i) for i in ids])
    queries = [FeedbackQuery(i, model, 0.5, None, None, None) for i in ids for model in MODELS]
    futures = [service.submit(q) for q in queries]
    refused = futures[MAX_QUEUED_OUTCOMES:]
    assert len(refused) == 10 and all(isinstance(f.exception(timeout=0), Overloaded) for f in refused)
    assert metrics.feedback_outcomes.labels(result="overloaded")._value.get() == 10
    service.start()
    try:
        assert all(f.result(timeout=60)[0] for f in futures[:MAX_QUEUED_OUTCOMES])
    finally:
        service.close()


def test_reading_the_store_neither_waits_for_nor_holds_up_a_writer(tmp_path: Path) -> None:
    """An export (or the sync's reads) took the write lock: beside a live server it waited for the
    server's commits and held them up, and a long one made them time out (UNAVAILABLE)."""
    import sqlite3

    path = tmp_path / "feedback.sqlite"
    store = open_store(f"sqlite:///{path}")
    store.record([decision_record("c" * 32)])
    store.add_outcomes([Outcome("c" * 32, "small", 1.0, None, 40, None, time.time())])
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # as the live server's commit holds it
    try:
        started = time.monotonic()
        exported = list(store.export())
        found = store.decisions(["c" * 32])
        learned = store.outcomes_since(0, 10)
        assert time.monotonic() - started < 2.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        store.close()
    assert len(exported) == 1 and list(found) == ["c" * 32] and len(learned) == 1


def test_a_purge_removes_outcomes_whose_decision_is_gone(tmp_path: Path) -> None:
    """An outcome committed while a purge removed its decision (both at the edge of the retention
    window) was never purged: nothing joins it to a decision any more."""
    store = open_store(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    try:
        store.record([decision_record("d" * 32)])
        now = time.time()
        store.add_outcomes([Outcome("d" * 32, "small", 1.0, None, None, None, now)])
        store.add_outcomes([Outcome("e" * 32, "small", 0.0, None, None, None, now)])  # no decision
        store.purge(before=now - 3600)
        kept = [o.decision_id for o in store.outcomes_since(0, 10)]
        with store.transaction(write=False) as cur:
            cur.execute("SELECT decision_id FROM outcomes")
            left = [row[0] for row in cur.fetchall()]
    finally:
        store.close()
    assert kept == ["d" * 32] and left == ["d" * 32]
