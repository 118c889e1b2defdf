"""The service: admission, micro-batching onto the engine, what it reports, and draining.

Knows nothing of protobuf or gRPC. Each call is validated against the bundle it was admitted under
and finishes on that bundle, even if the store swaps in a new one meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from router.core.decision_ids import new_decision_id
from router.core.engine import Engine, Estimated, Estimates
from router.core.errors import (
    DeadlineExceeded,
    FeedbackDisabled,
    NotReady,
    Overloaded,
    RouterError,
    StoreUnavailable,
)
from router.core.feedback_store import DecisionRecord
from router.core.manifest import ModelSpec, PresetSpec
from router.core.policy import Decision, Explore, Preferences, explore
from router.serving.batching import MicroBatcher
from router.serving.budgets import tenant_of
from router.serving.bundle_store import BundleStore
from router.serving.feedback import FeedbackQuery, FeedbackService
from router.serving.ledger import Ledger
from router.serving.metrics import Metrics
from router.serving.requests import Limits, RouteQuery, RouteResult, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Job:
    engine: Engine
    prompt: str
    prefs: Preferences
    submitted: float
    tenant: str
    explicit_weight: bool  # the caller gave cost_weight or preset: a spend target does not steer it


def _expire(future: asyncio.Future[RouteResult]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline passed before the route was computed"))


@dataclass(frozen=True)
class ServiceInfo:
    """What `Info` reports: the active bundle, the runtime and the limits."""

    bundle_version: str
    bundle_created_at: str
    bundle_loaded_at: float
    embedder_sha256: str
    embedding_dim: int
    default_cost_weight: float
    c_ref_usd: float
    presets: dict[str, PresetSpec]
    execution_provider: str
    limits: Limits


class RouterService:
    def __init__(
        self,
        store: BundleStore,
        limits: Limits,
        metrics: Metrics,
        *,
        ledger: Ledger | None = None,
        feedback: FeedbackService | None = None,
        explore: float = 0.0,
        store_prompts: bool = False,
        log_prompts: bool = False,
    ) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.ledger = ledger
        self.feedback = feedback
        self.explore = explore
        self.store_prompts = store_prompts
        self.log_prompts = log_prompts
        self._random = random.Random()  # exploration draws; their propensity is logged
        self._in_flight = 0
        self._reporting = 0  # Feedback calls waiting on their commit: a drain waits for them too
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        # One engine thread: ONNX Runtime already spreads a run over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._batcher: MicroBatcher[_Job, RouteResult] = MicroBatcher(
            self._run_batch,
            max_batch=limits.max_batch_size,
            max_wait_s=limits.max_batch_wait_s,
            executor=self._executor,
        )

    # -- calls -----------------------------------------------------------------------------

    async def route(self, query: RouteQuery, timeout_s: float | None = None) -> RouteResult:
        if not self._accepting:
            raise NotReady("shutting down")
        if self._in_flight >= self.limits.max_in_flight:
            raise Overloaded(f"more than {self.limits.max_in_flight} calls in flight; retry with backoff")
        engine = self.store.active.engine
        tenant = tenant_of(query.tenant)
        prefs = validate(query, engine, self.limits)  # what the caller asked, within the server's limits
        if self.ledger is not None and self.ledger.budget(tenant) is not None:
            allowed = self.ledger.allowed_models(tenant, query.allowed_models, engine.models)
            if allowed != query.allowed_models:  # the tenant's list, cut to the models served
                prefs = dataclasses.replace(prefs, allowed_models=frozenset(allowed))
        explicit = query.cost_weight is not None or bool(query.preset)
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self._in_flight)
        job = _Job(engine, query.prompt, prefs, time.perf_counter(), tenant, explicit)
        future = self._batcher.submit(job)
        # The deadline fails the future itself (the batcher then skips it): no task or waiter of
        # its own, which a lone call would pay for in event-loop turns.
        loop = asyncio.get_running_loop()
        expiry = None if timeout_s is None else loop.call_later(timeout_s, _expire, future)
        try:
            result = await future
        finally:
            if expiry is not None:
                expiry.cancel()
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            if self._in_flight == 0 and self._reporting == 0:
                self._idle.set()
        if self.log_prompts:  # opt-in only: prompts may hold secrets or personal data
            log.info("routed prompt %r -> %s", query.prompt[:2000], result.decision.model)
        return result

    def _run_batch(self, jobs: Sequence[_Job], waiting: Callable[[int], bool]) -> list[RouteResult]:
        try:
            return self._decide_batch(jobs, waiting)
        finally:
            if self.ledger is not None:
                self.ledger.release()  # what a batch locked of a shared spend store never outlives it

    def _decide_batch(self, jobs: Sequence[_Job], waiting: Callable[[int], bool]) -> list[RouteResult]:
        """Runs in the engine thread: one engine run per bundle present in the batch (a swap can
        leave calls admitted under the old bundle beside calls under the new one). A call whose
        caller stopped waiting during the run (`waiting`) is not decided: its tenant's spend is not
        booked and no decision is recorded for it."""
        started = time.perf_counter()
        m = self.metrics
        for job in jobs:
            m.stage_seconds.labels(stage="queue").observe(started - job.submitted)
        m.batch_size.observe(len(jobs))
        results: list[RouteResult | BaseException] = [None] * len(jobs)  # type: ignore[list-item]
        records: list[DecisionRecord] = []
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.engine), []).append(i)
        runs = []
        for idx in groups.values():
            engine = jobs[idx[0]].engine
            batch = engine.estimate_timed([jobs[i].prompt for i in idx])
            m.stage_seconds.labels(stage="embed").observe(batch.embed_s)
            m.stage_seconds.labels(stage="heads").observe(batch.heads_s)
            runs.append((engine, idx, batch))
        if self.ledger is not None:
            # once for the whole batch and after the engine runs: what it locks of a shared spend
            # store is held for the decisions and their write only
            self.ledger.hold(job.tenant for job in jobs)
        policy = m.stage_seconds.labels(stage="policy")
        for engine, idx, batch in runs:
            input_tokens = batch.estimates.input_tokens.tolist()
            for row, i in enumerate(idx):
                job = jobs[i]
                if not waiting(i):
                    results[i] = DeadlineExceeded("the caller stopped waiting before the decision")
                    continue
                deciding = time.perf_counter()
                try:
                    decision, propensity = self._decide(engine, batch.estimates, row, job)
                except RouterError as exc:  # this call only (a cap refusal)
                    results[i] = exc
                    continue
                except Exception as exc:  # a fault fails its own call, not the batch it shares
                    log.exception("deciding a call of tenant %r failed", job.tenant)
                    results[i] = exc
                    continue
                finally:
                    policy.observe(time.perf_counter() - deciding)
                decision_id = new_decision_id()
                results[i] = RouteResult(decision, engine.version, int(input_tokens[row]), decision_id)
                m.record_decision(decision.model, decision.chosen.estimate.cost_usd)
                if self.feedback is not None:
                    records.append(self._record(decision_id, job, engine, batch, row, decision, propensity))
        if self.ledger is not None:
            records = self._book(jobs, results, records)
        if self.feedback is not None:
            self.feedback.record(records)  # written off this thread, in the background
        return results  # type: ignore[return-value]

    def _book(
        self, jobs: Sequence[_Job], results: list[RouteResult | BaseException], records: list[DecisionRecord]
    ) -> list[DecisionRecord]:
        """Writes the batch's spend before its answers leave. Where the spend store cannot be
        written, the budgeted calls fail UNAVAILABLE (and their decisions are not logged) while the
        others are answered; the decisions logged are returned."""
        assert self.ledger is not None
        budgeted = [
            i
            for i, job in enumerate(jobs)
            if isinstance(results[i], RouteResult) and self.ledger.budget(job.tenant) is not None
        ]
        if not budgeted:  # nothing of this batch to book: spend an earlier flush left waits for the next
            return records
        try:
            self.ledger.flush()
            return records
        except StoreUnavailable as exc:
            log.error("%s", exc)
            unbooked: set[str] = set()
            for i in budgeted:
                result = results[i]
                assert isinstance(result, RouteResult)
                unbooked.add(result.decision_id)
                results[i] = exc
            return [r for r in records if r.id not in unbooked]

    def _decide(self, engine: Engine, estimates: Estimates, row: int, job: _Job) -> tuple[Decision, float]:
        """One call's decision, through its tenant's ledger where the budgets configure the tenant,
        and the probability it had of being made (below 1 only for exploration). The ledger books
        the model served, explored or not (a tenant with a hard cap is not explored)."""
        draw: Explore | None = None
        if self.explore > 0:

            def draw(greedy: Decision) -> tuple[Decision, float]:
                return explore(greedy, self.explore, self._random.random(), self._random.random())

        if self.ledger is not None and self.ledger.budget(job.tenant) is not None:
            return self.ledger.decide(
                engine, estimates, row, job.prefs, job.tenant, job.explicit_weight, draw
            )
        decision = engine.decide_row(estimates, row, job.prefs)
        return draw(decision) if draw is not None else (decision, 1.0)

    def _record(
        self,
        decision_id: str,
        job: _Job,
        engine: Engine,
        batch: Estimated,
        row: int,
        decision: Decision,
        propensity: float,
    ) -> DecisionRecord:
        est = batch.estimates
        return DecisionRecord(
            id=decision_id,
            created_at=time.time(),
            tenant=job.tenant,
            bundle_version=engine.version,
            model=decision.model,
            cost_weight=decision.cost_weight,
            propensity=propensity,
            models=est.models,
            quality=est.quality[row],
            cost_usd=est.cost_usd[row],
            output_tokens=est.output_tokens[row],
            input_tokens=int(est.input_tokens[row]),
            features=batch.features.features[row],
            prompt=job.prompt if self.store_prompts else None,
        )

    async def report(self, query: FeedbackQuery) -> tuple[bool, str]:
        """Records an outcome (Feedback); the store's work runs off the event loop."""
        if self.feedback is None:
            raise FeedbackDisabled("feedback is off: start router serve with --feedback-store URL")
        self._reporting += 1
        self._idle.clear()
        try:
            return await asyncio.wrap_future(self.feedback.submit(query))
        finally:
            self._reporting -= 1
            if self._in_flight == 0 and self._reporting == 0:
                self._idle.set()

    # -- what it reports -------------------------------------------------------------------

    def models(self) -> tuple[str, list[ModelSpec]]:
        """(bundle version, the candidate models with their prices)."""
        bundle = self.store.active.bundle
        return bundle.version, list(bundle.manifest.models)

    def info(self) -> ServiceInfo:
        active = self.store.active
        m = active.bundle.manifest
        return ServiceInfo(
            bundle_version=m.bundle_version,
            bundle_created_at=m.created_at,
            bundle_loaded_at=active.loaded_at,
            embedder_sha256=m.embedder.sha256,
            embedding_dim=m.embedder.dim,
            default_cost_weight=m.policy.default_cost_weight,
            c_ref_usd=m.policy.c_ref_usd,
            presets=dict(m.policy.presets),
            execution_provider=active.bundle.embedder.provider,
            limits=self.limits,
        )

    # -- shutdown --------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, grace_s: float) -> bool:
        """Waits for admitted calls (Route and Feedback) to finish; True if they all did within the
        grace period. Feedback is still taken while draining: outcomes of decisions already made."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        self._batcher.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        # Feedback first: the outcomes it still commits report costs to the ledger.
        if self.feedback is not None:
            self.feedback.close()
        if self.ledger is not None:
            self.ledger.close()
