"""The dashboard and the alert rules as files: every alert points at a panel that shows its signal and
at a runbook section that exists; the dashboard has the panels operators need and a sane layout."""

from __future__ import annotations

import re
from typing import Any

from tests.ops.support import (
    DEPLOY,
    OPERATIONS,
    alert_rules,
    dashboard_panels,
    load_dashboard,
    load_yaml,
    queried_metrics,
)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def test_every_alert_names_a_panel_that_shows_its_metrics_and_a_runbook_section() -> None:
    dashboard = load_dashboard()
    panels = {p["title"]: p for p in dashboard_panels(dashboard)}
    anchors = _anchors(OPERATIONS.read_text(encoding="utf-8"))
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        name, notes = rule["alert"], rule.get("annotations", {})
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        assert notes.get("summary") and notes.get("description"), f"{name}: summary and description"
        assert notes.get("dashboard_uid") == dashboard["uid"], name
        title = notes.get("dashboard_panel")
        assert title in panels, f"{name}: dashboard_panel {title!r} is not a panel title"
        shown = set().union(*(queried_metrics(t["expr"]) for t in panels[title]["targets"]))
        assert queried_metrics(rule["expr"]) & shown, f"{name}: panel {title!r} shows none of its metrics"
        page, _, anchor = notes.get("runbook", "").partition("#")
        assert page == "docs/OPERATIONS.md" and anchor in anchors, f"{name}: runbook {notes.get('runbook')}"


def test_the_required_alerts_exist() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "error ratio": "router_requests_total",
        "p99 latency": "histogram_quantile(0.99",
        "bundle load failures": 'router_bundle_loads_total{result="failure"}',
        "predicted spend": "router_predicted_spend_usd_total",
        "no traffic": "unless",
    }
    for what, needle in wanted.items():
        assert any(needle in e for e in exprs.values()), f"no alert on {what}"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = [t["expr"] for p in dashboard_panels(load_dashboard()) for t in p["targets"]]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    for q in ("0.5", "0.95", "0.99"):
        assert some(rf"histogram_quantile\({q}, sum by \(le\) \(rate\(router_request_duration_seconds_bucket")
        assert some(rf"histogram_quantile\({q}, sum by \(stage, le\) \(rate\(router_stage_duration_seconds")
    assert some(r"sum by \(code\) \(rate\(router_requests_total")
    assert some(r"sum by \(model\) \(rate\(router_decisions_total")
    assert some(r"sum by \(model\) \(rate\(router_predicted_spend_usd_total.*\* 60$")  # per minute
    assert some(r"router_batch_size_bucket")
    assert some(r"by \(version, precision\) \(router_bundle_info")
    assert some(r"router_bundle_loaded_timestamp_seconds")
    assert some(r"router_in_flight")
    assert some(r"process_resident_memory_bytes")


def test_dashboard_layout_ids_and_datasources() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "cost-aware-router"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    titles = [p["title"] for p in dashboard_panels(dashboard)]
    assert len(titles) == len(set(titles)), "duplicate panel titles (alerts name panels by title)"

    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"{panel['title']}: outside the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard_panels(dashboard):
        sources: list[Any] = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]

    # The variable's default is the data source that compose provisions.
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == source["uid"]
