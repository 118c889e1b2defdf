"""Per-tenant budgets through the real server: hard caps (with both fallbacks, across a restart),
allow-lists, tenant names, and a budgets file edited under load or broken."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import pytest

from router.cli import main
from router.v1 import router_pb2
from tests.helpers import Traffic, route_once_the_store_is_retried, router_stub, running_server

PROMPTS = [
    "What is the capital of Australia?",
    "Prove that there are infinitely many prime numbers.",
    "Write a Python function that merges two sorted lists in linear time.",
    "Summarise the causes of the First World War in three sentences.",
]


def _write(path: Path, text: str) -> None:
    """Replaces the file atomically, as an editor or a ConfigMap update does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _route(stub, prompt: str, tenant: str = "", **fields) -> router_pb2.RouteResponse:
    return stub.Route(router_pb2.RouteRequest(prompt=prompt, tenant=tenant, **fields), timeout=30)


def _cost(response: router_pb2.RouteResponse) -> float:
    return next(e.cost_usd for e in response.estimates if e.model == response.model)


def _cheapest(response: router_pb2.RouteResponse) -> str:
    return min(response.estimates, key=lambda e: e.cost_usd).model


@pytest.fixture(scope="module")
def typical_cost(server) -> float:
    with router_stub(server.address) as stub:
        return max(_cost(_route(stub, p)) for p in PROMPTS)


@pytest.fixture
def budgets(tmp_path: Path, typical_cost: float) -> Path:
    path = tmp_path / "budgets.yaml"
    limit = 3 * typical_cost
    _write(
        path,
        "tenants:\n"
        f"  capped: {{limit_usd: {limit!r}, window_s: 86400, on_exhausted: cheapest}}\n"
        f"  strict: {{limit_usd: {limit!r}, on_exhausted: reject}}\n"
        "  listed: {allowed_models: [gemma-7b, Yi-6B]}\n",
    )
    return path


def test_a_tenant_past_its_cap_gets_the_cheapest_model_others_are_unchanged_and_it_holds_across_a_restart(
    server, budgets: Path, tmp_path: Path
) -> None:
    store = tmp_path / "spend.sqlite"
    with router_stub(server.address) as plain:
        reference = {p: _route(plain, p) for p in PROMPTS}
    with (
        running_server(bundle=server.settings.bundle, budgets=budgets, spend_store=store) as srv,
        router_stub(srv.address) as stub,
    ):
        # another tenant (not configured) and the default one decide as with no budgets at all
        for p in PROMPTS:
            for tenant in ("", "someone-else"):
                r = _route(stub, p, tenant)
                assert r.model == reference[p].model and r.reason == reference[p].reason
                assert [e.cost_usd for e in r.estimates] == [e.cost_usd for e in reference[p].estimates]
        limit = 3 * max(_cost(r) for r in reference.values())
        costs, exhausted = [], []
        for i in range(30):
            r = _route(stub, PROMPTS[i % len(PROMPTS)], "capped")
            if "has spent its" in r.reason:
                exhausted.append(r)
            else:
                assert not exhausted, "once spent, the cap stays spent within the window"
                costs.append(_cost(r))
        # every decision before the cap was made with budget left (the last may be the cheapest
        # model going past it: `cheapest` keeps answering); after it, only the cheapest model
        assert exhausted and sum(costs[:-1]) < limit <= sum(costs) + 1e-15
        assert all(r.model == _cheapest(r) for r in exhausted)
        codes, strict_costs = [], []
        for i in range(30):
            try:
                strict_costs.append(_cost(_route(stub, PROMPTS[i % len(PROMPTS)], "strict")))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "strict" in exc.details()
        assert sum(strict_costs) <= limit, "with `reject`, the limit holds exactly"
        assert codes[0] == grpc.StatusCode.OK and codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert set(codes[codes.index(grpc.StatusCode.RESOURCE_EXHAUSTED) :]) == {
            grpc.StatusCode.RESOURCE_EXHAUSTED
        }
    # a new process on the same spend store: still spent
    with (
        running_server(bundle=server.settings.bundle, budgets=budgets, spend_store=store) as srv,
        router_stub(srv.address) as stub,
    ):
        r = _route(stub, PROMPTS[1], "capped")
        assert "has spent its" in r.reason and r.model == _cheapest(r)
        with pytest.raises(grpc.RpcError) as info:
            _route(stub, PROMPTS[1], "strict")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_tenant_allow_list_bounds_the_choice_and_names_are_checked(
    server, budgets: Path, tmp_path: Path
) -> None:
    with (
        running_server(
            bundle=server.settings.bundle, budgets=budgets, spend_store=tmp_path / "s.sqlite"
        ) as srv,
        router_stub(srv.address) as stub,
    ):
        r = _route(stub, PROMPTS[1], "listed", cost_weight=0.0)
        assert r.model in {"gemma-7b", "Yi-6B"}
        assert {e.model for e in r.estimates if e.eligible} == {"gemma-7b", "Yi-6B"}
        for fields, field in (
            ({"tenant": "listed", "allowed_models": ["gemini-1.5-pro-002"]}, "allowed_models"),
            ({"tenant": "no spaces allowed"}, "tenant"),
            ({"tenant": "x" * 65}, "tenant"),
            ({"tenant": "listed\n"}, "tenant"),  # not another tenant, free of the allow-list
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], **fields), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(f"{field}:")


