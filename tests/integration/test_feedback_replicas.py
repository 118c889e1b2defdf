"""Replicas sharing one real SQLite store on disk (two FeedbackService instances, each with its own
connection, as two processes have): feedback that reaches one replica for a decision another made
moments ago and has yet to write is UNAVAILABLE (retry), not NOT_FOUND; and an outcome another
replica commits late is learnt whatever that replica's clock wrote in the store."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from router.core.decision_ids import new_decision_id
from router.core.errors import NotFound, StoreUnavailable
from router.core.feedback_store import open_store
from router.core.online import OnlineMemory
from router.serving import feedback
from router.serving.feedback import MAX_GAPS, MAX_PENDING, FeedbackQuery, FeedbackService
from router.serving.metrics import Metrics
from tests.helpers import decision_record

DIM = 384


def _replica(url: str, metrics: Metrics | None = None) -> FeedbackService:
    return FeedbackService(open_store(url), metrics or Metrics(), OnlineMemory(DIM), retention_s=3600)


def _send(service: FeedbackService, decision_id: str) -> tuple[bool, str]:
    return service.submit(FeedbackQuery(decision_id, "", 1.0, None, None, None)).result(timeout=10)


def test_feedback_for_a_decision_another_replica_has_yet_to_write_is_unavailable_then_recorded(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    a = _replica(url)
    metrics = Metrics()
    b = _replica(url, metrics)
    b.start()
    try:
        decision_id = new_decision_id()
        a.record([decision_record(decision_id)])  # a's writer has not run: the decision is in its queue
        with pytest.raises(StoreUnavailable, match=r"not in the feedback store yet.*retry"):
            _send(b, decision_id)
        a.flush()  # a's writer's next turn
        recorded, message = _send(b, decision_id)  # the client's retry
        assert recorded, message
        hour_ms = 3_600_000
        now_ms = time.time_ns() // 1_000_000
        unknown = [
            uuid.uuid4().hex,  # ids made before UUIDv7 carry no time: as before
            new_decision_id(now_ms - hour_ms),  # made long ago, never stored
            new_decision_id(now_ms + hour_ms),  # from a clock far ahead
            "f" * 32,
            "not-a-decision-id",
        ]
        for decision_id in unknown:
            with pytest.raises(NotFound):
                _send(b, decision_id)
    finally:
        b.close()
        a.close()
    assert metrics.feedback_outcomes.labels(result="not_yet")._value.get() == 1
    assert metrics.feedback_outcomes.labels(result="not_found")._value.get() == len(unknown)


def test_a_decision_this_replica_dropped_is_not_found_at_once(tmp_path: Path) -> None:
    """Its id is recent, but this replica knows it will never be stored: retrying cannot help."""
    service = _replica(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    ids = [new_decision_id() for _ in range(MAX_PENDING + 1)]
    service.record([decision_record(i) for i in ids])  # a store too slow for the queue: the oldest goes
    service.start()
    try:
        with pytest.raises(NotFound):
            _send(service, ids[0])
        assert _send(service, ids[1])[0]
    finally:
        service.close()


def _insert_outcome(db: sqlite3.Connection, seq: int, decision_id: str, received_at: float) -> None:
    """As another replica's store write does, with the sequence number it took."""
    db.execute(
        "INSERT INTO outcomes (seq, decision_id, model, score, received_at) VALUES (?, ?, 'small', 1.0, ?)",
        (seq, decision_id, received_at),
    )


def test_an_outcome_committed_late_is_learnt_whatever_the_clock_of_the_replica_that_received_it(
    tmp_path: Path,
) -> None:
    """The replica that received the outcomes has a clock an hour behind this one's: the skipped
    number was taken for an old one and never looked for again, so the late commit was never
    learnt."""
    path = tmp_path / "feedback.sqlite"
    service = _replica(f"sqlite:///{path}")  # its syncs are run here, not by its thread
    ids = [new_decision_id() for _ in range(3)]
    service.store.record([decision_record(i) for i in ids])
    behind = time.time() - 3600
    other = sqlite3.connect(path, isolation_level=None)
    try:
        _insert_outcome(other, 1, ids[0], behind)
        _insert_outcome(other, 3, ids[2], behind)  # number 2's write is still in progress
        service.sync()
        assert len(service.memory) == 2
        _insert_outcome(other, 2, ids[1], behind)  # and commits now
        service.sync()
        assert len(service.memory) == 3, "the outcome committed late never reached the online memory"
    finally:
        other.close()
        service.close()


def test_the_numbers_looked_for_are_bounded_and_the_newest(tmp_path: Path) -> None:
    """A history with a large hole (purged outcomes), as the first sync at start reads it: the
    newest MAX_GAPS numbers are looked for (one of them committed late is learnt), no more."""
    path = tmp_path / "feedback.sqlite"
    service = _replica(f"sqlite:///{path}")
    ids = [new_decision_id() for _ in range(4)]
    service.store.record([decision_record(i) for i in ids])
    last = 5 * MAX_GAPS
    other = sqlite3.connect(path, isolation_level=None)
    try:
        _insert_outcome(other, 1, ids[0], time.time())
        _insert_outcome(other, last, ids[2], time.time())
        service.sync()
        assert len(service.memory) == 2
        _insert_outcome(other, last - 1, ids[1], time.time())
        _insert_outcome(other, last - MAX_GAPS - 1, ids[3], time.time())  # older than those kept
        started = time.monotonic()
        service.sync()
        assert time.monotonic() - started < 5
        assert len(service.memory) == 3
    finally:
        other.close()
        service.close()


def test_a_store_outage_longer_than_the_gap_wait_does_not_expire_the_numbers_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gaps aged with every sync, failed ones too: after an outage longer than GAP_WAIT_S, the
    number skipped before it was dropped unlooked-for, and its late commit never learnt."""
    monkeypatch.setattr(feedback, "GAP_WAIT_S", 0.3)
    path = tmp_path / "feedback.sqlite"
    service = _replica(f"sqlite:///{path}")
    ids = [new_decision_id() for _ in range(3)]
    service.store.record([decision_record(i) for i in ids])
    other = sqlite3.connect(path, isolation_level=None)
    try:
        _insert_outcome(other, 1, ids[0], time.time())
        _insert_outcome(other, 3, ids[2], time.time())
        service.sync()
        other.execute("ALTER TABLE outcomes RENAME TO outcomes_away")  # the store fails every read
        for _ in range(3):
            time.sleep(0.3)
            service.sync()
        other.execute("ALTER TABLE outcomes_away RENAME TO outcomes")
        _insert_outcome(other, 2, ids[1], time.time())  # committed late, during the outage
        service.sync()
        assert len(service.memory) == 3
    finally:
        other.close()
        service.close()
