"""The feedback commit thread with a real SQLite store on disk: a caller that goes away (its call
cancelled or past its deadline, which cancels its future) must not cost the outcomes committed
with it their answers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from router.core.feedback_store import DecisionRecord, open_store
from router.core.online import OnlineMemory
from router.serving.feedback import FeedbackQuery, FeedbackService
from router.serving.metrics import Metrics

MODELS = ("small", "large")


def _decision(decision_id: str) -> DecisionRecord:
    return DecisionRecord(
        id=decision_id,
        created_at=time.time(),
        tenant="",
        bundle_version="test",
        model="small",
        cost_weight=0.1,
        propensity=1.0,
        models=MODELS,
        quality=np.array([0.5, 0.8]),
        cost_usd=np.array([1e-4, 1e-3]),
        output_tokens=np.array([100.0, 120.0]),
        input_tokens=20,
        features=np.full(386, 0.05, dtype=np.float32),
        prompt=None,
    )


def test_a_cancelled_caller_leaves_the_rest_of_its_commit_batch_answered(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'feedback.sqlite'}")
    service = FeedbackService(store, Metrics(), OnlineMemory(384), retention_s=3600)
    service.record([_decision("a" * 32), _decision("b" * 32)])
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