def test_a_tenant_allow_list_longer_than_a_request_may_give_still_serves_plain_requests(
    server, tmp_path: Path
) -> None:
    budgets = tmp_path / "budgets.yaml"
    _write(budgets, "tenants:\n  wide: {allowed_models: [gemma-7b, Yi-6B, gemini-1.5-pro-002]}\n")
    settings = {"budgets": budgets, "spend_store": tmp_path / "s.sqlite", "max_allowed_models": 2}
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        r = _route(stub, PROMPTS[1], "wide", cost_weight=0.0)
        assert {e.model for e in r.estimates if e.eligible} == {"gemma-7b", "Yi-6B", "gemini-1.5-pro-002"}
        with pytest.raises(grpc.RpcError) as info:  # the request's own list is still held to the limit
            _route(stub, PROMPTS[1], "wide", allowed_models=["gemma-7b", "Yi-6B", "gemini-1.5-pro-002"])
        assert info.value.details().startswith("allowed_models:") and "limit is 2" in info.value.details()


def test_an_allow_list_naming_models_the_bundle_lacks_is_the_servers_fault_not_the_callers(
    server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenant whose allow-list names no model served was refused INVALID_ARGUMENT, which tells a
    caller to fix a request that is fine; one misspelt name among good ones narrowed it silently."""
    budgets = tmp_path / "budgets.yaml"
    _write(
        budgets,
        "tenants:\n"
        "  typo: {allowed_models: [gemma-7bb, Yi-6b]}\n"
        "  partly: {allowed_models: [gemma-7b, Yi-6b]}\n",
    )
    settings = {"budgets": budgets, "spend_store": tmp_path / "s.sqlite"}
    caplog.set_level(logging.WARNING, logger="router.serving.ledger")
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        with pytest.raises(grpc.RpcError) as info:
            _route(stub, PROMPTS[0], "typo")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "typo" in info.value.details() and "budgets file" in info.value.details()
        r = _route(stub, PROMPTS[0], "partly", cost_weight=0.0)
        assert r.model == "gemma-7b" and {e.model for e in r.estimates if e.eligible} == {"gemma-7b"}
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "tenants.partly.allowed_models names 'Yi-6b', not in the bundle served" in text


def test_a_budgets_file_edited_under_load_takes_effect_and_a_broken_one_is_refused(
    server, budgets: Path, tmp_path: Path
) -> None:
    settings = {"budgets": budgets, "spend_store": tmp_path / "s.sqlite", "bundle_poll_s": 0.2}
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        assert _route(stub, PROMPTS[0], "listed", cost_weight=0.0).model in {"gemma-7b", "Yi-6B"}
        with Traffic(srv.address, clients=4) as traffic:
            time.sleep(0.5)
            _write(budgets, "tenants:\n  listed: {allowed_models: [Yi-6B]}\n")
            deadline = time.monotonic() + 20
            while _route(stub, PROMPTS[0], "listed", cost_weight=0.0).model != "Yi-6B":
                assert time.monotonic() < deadline, "the edited budgets never took effect"
                time.sleep(0.1)
            _write(budgets, "tenants:\n  listed: {allowed_models: [Yi-6B], limit_usd: -1}\n")
            deadline = time.monotonic() + 20
            while srv.server.metrics.budget_reloads.labels(result="failure")._value.get() < 1:
                assert time.monotonic() < deadline, "the broken budgets file was never looked at"
                time.sleep(0.1)
            time.sleep(0.5)
        assert {code for _, _, code, _ in traffic.results} == {grpc.StatusCode.OK}
        # the broken file was refused: the edited one is still in force
        assert _route(stub, PROMPTS[2], "listed", cost_weight=0.0).model == "Yi-6B"


def test_a_broken_budgets_file_at_start_is_refused_naming_the_key(
    small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "budgets.yaml"
    _write(
        path, "tenants:\n  ok-team: {target_usd_per_1k: 0.2}\n  bad: {limit_usd: 5, on_exhausted: shrug}\n"
    )
    code = main(["serve", "--bundle", str(small_bundle), "--budgets", str(path), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "tenants.bad.on_exhausted" in err and "Traceback" not in err
    _write(path, "tenants:\n  twice: {allowed_models: [gemma-7b, Yi-6B, gemma-7b]}\n")
    code = main(["serve", "--bundle", str(small_bundle), "--budgets", str(path), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "tenants.twice.allowed_models" in err and "'gemma-7b' more than once" in err
    for text, key in [
        ("tenants:\n  blink: {limit_usd: 1.0, window_s: 0.5}\n", "tenants.blink.window_s"),
        ("tenants:\n  forever: {limit_usd: 1.0, window_s: .inf}\n", "tenants.forever.window_s"),
        ("tenants:\n  aeons: {limit_usd: 1.0, window_s: 1.0e+19}\n", "tenants.aeons.window_s"),
        ("tenants:\n  endless: {limit_usd: .inf}\n", "tenants.endless.limit_usd"),
        ("tenants:\n  tiny: {target_usd_per_1k: 4.0e-324}\n", "tenants.tiny.target_usd_per_1k"),
        ("", "the file is empty"),
        ("tenant:\n  typo: {limit_usd: 1.0}\n", "tenants: Field required"),
        ("tenants:\n  flag: {limit_usd: true}\n", "tenants.flag.limit_usd"),
        ("tenants:\n  text: {target_usd_per_1k: '0.2'}\n", "tenants.text.target_usd_per_1k"),
    ]:
        _write(path, text)
        code = main(["serve", "--bundle", str(small_bundle), "--budgets", str(path), "--port", "0"])
        err = capsys.readouterr().err
        assert code == 2 and key in err and "Traceback" not in err, (text, err)


def test_reported_costs_steer_a_spend_target_by_the_bill(server, tmp_path: Path, typical_cost: float) -> None:
    """Two tenants with the same target and the same prompts; one reports bills five times what the
    router predicted for its chosen models, so its controller raises w (spends less per estimate),
    while reports on a model the decision did not choose leave the other's alone."""
    budgets = tmp_path / "budgets.yaml"
    target = 1000 * typical_cost
    _write(budgets, f"tenants:\n  billed: {{target_usd_per_1k: {target!r}}}\n"
                    f"  estimated: {{target_usd_per_1k: {target!r}}}\n")  # fmt: skip
    with (
        running_server(
            bundle=server.settings.bundle,
            budgets=budgets,
            spend_store=tmp_path / "spend.sqlite",
            feedback_store=f"sqlite:///{tmp_path / 'feedback.sqlite'}",
        ) as srv,
        router_stub(srv.address) as stub,
    ):
        for i in range(40):
            prompt = PROMPTS[i % len(PROMPTS)]
            billed, estimated = _route(stub, prompt, "billed"), _route(stub, prompt, "estimated")
            stub.Feedback(
                router_pb2.FeedbackRequest(
                    decision_id=billed.decision_id, score=1.0, cost_usd=5 * _cost(billed)
                ),
                timeout=30,
            )
            other = next(e for e in estimated.estimates if e.model != estimated.model)
            stub.Feedback(
                router_pb2.FeedbackRequest(
                    decision_id=estimated.decision_id,
                    model=other.model,
                    score=1.0,
                    cost_usd=5 * other.cost_usd,
                ),
                timeout=30,
            )
        billed, estimated = _route(stub, PROMPTS[0], "billed"), _route(stub, PROMPTS[0], "estimated")
    assert billed.cost_weight > 3 * estimated.cost_weight, (billed.cost_weight, estimated.cost_weight)


def test_explored_calls_of_a_tenant_with_a_target_book_the_model_served(
    server, tmp_path: Path, typical_cost: float
) -> None:
    """Exploration serves a model other than the greedy one; the ledger books and steers on the
    one served (it booked the greedy choice's cost, so a target drifted by what exploring spent)."""
    budgets = tmp_path / "budgets.yaml"
    _write(budgets, f"tenants:\n  steered: {{target_usd_per_1k: {1000 * typical_cost!r}}}\n")
    settings = {"budgets": budgets, "spend_store": tmp_path / "spend.sqlite", "explore": 1.0}
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        responses = [_route(stub, PROMPTS[i % len(PROMPTS)], "steered") for i in range(24)]
        booked = srv.server.metrics.tenant_spend.labels(tenant="steered")._value.get()
    assert all(r.reason.startswith("exploration:") for r in responses)
    greedy = [max(r.estimates, key=lambda e: e.utility) for r in responses]
    assert sum(g.model != r.model for g, r in zip(greedy, responses, strict=True)) >= 6
    assert booked == pytest.approx(sum(_cost(r) for r in responses), rel=1e-9)


def test_a_spend_store_that_cannot_be_written_fails_only_the_budgeted_calls(server, tmp_path: Path) -> None:
    """Another process holds the spend store's write lock. The budgeted call cannot be booked, so
    it is UNAVAILABLE; a plain call is answered (before, the unwritten spend stayed pending and every
    later batch, of every tenant, failed INTERNAL, and later still waited sqlite's 5 s on every
    batch while the event loop waited on the ledger, so plain calls and health checks ran past
    their deadlines); once the lock goes, the spend is written."""
    import sqlite3

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    budgets, store = tmp_path / "budgets.yaml", tmp_path / "spend.sqlite"
    _write(budgets, "tenants:\n  capped: {limit_usd: 1000.0}\n")
    settings = {"budgets": budgets, "spend_store": store}
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        _route(stub, PROMPTS[0], "capped")
        holder = sqlite3.connect(store, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(grpc.RpcError) as info:
                _route(stub, PROMPTS[1], "capped")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "spend store" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:  # just after a failure, the store is not waited on
                _route(stub, PROMPTS[2], "capped")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "tried again" in info.value.details()
            errors = srv.server.metrics.registry.get_sample_value
            assert errors("router_spend_store_errors_total", {"op": "write"}) == 1  # tried once only
            for prompt in PROMPTS:  # the default tenant books nothing, and does not wait on the store
                assert stub.Route(router_pb2.RouteRequest(prompt=prompt), timeout=2.5).model
            with grpc.insecure_channel(srv.address) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2.5
                )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert route_once_the_store_is_retried(
            stub, router_pb2.RouteRequest(prompt=PROMPTS[3], tenant="capped")
        ).model
        assert _route(stub, PROMPTS[2]).model
    with sqlite3.connect(store) as db:
        (calls,) = db.execute("SELECT SUM(calls) FROM spend WHERE tenant = 'capped'").fetchone()
    assert calls == 3  # the refused call's predicted cost stays booked: a cap errs on the safe side


def test_spend_acted_on_survives_sigkill(small_bundle: Path, tmp_path: Path) -> None:
    """Every decision's spend is in the store before its answer leaves: kill -9, then count."""
    import sqlite3

    from tests.helpers import killed_afterwards

    budgets, store = tmp_path / "budgets.yaml", tmp_path / "spend.sqlite"
    _write(budgets, "tenants:\n  durable: {limit_usd: 1000.0}\n")
    with killed_afterwards(small_bundle, "--budgets", str(budgets), "--spend-store", str(store)) as stub:
        costs = [_cost(_route(stub, PROMPTS[i % len(PROMPTS)], "durable")) for i in range(25)]
    with sqlite3.connect(store) as db:
        spent, calls = db.execute(
            "SELECT SUM(spent_usd), SUM(calls) FROM spend WHERE tenant = 'durable'"
        ).fetchone()
    assert calls == 25 and spent == pytest.approx(sum(costs), rel=1e-9)


def test_calls_whose_deadline_passes_during_their_run_book_no_spend(server, tmp_path: Path) -> None:
    """A batch of long prompts gathered for 20 ms, with deadlines that pass while the engine runs:
    the callers get DEADLINE_EXCEEDED and the tenant is charged only for the calls answered."""
    budgets = tmp_path / "budgets.yaml"
    _write(budgets, "tenants:\n  hurried: {limit_usd: 1000.0}\n")
    settings = {"budgets": budgets, "spend_store": tmp_path / "s.sqlite", "max_batch_wait_ms": 20.0}
    prompt = " ".join(PROMPTS) * 12  # the embedder reads its whole window
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        _route(stub, prompt, "warm-up")
        request = router_pb2.RouteRequest(prompt=prompt, tenant="hurried")
        calls = [stub.Route.future(request, timeout=0.1) for _ in range(32)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        _route(stub, prompt, "after")  # runs after the batch of those calls has finished
        metrics = srv.server.metrics
        batches = metrics.registry.get_sample_value("router_batch_size_count")
        booked = metrics.tenant_calls.labels(tenant="hurried")._value.get()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes and batches >= 3  # they reached the engine
    assert booked == codes.count(grpc.StatusCode.OK)


def test_a_spend_controller_resumes_across_a_restart_where_it_stopped(
    server, tmp_path: Path, typical_cost: float
) -> None:
    """The same calls, once through one process and once with a restart halfway: the w each call
    is given is the same, so the restart kept the controller's whole state, not only its w."""
    budgets = tmp_path / "budgets.yaml"
    _write(budgets, f"tenants:\n  steered: {{target_usd_per_1k: {500 * typical_cost!r}}}\n")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(24)]

    def weights(store: Path, calls: list[str]) -> list[float]:
        with (
            running_server(bundle=server.settings.bundle, budgets=budgets, spend_store=store) as srv,
            router_stub(srv.address) as stub,
        ):
            return [_route(stub, p, "steered").cost_weight for p in calls]

    once = weights(tmp_path / "once.sqlite", prompts)
    restarted = weights(tmp_path / "twice.sqlite", prompts[:12])
    restarted += weights(tmp_path / "twice.sqlite", prompts[12:])
    assert len(set(once)) > 3, "the controller moved w"
    assert restarted == pytest.approx(once, rel=1e-12)


def test_reported_costs_after_the_last_call_are_kept_at_shutdown(server, tmp_path: Path) -> None:
    """The controller's state was written only with a batch's spend, so the reported costs that
    came after a tenant's last call were lost at shutdown, and the restart steered without them."""
    import sqlite3

    budgets, store = tmp_path / "budgets.yaml", tmp_path / "spend.sqlite"
    _write(budgets, "tenants:\n  billed: {target_usd_per_1k: 1.0}\n")
    settings = {
        "budgets": budgets,
        "spend_store": store,
        "feedback_store": f"sqlite://{tmp_path / 'f.sqlite'}",
    }
    with running_server(bundle=server.settings.bundle, **settings) as srv, router_stub(srv.address) as stub:
        routed = [_route(stub, p, "billed") for p in PROMPTS]
        for r in routed:
            request = router_pb2.FeedbackRequest(decision_id=r.decision_id, score=1.0, cost_usd=2 * _cost(r))
            assert stub.Feedback(request, timeout=30).recorded
    with sqlite3.connect(store) as db:
        reported, predicted = db.execute(
            "SELECT reported_usd, predicted_usd FROM controller WHERE tenant = 'billed'"
        ).fetchone()
    assert predicted > 0 and reported == pytest.approx(2 * predicted, rel=1e-6)


def test_a_spend_store_written_before_controller_state_was_kept_opens_and_prunes(tmp_path: Path) -> None:
    import sqlite3

    from router.core.spend_control import ControllerState
    from router.serving.spend_store import SqliteSpendStore as SpendStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the layout of the first release
        db.execute(
            "CREATE TABLE spend (tenant TEXT NOT NULL, window_start INTEGER NOT NULL, "
            "spent_usd REAL NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (tenant, window_start))"
        )
        db.execute("CREATE TABLE controller (tenant TEXT PRIMARY KEY, cost_weight REAL NOT NULL)")
        db.execute("INSERT INTO controller VALUES ('old', 0.25)")
        db.executemany("INSERT INTO spend VALUES ('old', ?, 1.5, 3)", [(0,), (86400,), (172800,)])
    db.close()
    store = SpendStore(path)
    assert store.controllers() == {"old": ControllerState(0.25, None, 0.0, 0.0)}
    store.add({("old", 172800): (0.5, 1)}, {"new": ControllerState(0.1, 0.002, 0.3, 0.2)})
    assert store.prune(86400) == 1
    assert store.spend() == {("old", 86400): 1.5, ("old", 172800): 2.0}
    store.close()
    store = SpendStore(path)
    assert store.controllers()["new"] == ControllerState(0.1, 0.002, 0.3, 0.2)
    store.close()
