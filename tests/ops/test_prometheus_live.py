"""The dashboard and the alert rules against the real thing: the router serving a real bundle, a real
Prometheus scraping it with the shipped config and rules, real traffic.

Every query of every dashboard panel must parse and return data, every alert expression must parse
and evaluate, and a bundle the router refuses must fire the alert that says so, while callers' own
errors must not count as the router's.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.v1 import router_pb2, router_pb2_grpc
from tests.helpers import ServerThread, running_server
from tests.ops.support import (
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    ROUTE_METHOD,
    Prometheus,
    alert_rules,
    dashboard_panels,
    http_get,
    legend_labels,
    load_dashboard,
    run_prometheus,
    selector_labels,
    service_metric_names,
    substitute,
    variable_query,
)

PROMPTS = (
    "What is the capital of Australia?",
    "Prove that there are infinitely many prime numbers.",
    "Write a Python function that merges two sorted lists in linear time.",
    "Summarise the causes of the First World War in three sentences.",
    "Which enzyme unwinds DNA during replication?",
    "Translate 'the weather is lovely today' into Spanish and German.",
)
# From quality-only to cost-only, so that several models get chosen and spend differs by model.
COST_WEIGHTS = (0.0, 0.05, 0.2, 0.5, 0.9, 1.0)
INVALID_REQUESTS = (
    router_pb2.RouteRequest(prompt="   "),
    router_pb2.RouteRequest(prompt="Is this valid?", cost_weight=1.5),
    router_pb2.RouteRequest(prompt="Is this valid?", allowed_models=["no-such-model"]),
)
# Tenants of the budgets file the router runs with, so that the tenant panels have data.
TENANTS = ("team-steered", "team-capped")
BUDGETS = """
tenants:
  team-steered: {target_usd_per_1k: 0.2}
  team-capped: {limit_usd: 100.0, window_s: 3600}
