"""Per-tenant budgets at decision time: allow-lists, spend targets, hard caps, and their spend.

Runs in the engine thread, one decision after another in batch order, so a cap holds even when a
tenant's calls share a batch. For a tenant the budgets file configures:

- allow-list: the tenant's `allowed_models` bound what a request may ask for (admission);
- spend target: unless the request gives its own `cost_weight` or `preset`, its w comes from the
  tenant's spend controller (router/core/spend_control.py), which every decision then updates with
  its predicted cost;
- hard cap: at most `limit_usd` of predicted spend per window of `window_s` (windows aligned to the
  Unix epoch: daily windows start at 00:00 UTC). While budget remains, the decision is made among
  the allowed models predicted to cost at most what is left, with the request's own ceilings
  (max_cost_usd, max_latency_ms) and their fallback applied within them: the cap is not one more
  ceiling to trade off. Once it is spent, or when no allowed model fits in what is left,
  `on_exhausted: cheapest` routes to the cheapest allowed model, `reject` refuses the call
  (RESOURCE_EXHAUSTED). The cap holds whatever the request asks.

Spend, for the caps, is the predicted cost of the chosen model, known when the decision is made.
It is written to the spend store after each batch and read back at start-up, with each spend
controller's state, so that a restart neither resets a cap nor restarts a controller from its
first guess. A call whose spend cannot be written is not answered (UNAVAILABLE); its predicted
cost stays booked, so a cap errs on the safe side. For RETRY_AFTER_S after the store fails,
budgeted calls fail at once. With a store the replicas share, each batch first locks and reads
its capped tenants' windows (hold), so that what is left counts every replica's spend. The
spend target steers by the reported cost where outcome feedback brings one (`reported_cost`):
its controller scales predictions by what callers report against what was predicted. Spend of
windows that started more than RETENTION_S (or two of the longest configured windows) ago is
dropped, from memory and store, at start-up and hourly after.
Tenants the file does not configure are routed as if there were no budgets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from router.core.engine import Engine, Estimates
from router.core.errors import BudgetExhausted, InvalidRequest, Misconfigured, StoreUnavailable
from router.core.policy import Decision, Explore, Preferences
from router.core.spend_control import SpendController, initial_cost_weight
from router.serving.budgets import BudgetsWatch, TenantBudget
from router.serving.metrics import Metrics
from router.serving.spend_store import Key, SpendStore, SpendStoreError, open_spend_store

log = logging.getLogger(__name__)

RETENTION_S = 7 * 86400
PRUNE_EVERY_S = 3600.0
# After the spend store fails, budgeted calls fail at once for this long instead of each batch
# waiting out the store's timeout again, which would hold up every call queued behind it.
RETRY_AFTER_S = 1.0


def window_start(now: float, window_s: float) -> int:
    return int(math.floor(now / window_s) * window_s)


class Ledger:
    def __init__(
        self,
        watch: BudgetsWatch,
        store: SpendStore,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.watch = watch
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._pruned_at = -math.inf
        self._prune_store()
        self._spent = store.spend()
        self._saved = store.controllers()
        self._controllers: dict[str, SpendController] = {}
        self._pending: dict[tuple[str, int], tuple[float, int]] = {}
        self._unread: str | None = None  # why this batch could not read the shared spend
        self._now: float | None = None  # the batch's time, one window for its hold and decisions
        self._failed_at = -math.inf  # time.monotonic() of the store's last failure
        self._reported = False  # a controller took a reported cost since the last flush
        self._configured: set[str] = set()
        self._warned: set[tuple[str, tuple[str, ...]]] = set()  # allow-lists naming unknown models
        # decisions run in the engine thread, reloads on the event loop: one at a time
        self._lock = threading.RLock()
        self._apply()

    # -- the file ----------------------------------------------------------------------------

    def reload_if_changed(self) -> None:
        # The file is looked at without the lock: the engine thread may hold it for as long as a
        # spend write waits, and this runs on the event loop, which must keep answering meanwhile.
        changed = self.watch.reload_if_changed()
        if changed is not None:
            self.metrics.budget_reloads.labels(result="success" if changed else "failure").inc()
        if changed:
            with self._lock:
                self._apply()

    def _apply(self) -> None:
        """Metric series for the configured tenants; controllers for new or changed targets."""
        budgets = self.watch.budgets.tenants
        for gone in self._configured - set(budgets):
            self.metrics.forget_tenant(gone)
            self._controllers.pop(gone, None)
        self._configured = set(budgets)
        for name, budget in budgets.items():
            self.metrics.configure_tenant(name, budget.target_usd_per_1k, budget.limit_usd)
            controller = self._controllers.get(name)
            if budget.target_usd_per_1k is None:
                self._controllers.pop(name, None)
            elif controller is not None:
                controller.target_usd_per_call = budget.target_usd_per_1k / 1000.0
        self._update_gauges()

    def budget(self, tenant: str) -> TenantBudget | None:
        return self.watch.budgets.tenants.get(tenant)

    # -- admission ---------------------------------------------------------------------------

    def allowed_models(self, tenant: str, asked: Sequence[str], models: Sequence[str]) -> tuple[str, ...]:
        """What the call may choose from: its own allowed_models within the tenant's allow-list."""
        budget = self.budget(tenant)
        if budget is None or budget.allowed_models is None:
            return tuple(asked)
        permitted = [m for m in budget.allowed_models if m in set(models)]
        missing = tuple(m for m in budget.allowed_models if m not in set(models))
        if missing and (tenant, missing) not in self._warned:
            self._warned.add((tenant, missing))
            log.warning(
                "budgets file: tenants.%s.allowed_models names %s, not in the bundle served",
                tenant,
                ", ".join(repr(m) for m in missing),
            )
        if not permitted:
            raise Misconfigured(
                f"tenant {tenant!r}: none of its allowed_models in the budgets file is in the bundle served"
            )
        outside = [m for m in asked if m not in set(permitted)]
        if outside:
            raise InvalidRequest(
                "allowed_models", f"{outside[0][:128]!r} is not allowed for tenant {tenant!r}"
            )
        return tuple(asked) or tuple(permitted)

    # -- decisions (engine thread) -------------------------------------------------------------

    def hold(self, tenants: Iterable[str]) -> None:
        """Before a batch's decisions: where replicas share the spend store, locks the current
        window of each capped tenant among `tenants` until the batch's flush or release, and takes
        what every replica has spent in it. If the store cannot be read, the batch's capped calls
        fail (StoreUnavailable) and the others are decided as usual."""
        with self._lock:
            now = self._now = self.clock()
            keys: set[Key] = set()
            for tenant in tenants:
                budget = self.budget(tenant)
                if budget is not None and budget.limit_usd is not None:
                    keys.add((tenant, window_start(now, budget.window_s)))
            if not keys:
                return
            if (why := self._failing()) is not None:
                self._unread = why
                return
            try:
                shared = self.store.hold(keys)
            except SpendStoreError as exc:
                self.metrics.spend_store_errors.labels(op="read").inc()
                log.warning("the spend store cannot be read: %s", exc)
                if not exc.contended:  # a row held too long fails this batch only
                    self._failed_at = time.monotonic()
                self._unread = "the spend store cannot be read (the server log says why)"
                return
            for key, spent in shared.items():
                # what this replica booked but could not write yet is not in the store
                self._spent[key] = spent + self._pending.get(key, (0.0, 0))[0]

    def release(self) -> None:
        """After a batch: lets go of what hold() locked, if the flush did not write it."""
        with self._lock:
            self._unread, self._now = None, None
            try:
                self.store.release()
            except SpendStoreError as exc:  # pragma: no cover - a rollback on a broken connection
                log.error("the spend store: %s", exc)

    def decide(
        self,
        engine: Engine,
        estimates: Estimates,
        row: int,
        prefs: Preferences,
        tenant: str,
        explicit_weight: bool,
        explore: Explore | None = None,
    ) -> tuple[Decision, float]:
        """The tenant's decision and its propensity. `explore` (the service's exploration rule)
        applies before the booking, so that the spend booked and steered on is what is served;
        never for a tenant with a hard cap, whose every call must stay within what is left."""
        with self._lock:
            budget = self.budget(tenant)
            if budget is None:  # pragma: no cover - the service only asks for configured tenants
                return engine.decide_row(estimates, row, prefs), 1.0
            controller = self._controller(tenant, budget, engine)
            if controller is not None and not explicit_weight:
                prefs = dataclasses.replace(prefs, cost_weight=controller.cost_weight)
            note = ""
            # one window for the hold, the check and the booking, even at its boundary
            now = self._now if self._now is not None else self.clock()
            if budget.limit_usd is not None:
                prefs, note = self._within_cap(tenant, budget, estimates, row, prefs, now)
            decision, propensity = engine.decide_row(estimates, row, prefs), 1.0
            if explore is not None and budget.limit_usd is None:
                decision, propensity = explore(decision)
            cost = decision.chosen.estimate.cost_usd
            self._record(tenant, budget, cost, controller, now)
            if note:
                decision = dataclasses.replace(decision, reason=note + decision.reason)
            return decision, propensity

    def _within_cap(
        self,
        tenant: str,
        budget: TenantBudget,
        estimates: Estimates,
        row: int,
        prefs: Preferences,
        now: float,
    ) -> tuple[Preferences, str]:
        """The preferences a capped tenant's call is decided with, and the note its reason starts
        with; BudgetExhausted where `reject` applies."""
        assert budget.limit_usd is not None
        if self._unread is not None:
            raise StoreUnavailable(self._unread)
        window = window_start(now, budget.window_s)
        remaining = budget.limit_usd - self._spent.get((tenant, window), 0.0)
        allowed = [
            (m, float(estimates.cost_usd[row, j]))
            for j, m in enumerate(estimates.models)
            if prefs.allowed_models is None or m in prefs.allowed_models
        ]
        if not allowed:  # the policy refuses this the way it refuses any such request
            return prefs, ""
        fits = frozenset(m for m, cost in allowed if cost <= remaining)
        if remaining > 0 and fits:
            note = f"among the models within what tenant {tenant!r} has left ({remaining:.3g} USD); "
            return dataclasses.replace(prefs, allowed_models=fits), note
        if remaining > 0:
            cheapest = min(cost for _, cost in allowed)
            why = (
                f"tenant {tenant!r} has {remaining:.3g} USD left this window; the cheapest allowed "
                f"model is predicted to cost {cheapest:.3g} USD"
            )
        else:
            why = f"tenant {tenant!r} has spent its {budget.limit_usd:g} USD for this window"
        if budget.on_exhausted == "reject":
            self.metrics.tenant_fallbacks.labels(tenant=tenant, kind="rejected").inc()
            resets = f" (resets at {window + budget.window_s:.0f}, Unix time)"
            raise BudgetExhausted(why + resets)
        self.metrics.tenant_fallbacks.labels(tenant=tenant, kind="cheapest").inc()
        return Preferences(cost_weight=1.0, allowed_models=prefs.allowed_models), why + "; "

    def reported_cost(self, tenant: str, predicted_usd: float, reported_usd: float) -> None:
        """A caller's reported cost for one of the tenant's decisions (from outcome feedback)."""
        with self._lock:
            controller = self._controllers.get(tenant)
            if controller is not None:
                controller.report(predicted_usd, reported_usd)
                self._reported = True

    def _controller(self, tenant: str, budget: TenantBudget, engine: Engine) -> SpendController | None:
        if budget.target_usd_per_1k is None:
            return None
        controller = self._controllers.get(tenant)
        if controller is None:
            target = budget.target_usd_per_1k / 1000.0
            saved = self._saved.get(tenant)
            if saved is not None:
                controller = SpendController.resume(target, saved)
            else:
                start = initial_cost_weight(
                    engine.policy.spend_curve, target, engine.policy.default_cost_weight
                )
                controller = SpendController(target, start)
            self._controllers[tenant] = controller
        return controller

    def _record(
        self,
        tenant: str,
        budget: TenantBudget,
        cost: float,
        controller: SpendController | None,
        now: float,
    ) -> None:
        window = window_start(now, budget.window_s if budget.limit_usd is not None else 86400.0)
        key = (tenant, window)
        self._spent[key] = self._spent.get(key, 0.0) + cost
        usd, calls = self._pending.get(key, (0.0, 0))
        self._pending[key] = (usd + cost, calls + 1)
        if controller is not None:
            controller.observe(cost)
        self.metrics.tenant_calls.labels(tenant=tenant).inc()
        self.metrics.tenant_spend.labels(tenant=tenant).inc(cost)

    def flush(self, wait: bool = False) -> None:
        """Writes the spend of the decisions since the last flush (engine thread, once per batch).
        StoreUnavailable if it cannot, or if the store failed less than RETRY_AFTER_S ago (unless
        `wait`): the spend stays booked and pending, and is written with the next flush that can."""
        with self._lock:
            if not self._pending and not self._reported:
                return
            if not wait and (why := self._failing()) is not None:
                raise StoreUnavailable(why)
            # only what changed: with a shared store every row written is a row locked
            states = {t: c.state for t, c in self._controllers.items() if self._saved.get(t) != c.state}
            try:
                self.store.add(self._pending, states)
            except SpendStoreError as exc:  # kept pending, for the next flush
                self.metrics.spend_store_errors.labels(op="write").inc()
                log.warning("the spend store cannot be written: %s", exc)
                if not exc.contended:
                    self._failed_at = time.monotonic()
                # the details (a host, a user, a database) are for the operator, not the caller
                raise StoreUnavailable("the spend store cannot be written (the server log says why)") from exc
            self._pending, self._reported = {}, False
            self._saved |= states
            if self.clock() - self._pruned_at >= PRUNE_EVERY_S:
                before = self._prune_store()
                self._spent = {k: v for k, v in self._spent.items() if k[1] >= before}
            self._update_gauges()

    def _failing(self) -> str | None:
        since = time.monotonic() - self._failed_at
        if since >= RETRY_AFTER_S:
            return None
        return f"the spend store failed {since:.2f} s ago; it is tried again {RETRY_AFTER_S:g} s after"

    def _prune_store(self) -> int:
        """Drops spend too old for any configured window; the oldest window start kept. A prune
        that fails is logged and tried again an hour later: old windows are only clutter."""
        now = self.clock()
        longest = max((b.window_s for b in self.watch.budgets.tenants.values()), default=0.0)
        before = int(now - max(RETENTION_S, 2 * longest))
        try:
            self.store.prune(before)
        except SpendStoreError as exc:
            self.metrics.spend_store_errors.labels(op="prune").inc()
            log.error("the spend store's old windows were not deleted: %s", exc)
        self._pruned_at = now
        return before

    def _update_gauges(self) -> None:
        now = self.clock()
        for name, budget in self.watch.budgets.tenants.items():
            controller = self._controllers.get(name)
            if controller is not None:
                self.metrics.tenant_cost_weight.labels(tenant=name).set(controller.cost_weight)
                self.metrics.tenant_cost_correction.labels(tenant=name).set(controller.correction)
            if budget.limit_usd is not None:
                spent = self._spent.get((name, window_start(now, budget.window_s)), 0.0)
                self.metrics.tenant_cap_remaining.labels(tenant=name).set(max(budget.limit_usd - spent, 0.0))

    def close(self) -> None:
        """Writes what the last batch left (reported costs arrive after it), then closes the store."""
        try:
            self.flush(wait=True)
        except StoreUnavailable as exc:
            log.error("%s; at shutdown", exc)
        self.store.close()


def open_ledger(budgets: Path, spend_store: str, metrics: Metrics) -> Ledger:
    """The ledger for a budgets file; a file that does not validate, or a spend store that cannot
    be opened, stops the start-up."""
    return Ledger(BudgetsWatch(budgets), open_spend_store(spend_store), metrics)
