"""Every Prometheus metric the service exports, in one place.

Label values come only from small fixed sets (gRPC method and code names, stage names), from the
loaded bundle (model names, its version) or from the budgets file (the tenants it configures):
never from prompt text or other caller input.
The dashboards and alert rules in deploy/ query exactly these names (a contract test checks it).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# Latency buckets from 0.5 ms to 2.5 s: the embedder alone takes milliseconds on a CPU.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("queue", "embed", "heads", "policy")
FALLBACK_KINDS = ("cheapest", "rejected")
# not_yet: the decision is not in the store yet (UNAVAILABLE, retry): made moments ago, perhaps by
# another replica, or waiting in this one's queue while the store's writes fail
FEEDBACK_RESULTS = ("recorded", "duplicate", "not_found", "not_yet", "invalid", "overloaded")
STORE_OPS = ("record", "outcome", "sync", "purge")
# read: a batch's hold of the spend replicas share; write: a batch's spend; prune: old windows
SPEND_STORE_OPS = ("read", "write", "prune")
ROUTER_METHODS = (
    "/router.v1.Router/Route",
    "/router.v1.Router/ListModels",
    "/router.v1.Router/Info",
    "/router.v1.Router/Feedback",
)


class Metrics:
    """Owns a registry so that tests and several servers in one process do not collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co., read by `router bench`
        self.requests = Counter(
            "router_requests",
            "Unary gRPC calls by method and status code (health checks included; streaming calls, "
            "such as health Watch, are not counted).",
            ["method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "router_request_duration_seconds",
            "Whole-call latency as the server sees it.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "router_stage_duration_seconds",
            "Time per stage of a Route call: queue (waiting for the engine), embed (tokenize + "
            "encoder, per batch), heads (features + heads + pricing, per batch), policy (per call: the "
            "decision, with the tenant's budget and exploration).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "router_batch_size", "Prompts per embedder/heads run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.decisions = Counter(
            "router_decisions", "Route decisions by chosen model.", ["model"], registry=r
        )
        self.predicted_spend = Counter(
            "router_predicted_spend_usd",
            "Sum of the predicted cost of the chosen models, USD.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge("router_in_flight", "Route calls admitted and not yet answered.", registry=r)
        self.max_in_flight = Gauge(
            "router_max_in_flight",
            "The in-flight limit: beyond it Route answers RESOURCE_EXHAUSTED.",
            registry=r,
        )
        self.bundle_info = Gauge(
            "router_bundle_info", "The active bundle (value 1).", ["version", "precision"], registry=r
        )
        self.bundle_loaded = Gauge(
            "router_bundle_loaded_timestamp_seconds",
            "When the active bundle was loaded (Unix time).",
            registry=r,
        )
        self.bundle_loads = Counter(
            "router_bundle_loads",
            "Bundle load attempts by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.provider_info = Gauge(
            "router_execution_provider_info",
            "ONNX Runtime execution provider of the embedder (value 1).",
            ["provider"],
            registry=r,
        )
        # Per tenant: only tenants the budgets file configures (a small, operator-chosen set).
        self.tenant_calls = Counter(
            "router_tenant_calls", "Route decisions per configured tenant.", ["tenant"], registry=r
        )
        self.tenant_spend = Counter(
            "router_tenant_spend_usd",
            "Predicted cost of the chosen models per configured tenant, USD.",
            ["tenant"],
            registry=r,
        )
        self.tenant_target = Gauge(
            "router_tenant_target_usd_per_1k",
            "A tenant's spend target, USD per 1,000 calls.",
            ["tenant"],
            registry=r,
        )
        self.tenant_cost_weight = Gauge(
            "router_tenant_cost_weight",
            "The w a tenant's spend controller applies now.",
            ["tenant"],
            registry=r,
        )
        self.tenant_cost_correction = Gauge(
            "router_tenant_cost_correction",
            "Reported over predicted cost of a tenant's decisions, as its spend controller scales "
            "predictions by it (1 without cost feedback).",
            ["tenant"],
            registry=r,
        )
        self.tenant_cap = Gauge(
            "router_tenant_cap_usd", "A tenant's hard spend limit per window, USD.", ["tenant"], registry=r
        )
        self.tenant_cap_remaining = Gauge(
            "router_tenant_cap_remaining_usd",
            "What is left of a tenant's hard limit in the current window, USD.",
            ["tenant"],
            registry=r,
        )
        self.tenant_fallbacks = Counter(
            "router_tenant_fallbacks",
            "Calls of a tenant past its cap: routed to the cheapest allowed model, or rejected.",
            ["tenant", "kind"],
            registry=r,
        )
        self.budget_reloads = Counter(
            "router_budget_reloads",
            "Budgets file reloads by result (success, failure: refused, the previous file stays).",
            ["result"],
            registry=r,
        )
        self.spend_store_errors = Counter(
            "router_spend_store_errors",
            "Spend store operations that failed, by operation (read, write, prune).",
            ["op"],
            registry=r,
        )
        self.decisions_logged = Counter(
            "router_feedback_decisions_logged",
            "Decisions written to the feedback store.",
            registry=r,
        )
        self.feedback_dropped = Counter(
            "router_feedback_decisions_dropped",
            "Decisions dropped before reaching the feedback store: its queue was full (the store is "
            "down or too slow), or the store refused the record itself.",
            registry=r,
        )
        self.feedback_outcomes = Counter(
            "router_feedback_outcomes",
            "Feedback calls by result (recorded, duplicate, not_found, not_yet, invalid, overloaded).",
            ["result"],
            registry=r,
        )
        self.feedback_store_seconds = Histogram(
            "router_feedback_store_duration_seconds",
            "Time per feedback store operation (record: a batch of decisions; outcome; sync).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback_store_errors = Counter(
            "router_feedback_store_errors",
            "Feedback store operations that failed, by operation.",
            ["op"],
            registry=r,
        )
        self.online_memory = Gauge(
            "router_online_memory_outcomes",
            "Outcomes in the online memory the estimates consult.",
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for result in FEEDBACK_RESULTS:
            self.feedback_outcomes.labels(result=result)
        for op in STORE_OPS:
            self.feedback_store_seconds.labels(op=op)
            self.feedback_store_errors.labels(op=op)
        for op in SPEND_STORE_OPS:
            self.spend_store_errors.labels(op=op)
        # Series exist from the start, so the first call after a restart is already a rate increase.
        for method in ROUTER_METHODS:
            self.requests.labels(method=method, code="OK")
            self.request_seconds.labels(method=method)
        for result in ("success", "failure"):
            self.bundle_loads.labels(result=result)
            self.budget_reloads.labels(result=result)

    def set_bundle(self, version: str, precision: str, models: tuple[str, ...], loaded_at: float) -> None:
        self.bundle_info.clear()
        self.bundle_info.labels(version=version, precision=precision).set(1)
        self.bundle_loaded.set(loaded_at)
        for model in models:  # so that every model's series exists from the start
            self.decisions.labels(model=model)
            self.predicted_spend.labels(model=model)

    def record_decision(self, model: str, predicted_cost_usd: float) -> None:
        self.decisions.labels(model=model).inc()
        self.predicted_spend.labels(model=model).inc(predicted_cost_usd)

    def configure_tenant(self, tenant: str, target_usd_per_1k: float | None, limit_usd: float | None) -> None:
        self.tenant_calls.labels(tenant=tenant)
        self.tenant_spend.labels(tenant=tenant)
        for kind in FALLBACK_KINDS:
            self.tenant_fallbacks.labels(tenant=tenant, kind=kind)
        for gauge, value in ((self.tenant_target, target_usd_per_1k), (self.tenant_cap, limit_usd)):
            if value is None:
                _forget(gauge, tenant=tenant)
            else:
                gauge.labels(tenant=tenant).set(value)
        if limit_usd is None:
            _forget(self.tenant_cap_remaining, tenant=tenant)
        if target_usd_per_1k is None:
            _forget(self.tenant_cost_weight, tenant=tenant)
            _forget(self.tenant_cost_correction, tenant=tenant)

    def forget_tenant(self, tenant: str) -> None:
        for metric in (
            self.tenant_calls,
            self.tenant_spend,
            self.tenant_target,
            self.tenant_cost_weight,
            self.tenant_cost_correction,
            self.tenant_cap,
            self.tenant_cap_remaining,
        ):
            _forget(metric, tenant=tenant)
        for kind in FALLBACK_KINDS:
            _forget(self.tenant_fallbacks, tenant=tenant, kind=kind)

    def set_provider(self, provider: str) -> None:
        self.provider_info.clear()
        self.provider_info.labels(provider=provider).set(1)


def _forget(metric: Counter | Gauge, **labels: str) -> None:
    """Removes a label set if it exists (a tenant the budgets file no longer configures)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels.values())
