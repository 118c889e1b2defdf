"""Outcome feedback through the real server with a real SQLite store on disk: decision ids, the
Feedback RPC and its errors, idempotence, online updates, exploration, and durability under
SIGKILL."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from router.core.decision_ids import minted_at, new_decision_id
from router.v1 import router_pb2
from tests.helpers import killed_afterwards, router_stub, running_server, send_feedback

PROMPT = "Which planet has the longest day in the solar system?"
OTHERS = [
    "What is the boiling point of ethanol at sea level?",
    "Name the largest desert on Earth.",
    "Who wrote the novel Middlemarch?",
]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_feedback_is_recorded_once_and_bad_feedback_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'feedback.sqlite'}"
    with running_server(bundle=small_bundle, feedback_store=store) as srv, router_stub(srv.address) as stub:
        routed = [stub.Route(router_pb2.RouteRequest(prompt=p), timeout=30) for p in [PROMPT, *OTHERS]]
        ids = [r.decision_id for r in routed]
        assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
        assert all(abs(time.time() - (minted_at(i) or 0)) < 60 for i in ids)  # UUIDv7s, made now
        first = send_feedback(stub, ids[0], 0.9, output_tokens=120, cost_usd=0.0004)
        assert first.recorded and routed[0].model in first.message
        again = send_feedback(stub, ids[0], 0.1)
        assert not again.recorded and "already recorded" in again.message
        other_model = next(e.model for e in routed[0].estimates if e.model != routed[0].model)
        assert send_feedback(stub, ids[0], 0.2, model=other_model).recorded
        cases = [
            (lambda: send_feedback(stub, "f" * 32, 0.5), grpc.StatusCode.NOT_FOUND),
            # made moments ago, perhaps by a replica that has yet to write it: retry
            (lambda: send_feedback(stub, new_decision_id(), 0.5), grpc.StatusCode.UNAVAILABLE),
            (lambda: send_feedback(stub, new_decision_id(10**12), 0.5), grpc.StatusCode.NOT_FOUND),
            (lambda: send_feedback(stub, ids[1], 1.5), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: send_feedback(stub, ids[1], None), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: send_feedback(stub, ids[1], 0.5, model="gpt-9"), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: send_feedback(stub, ids[1], 0.5, output_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT),
            # a count no answer has: it would turn every nearby prompt's cost estimate to trillions
            (lambda: send_feedback(stub, ids[1], 0.5, output_tokens=2**62), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: send_feedback(stub, "", 0.5), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: send_feedback(stub, ids[1] + "\x00", 0.5), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, code in cases:
            assert _code(call) == code
        with pytest.raises(grpc.RpcError) as info:
            send_feedback(stub, ids[1], 2.0)
        assert info.value.details().startswith("score:")
    with sqlite3.connect(tmp_path / "feedback.sqlite") as db:
        decisions = db.execute(
            "SELECT id, model, propensity, prompt, length(features) FROM decisions"
        ).fetchall()
        outcomes = db.execute(
            "SELECT decision_id, model, score, output_tokens, cost_usd FROM outcomes"
        ).fetchall()
    assert {d[0] for d in decisions} == set(ids)
    assert all(d[2] == 1.0 and d[3] is None and d[4] == 390 * 4 for d in decisions), (
        "no prompt text by default"
    )
    assert sorted(outcomes) == sorted(
        [(ids[0], routed[0].model, 0.9, 120, 0.0004), (ids[0], other_model, 0.2, None, None)]
    )


def test_feedback_without_a_store_is_refused(server) -> None:
    with router_stub(server.address) as stub:
        routed = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30)
        assert routed.decision_id
        refused = _code(lambda: send_feedback(stub, routed.decision_id, 0.5))
        assert refused == grpc.StatusCode.FAILED_PRECONDITION


def test_an_outcome_moves_the_estimates_within_seconds(small_bundle: Path, tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'feedback.sqlite'}"
    with running_server(bundle=small_bundle, feedback_store=store) as srv, router_stub(srv.address) as stub:
        before = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0), timeout=30)
        quality = {e.model: e.quality for e in before.estimates}
        worst = min(quality, key=quality.__getitem__)
        # the chosen model failed on it, the weakest one got it right
        send_feedback(stub, before.decision_id, 0.0)
        send_feedback(stub, before.decision_id, 1.0, model=worst)
        deadline = time.monotonic() + 10
        while True:
            after = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0), timeout=30)
            moved = {e.model: e.quality for e in after.estimates}
            if moved[before.model] < quality[before.model] and moved[worst] > quality[worst]:
                break
            assert time.monotonic() < deadline, "the outcomes never reached the estimates"
            time.sleep(0.2)
        untouched = [m for m in quality if m not in (before.model, worst)]
        assert all(moved[m] == quality[m] for m in untouched), "only models with outcomes move"
        assert srv.server.metrics.online_memory._value.get() == 2


def test_an_unreadable_stored_decision_is_skipped_and_the_outcomes_after_it_are_learnt(
    small_bundle: Path, tmp_path: Path
) -> None:
    """A features blob that is not float32s (a row written by something else) raised in the sync,
    which then never moved past it: no replica learnt anything again."""
    import sqlite3

    path = tmp_path / "feedback.sqlite"
    with (
        running_server(bundle=small_bundle, feedback_store=f"sqlite://{path}") as srv,
        router_stub(srv.address) as stub,
    ):
        broken = stub.Route(router_pb2.RouteRequest(prompt="What is 2 + 2?"), timeout=30)
        good = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=30)
        send_feedback(stub, good.decision_id, 0.5)  # the decisions are written by now
        with sqlite3.connect(path) as db:
            db.execute("UPDATE decisions SET features = X'010203' WHERE id = ?", (broken.decision_id,))
        assert send_feedback(stub, broken.decision_id, 0.0).recorded
        assert send_feedback(stub, good.decision_id, 1.0, model=_other(good)).recorded
        deadline = time.monotonic() + 10
        while srv.server.metrics.online_memory._value.get() < 2:  # the first and the last outcome
            assert time.monotonic() < deadline, "the sync stopped at the unreadable decision"
            time.sleep(0.2)
        time.sleep(1.5)  # another sync or two: the unreadable one is still not learnt
        assert srv.server.metrics.online_memory._value.get() == 2


def _other(response: router_pb2.RouteResponse) -> str:
    return next(e.model for e in response.estimates if e.model != response.model)


def test_exploration_draws_from_the_eligible_models_and_logs_its_propensity(
    small_bundle: Path, tmp_path: Path
) -> None:
    path = tmp_path / "feedback.sqlite"
    settings = {"feedback_store": f"sqlite://{path}", "explore": 1.0, "store_prompts": True}
    with running_server(bundle=small_bundle, **settings) as srv, router_stub(srv.address) as stub:
        allowed = ["gemma-7b", "Yi-6B", "Phi-3-mini-4k-instruct"]
        chosen = set()
        for _ in range(40):
            r = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, allowed_models=allowed), timeout=30)
            assert r.model in allowed and r.reason.startswith("exploration:")
            chosen.add(r.model)
        assert chosen == set(allowed)
        srv.call(_settle())
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT propensity, prompt FROM decisions").fetchall()
    assert len(rows) == 40 and all(p == pytest.approx(1 / 3) and text == PROMPT for p, text in rows)


async def _settle() -> None:
    """Lets the background writer pass once more."""
    import asyncio

    await asyncio.sleep(0.3)


def test_acknowledged_outcomes_survive_sigkill(small_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite"
    acknowledged = []
    with killed_afterwards(small_bundle, "--feedback-store", f"sqlite://{path}") as stub:
        for i in range(30):
            r = stub.Route(router_pb2.RouteRequest(prompt=f"{PROMPT} ({i})"), timeout=30)
            if send_feedback(stub, r.decision_id, (i % 10) / 10).recorded:
                acknowledged.append((r.decision_id, (i % 10) / 10))
    with sqlite3.connect(path) as db:
        stored = set(db.execute("SELECT decision_id, score FROM outcomes").fetchall())
    assert len(acknowledged) == 30 and stored == set(acknowledged)


def test_logged_feedback_exports_as_a_table_and_folds_into_a_retrain(
    small_bundle: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    from router.cli import main
    from router.core.manifest import Manifest
    from tests.conftest import SMALL_PROMPTS

    path = tmp_path / "feedback.sqlite"
    prompts = list(pd.read_parquet(data_dir / "mmlu_pro" / "prompts.parquet").prompt[:12])
    with (
        running_server(bundle=small_bundle, feedback_store=f"sqlite://{path}") as srv,
        router_stub(srv.address) as stub,
    ):
        for i, text in enumerate(prompts):
            r = stub.Route(router_pb2.RouteRequest(prompt=text), timeout=30)
            send_feedback(stub, r.decision_id, float(i % 2), output_tokens=40 + i, cost_usd=1e-4)
            other = next(e.model for e in r.estimates if e.model != r.model)
            send_feedback(stub, r.decision_id, 0.5, model=other)
    out = tmp_path / "exported"
    assert main(["feedback", "export", "--store", f"sqlite://{path}", "--out", str(out)]) == 0
    exported = pd.read_parquet(out / "prompts.parquet")
    outcomes = pd.read_parquet(out / "outcomes.parquet")
    features = pd.read_parquet(out / "features.parquet")
    assert len(exported) == 12 and len(outcomes) == 24 and (exported.prompt == "").all(), "no text stored"
    assert set(features.prompt_id) == set(exported.prompt_id) and len(features.features[0]) == 390
    assert set(pd.read_csv(out / "models.csv").model) == set(outcomes.model)
    # an export never replaces the store it reads, nor creates one for a mistyped path
    assert main(["feedback", "export", "--store", f"sqlite://{path}", "--out", str(tmp_path)]) == 2
    assert main(["feedback", "export", "--store", f"sqlite://{path}x", "--out", str(out)]) == 2
    assert path.is_file() and not path.with_name(path.name + "x").exists()
    # the export has no text to embed, so it is refused as a table to train on, naming the way in
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "from-export")]) == 2
    assert "12 prompt(s) have no text" in capsys.readouterr().err
    bundle = tmp_path / "retrained"
    code = main(["train", "--data", str(data_dir / "mmlu_pro"), "--max-prompts", str(SMALL_PROMPTS),
                 "--feedback", f"sqlite://{path}", "--out", str(bundle)])  # fmt: skip
    assert code == 0
    assert Manifest.read(bundle).training.feedback_outcomes == 24