"""
# What Grafana would put in for its built-in variables on a dashboard showing the last minutes:
# windows wide enough to hold every scrape since the test began (the scrape interval is 1 s).
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "5s", "__range": "5m", "__range_s": "300"}
SCRAPE_INTERVAL = "1s"


@dataclass
class Observed:
    """The router after the traffic, and the Prometheus that watched it."""

    server: ServerThread
    prometheus: Prometheus
    target: str  # the router's instance label
    route_calls: int
    invalid_calls: int


def _exported(server: ServerThread) -> list[Any]:
    text = http_get(f"http://127.0.0.1:{server.server.metrics_port}/metrics").decode()
    return list(text_string_to_metric_families(text))


def _sample(server: ServerThread, name: str, **labels: str) -> float:
    for family in _exported(server):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _point(link: Path, target: Path) -> None:
    """Atomic symlink swap, as an operator does on the bundle volume."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _write_config(workdir: Path, metrics_port: int) -> Path:
    """The shipped prometheus.yml, pointed at this router, scraping and evaluating every second.

    Only the router job is kept; rule_files stay as shipped (relative), and resolve here through a
    `rules` link to deploy/prometheus/rules, so that the test loads the rules the way compose does.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "router"]
    assert len(jobs) == 1, "the shipped config must have exactly one job named `router`"
    job = jobs[0]
    job["scrape_interval"] = SCRAPE_INTERVAL
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = [job]
    (workdir / "rules").symlink_to(PROMETHEUS_DIR / "rules", target_is_directory=True)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _drive_traffic(address: str) -> tuple[int, int]:
    """Route calls sent all at once (so that batches form), invalid ones, and the other methods."""
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        calls: list[Future[Any]] = [
            stub.Route.future(router_pb2.RouteRequest(prompt=p, cost_weight=w), timeout=60)
            for p in PROMPTS
            for w in COST_WEIGHTS
        ]
        calls += [
            stub.Route.future(router_pb2.RouteRequest(prompt=p, tenant=t), timeout=60)
            for p in PROMPTS
            for t in TENANTS
        ]
        for call in calls:
            assert call.result().model
        for call in calls[:: len(COST_WEIGHTS)]:  # outcome feedback for some of them
            request = router_pb2.FeedbackRequest(decision_id=call.result().decision_id, score=0.5)
            assert stub.Feedback(request, timeout=10).recorded
        for request in INVALID_REQUESTS:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Route(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        stub.Info(router_pb2.InfoRequest(), timeout=10)
    return len(calls) + len(INVALID_REQUESTS), len(INVALID_REQUESTS)


def _prime(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0]), timeout=60)
        for tenant in TENANTS:
            stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0], tenant=tenant), timeout=60)
        first = stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[1]), timeout=60)
        stub.Feedback(router_pb2.FeedbackRequest(decision_id=first.decision_id, score=1.0), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Route(INVALID_REQUESTS[0], timeout=10)
    return 3 + len(TENANTS), 1


def _refuse_a_bundle(server: ServerThread, link: Path, workdir: Path) -> None:
    """Points the watched path at a broken bundle and waits until the router has refused it."""
    broken = workdir / "broken-bundle"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"format_version": 1, "bundle_version": "broken"}))
    _point(link, broken)
    deadline = time.monotonic() + 30
    while _sample(server, "router_bundle_loads_total", result="failure") < 1:
        assert time.monotonic() < deadline, "the router never tried the broken bundle"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def observed(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("prometheus")
    link = workdir / "current"
    link.symlink_to(small_bundle, target_is_directory=True)
    budgets = workdir / "budgets.yaml"
    budgets.write_text(BUDGETS)
    settings = {
        "budgets": budgets,
        "spend_store": workdir / "spend.sqlite",
        "feedback_store": f"sqlite://{workdir / 'feedback.sqlite'}",
        "bundle_poll_s": 0.2,
    }
    with running_server(bundle=link, **settings) as server:
        config = _write_config(workdir, server.server.metrics_port)
        with run_prometheus(config, workdir) as prometheus:
            target = f"127.0.0.1:{server.server.metrics_port}"
            # rate() and increase() see a counter move only between two samples, and the router
            # creates a (method, code) series on its first such call: one OK and one invalid call
            # first, scraped, then the traffic the panels must show.
            primed_calls, primed_invalid = _prime(server.address)
            prometheus.wait_for(f'sum(router_requests_total{{method="{ROUTE_METHOD}"}}) >= {primed_calls}')
            route_calls, invalid_calls = _drive_traffic(server.address)
            route_calls += primed_calls
            invalid_calls += primed_invalid
            _refuse_a_bundle(server, link, workdir)
            prometheus.wait_for(f'sum(router_requests_total{{method="{ROUTE_METHOD}"}}) >= {route_calls}')
            prometheus.wait_for('router_bundle_loads_total{result="failure"} >= 1')
            time.sleep(2.5)  # two more scrapes and rule evaluations after the last change
            yield Observed(server, prometheus, target, route_calls, invalid_calls)


def _resolve_variables(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Grafana's built-ins, plus each query variable evaluated as Grafana would (label_values)."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            values[variable["name"]] = str(variable["current"]["value"])
            continue
        assert variable["type"] == "query", f"variable {variable['name']}: unsupported type"
        match = re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_]\w*)\)", variable_query(variable).strip())
        assert match, f"variable {variable['name']}: not a label_values() query"
        selector, label = substitute(match.group(1), values), match.group(2)
        answer = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success", answer
        found = answer["data"]
        assert found, f"variable {variable['name']} ({variable_query(variable)}) has no values"
        if variable.get("multi") or variable.get("includeAll"):
            # As Grafana does: regex-escaped, and the backslashes doubled for the PromQL string.
            values[variable["name"]] = "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in found) + ")"
        else:
            default = variable["current"]["value"]
            assert default in found, f"variable {variable['name']}: default {default!r} not among {found}"
            values[variable["name"]] = default
    return values


def test_every_dashboard_query_parses_and_shows_data(observed: Observed) -> None:
    dashboard = load_dashboard()
    values = _resolve_variables(observed.prometheus, dashboard)
    problems: list[str] = []
    checked = 0
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            where = f"panel {panel['title']!r} query {target['refId']}"
            answer = observed.prometheus.query(expr)
            checked += 1
            if answer.get("status") != "success":
                problems.append(f"{where}: {answer.get('error')} in {expr}")
                continue
            series = answer["data"]["result"]
            if not series:
                problems.append(f"{where}: no data for {expr}")
                continue
            if not any(math.isfinite(float(s["value"][1])) for s in series):
                problems.append(f"{where}: only NaN/Inf for {expr}")
            for label in legend_labels(target.get("legendFormat", "")):
                if any(label not in s["metric"] for s in series):
                    problems.append(f"{where}: legend names {{{{{label}}}}}, a label its series lack")
    assert checked >= 20, f"only {checked} panel queries found: is the dashboard JSON the right one?"
    assert not problems, "\n".join(problems)


def test_every_alert_expression_evaluates_and_prometheus_loaded_every_rule(observed: Observed) -> None:
    rules = alert_rules()
    for rule in rules:
        answer = observed.prometheus.query(rule["expr"])
        assert answer.get("status") == "success", f"{rule['alert']}: {answer.get('error')}"

    groups = observed.prometheus.api("rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}, "the shipped config did not load the shipped rules"
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert not rule["lastEvaluation"].startswith("0001-"), f"{name} was never evaluated"


def test_a_refused_bundle_fires_its_alert_and_callers_errors_do_not_count(observed: Observed) -> None:
    prometheus = observed.prometheus
    deadline = time.monotonic() + 15
    while True:
        alerts = prometheus.api("alerts")["data"]["alerts"]
        firing = {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}
        if "RouterBundleLoadFailed" in firing or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert set(firing) == {"RouterBundleLoadFailed"}, f"firing: {sorted(firing)}; all: {alerts}"
    alert = firing["RouterBundleLoadFailed"]
    assert alert["labels"]["instance"] == observed.target
    assert alert["annotations"]["summary"] == f"{observed.target} refused a new bundle"

    # The INVALID_ARGUMENT calls are visible by code, but the server-side error ratio stays 0 and
    # its alert is not even pending.
    dashboard = load_dashboard()
    panels = {p["title"]: p for p in dashboard_panels(dashboard)}
    values = _resolve_variables(prometheus, dashboard)

    def first_query(title: str) -> list[dict[str, Any]]:
        answer = prometheus.query(substitute(panels[title]["targets"][0]["expr"], values))
        return list(answer["data"]["result"])

    by_code = first_query("Route calls per second by status code")
    assert {s["metric"]["code"] for s in by_code} == {"OK", "INVALID_ARGUMENT"}
    ratio = first_query("Route error ratio (server-side codes)")
    assert [float(s["value"][1]) for s in ratio] == [0.0]
    assert "RouterHighErrorRatio" not in {a["labels"]["alertname"] for a in alerts}
    selector = f'code="INVALID_ARGUMENT", method="{ROUTE_METHOD}"'
    invalid = prometheus.query(f"sum(router_requests_total{{{selector}}})")
    assert float(invalid["data"]["result"][0]["value"][1]) == observed.invalid_calls


def test_dashboard_and_rules_name_only_what_the_service_exports(observed: Observed) -> None:
    """The contract with router/metrics.py, both ways: every metric and label queried exists, and
    every router_* family the service exports is shown somewhere on the dashboard."""
    families = _exported(observed.server)
    sample_labels: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            sample_labels.setdefault(sample.name, set()).update(sample.labels)
    target_labels = {"job", "instance"}  # added by Prometheus at scrape time

    dashboard_exprs = [t["expr"] for p in dashboard_panels(load_dashboard()) for t in p["targets"]]
    exprs = {f"dashboard: {e}": e for e in dashboard_exprs}
    exprs |= {f"rule {r['alert']}": r["expr"] for r in alert_rules()}
    for where, expr in exprs.items():
        for metric in service_metric_names(expr):
            assert metric in sample_labels, f"{where}: {metric} is not exported by the router"
        for metric, labels in selector_labels(expr).items():
            if metric in sample_labels:
                unknown = labels - sample_labels[metric] - target_labels
                assert not unknown, f"{where}: {metric} has no label(s) {sorted(unknown)}"

    shown = {m for e in dashboard_exprs for m in service_metric_names(e)}
    for family in families:
        # prometheus_client also exposes each counter's and histogram's creation time as *_created.
        if family.name.startswith("router_") and not family.name.endswith("_created"):
            assert any(s.name in shown for s in family.samples), f"no dashboard panel shows {family.name}"
