"""Outcome feedback: decisions recorded off the request path, outcomes on disk before they are
acknowledged, and the online memory kept in step with the store.

- Decisions wait in a bounded queue (MAX_PENDING) that a writer thread empties into the store
  every FLUSH_S; Route never waits for the store. If the store is down the queue holds what it can
  and then drops the oldest decisions (counted): feedback for those gets NOT_FOUND. A decision the
  store refuses outright (a prompt with a NUL character kept on PostgreSQL) is set aside (counted
  the same way), so that it does not hold up the decisions behind it.
- Feedback for a decision the store does not hold (yet) may reach another replica than the one
  that made it, before that one's writer has stored it. Decision ids are UUIDv7s
  (router/core/decision_ids.py), which carry the time they were made: a decision not found whose
  id was made within RECENT_S of now is UNAVAILABLE (retry: it will be there), any other is
  NOT_FOUND. A decision this replica dropped or set aside (the latest MAX_PENDING of them) is
  NOT_FOUND here at once; other replicas cannot know it and answer UNAVAILABLE until its id is
  RECENT_S old.
- An outcome is written and committed before its Feedback call is answered; outcomes reported at
  the same time share one commit (a committer thread), so a store that syncs every commit to disk
  still takes thousands of outcomes a second. Repeats of a (decision, model) pair replace nothing
  and say so. A decision older than the retention is
  expired (NOT_FOUND) and purged from the store.
- A sync thread reads the outcomes that reached the store since it last looked (from any replica
  sharing it) every SYNC_S, and adds them to the online memory (router/core/online.py) that the
  engine consults: an outcome moves the estimates within seconds, on every replica. An outcome's
  sequence number is taken when it is inserted, so on PostgreSQL another replica's transaction can
  commit after one with a later number that a sync has already passed: a number the sync skipped
  is looked for again for GAP_WAIT_S from when this replica's sync first passed it, by this
  replica's own monotonic clock (replicas' clocks may disagree, so the time another one wrote in
  the store is never compared with this one's), the newest MAX_GAPS numbers at most (a duplicate
  or a rolled-back write leaves one that never comes). The first sync, at start, reads the whole
  history, so every number skipped in it (rolled back, duplicates, purged outcomes) is looked for
  during the first GAP_WAIT_S too: at most MAX_GAPS of them, MAX_GAPS / 1,000 small queries per
  sync for that time, which the bound keeps cheap.
  Outcomes of decisions made under a bundle with another embedding size are not learnt.
- A newly recorded outcome of the chosen model with a `cost_usd` goes to the budgets ledger, whose
  spend controller for the decision's tenant then steers by reported rather than predicted cost
  (on the replica that received it).
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from router.core.decision_ids import minted_at
from router.core.errors import InvalidRequest, NotFound, Overloaded, StoreUnavailable
from router.core.features import EXTRA_FEATURES
from router.core.feedback_store import (
    DecisionRecord,
    LearnedOutcome,
    Outcome,
    SqlStore,
    StoredDecision,
    StoreError,
    StoreRejected,
)
from router.core.online import OnlineMemory
from router.core.pricing import MAX_TOKENS
from router.serving.metrics import Metrics

log = logging.getLogger(__name__)

MAX_PENDING = 10_000
FLUSH_S = 0.05
SYNC_S = 1.0
SYNC_BATCH = 5_000
# Outcomes committed together at most (they all wait for the one commit).
COMMIT_BATCH = 256
# Outcomes waiting for a commit at most; beyond, Feedback is RESOURCE_EXHAUSTED at once, so that a
# slow or stalled store bounds what waits in memory instead of queueing every retry.
MAX_QUEUED_OUTCOMES = 16 * COMMIT_BATCH
PURGE_S = 3600.0
# How long a skipped sequence number is looked for, counted from when this replica's sync passed
# it: the write that took it was in progress then, and writes last milliseconds.
GAP_WAIT_S = 30.0
MAX_GAPS = 20_000
# How long after its id was made a decision not in the store is taken for one on its way there
# (UNAVAILABLE, retry) rather than unknown (NOT_FOUND), either side of now. Its replica writes it
# within FLUSH_S plus a write, well under a second, and clocks kept by NTP agree within
# milliseconds; 30 s leaves room for a store that is slow for a while and for a clock that is off,
# and still bounds how long a client retries an id that will never be stored (its replica dropped
# the decision or crashed before writing it) before it is told NOT_FOUND.
RECENT_S = 30.0


def _made_lately(decision_id: str, now: float) -> bool:
    """Whether `decision_id` is a UUIDv7 made within RECENT_S of `now`, by any replica's clock."""
    made = minted_at(decision_id)
    return made is not None and abs(now - made) <= RECENT_S


@dataclass(frozen=True, slots=True)
class FeedbackQuery:
    decision_id: str
    model: str
    score: float | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None


def _check(query: FeedbackQuery) -> None:
    # Ids are printable ASCII; anything else is refused here, before it reaches the store (a NUL,
    # which PostgreSQL's text refuses, failed every outcome committed in the same batch).
    decision_id = query.decision_id
    if not decision_id or len(decision_id) > 64 or not (decision_id.isascii() and decision_id.isprintable()):
        raise InvalidRequest(
            "decision_id",
            "must be the decision_id of a RouteResponse (printable ASCII, at most 64 characters)",
        )
    if query.score is None:
        raise InvalidRequest("score", "is required: a number in [0, 1]")
    if not math.isfinite(query.score) or not 0.0 <= query.score <= 1.0:
        raise InvalidRequest("score", f"must be a number in [0, 1], got {query.score}")
    for name in ("input_tokens", "output_tokens"):
        value = getattr(query, name)
        if value is not None and not 0 <= value <= MAX_TOKENS:
            raise InvalidRequest(name, f"must be a count of tokens from 0 to {MAX_TOKENS:,}, got {value}")
    if query.cost_usd is not None and (not math.isfinite(query.cost_usd) or query.cost_usd < 0):
        raise InvalidRequest("cost_usd", f"must be a non-negative number, got {query.cost_usd}")


class FeedbackService:
    def __init__(
        self,
        store: SqlStore,
        metrics: Metrics,
        memory: OnlineMemory,
        *,
        retention_s: float,
        on_reported_cost: Callable[[str, float, float], None] | None = None,
    ) -> None:
        self.store = store
        self.on_reported_cost = on_reported_cost  # (tenant, predicted, reported cost)
        self.metrics = metrics
        self.memory = memory
        self.retention_s = retention_s
        self._pending: collections.deque[DecisionRecord] = collections.deque()
        # Ids of decisions this replica dropped or the store refused, the newest MAX_PENDING (under
        # _pending_lock): their ids are recent, yet they will never be stored, so NOT_FOUND here.
        self._dropped: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._cursor = 0
        # skipped sequence number -> when this replica's sync passed it (time.monotonic)
        self._gaps: dict[int, float] = {}
        self._stop = threading.Event()
        self._reports: queue.Queue[tuple[FeedbackQuery, Future[tuple[bool, str]]]] = queue.Queue(
            MAX_QUEUED_OUTCOMES
        )
        loops = (("writer", FLUSH_S, self.flush), ("sync", SYNC_S, self.sync), ("purge", PURGE_S, self.purge))
        self._threads = [
            threading.Thread(target=self._loop, args=(every, work), name=f"feedback-{name}", daemon=True)
            for name, every, work in loops
        ]
        self._threads.append(threading.Thread(target=self._commit_loop, name="feedback-commit", daemon=True))

    def start(self) -> None:
        self.sync()  # what the store already holds, before serving
        for thread in self._threads:
            thread.start()

    def _loop(self, every_s: float, work: object) -> None:
        while not self._stop.wait(every_s):
            try:
                work()  # type: ignore[operator]
            except Exception:  # a thread that dies would stop learning silently
                log.exception("feedback %s failed", getattr(work, "__name__", work))

    # -- decisions (engine thread) ---------------------------------------------------------------

    def record(self, records: list[DecisionRecord], front: bool = False) -> None:
        """Queues decisions (`front`: ones older than those queued, back from a failed write)."""
        with self._pending_lock:
            if front:
                self._pending.extendleft(reversed(records))
            else:
                self._pending.extend(records)
            dropped = len(self._pending) - MAX_PENDING
            self._forget([self._pending.popleft().id for _ in range(max(dropped, 0))])
        if dropped > 0:
            self.metrics.feedback_dropped.inc(dropped)

    def flush(self) -> None:
        """Writes the waiting decisions; on a store error they wait for the next try."""
        with self._write_lock:
            # taken off the queue while it is written, so that what `record` drops meanwhile (the
            # oldest) is never a decision this write has yet to store
            with self._pending_lock:
                batch = list(self._pending)
                self._pending.clear()
            if not batch:
                return
            started = time.perf_counter()
            try:
                try:
                    self.store.record(batch)
                    written = len(batch)
                except StoreRejected:
                    written = self._write_each(batch)
            except StoreError as exc:
                self.metrics.feedback_store_errors.labels(op="record").inc()
                log.warning("feedback store: %d decisions wait to be written: %s", len(batch), exc)
                self.record(batch, front=True)
                return
            self.metrics.feedback_store_seconds.labels(op="record").observe(time.perf_counter() - started)
            self.metrics.decisions_logged.inc(written)

    def _forget(self, ids: list[str]) -> None:
        """Notes decisions that will never be stored (called with _pending_lock held)."""
        for decision_id in ids:
            self._dropped[decision_id] = None
        while len(self._dropped) > MAX_PENDING:
            self._dropped.popitem(last=False)

    def _unwritten(self, ids: set[str]) -> tuple[set[str], set[str]]:
        """Those of `ids` whose decisions still wait to be written, and those this replica
        dropped or the store refused."""
        if not ids:
            return set(), set()
        with self._pending_lock:
            return {r.id for r in self._pending if r.id in ids}, {i for i in ids if i in self._dropped}

    def _write_each(self, batch: list[DecisionRecord]) -> int:
        """Writes a batch the store refused one decision at a time, setting aside those it refuses
        on their own; how many it wrote. A store error on the way leaves the rest for the caller."""
        written = 0
        for i, decision in enumerate(batch):
            try:
                self.store.record([decision])
                written += 1
            except StoreRejected as exc:
                with self._pending_lock:
                    self._forget([decision.id])
                self.metrics.feedback_dropped.inc()
                log.warning("feedback store refused decision %s, which is not kept: %s", decision.id, exc)
            except StoreError:
                self.metrics.decisions_logged.inc(written)
                del batch[:i]  # what the caller puts back in the queue
                raise
        return written

    # -- outcomes ----------------------------------------------------------------------------------

    def submit(self, query: FeedbackQuery) -> Future[tuple[bool, str]]:
        """Queues an outcome; the future resolves to (recorded, message) once it is committed, or
        to the error the caller sees. Outcomes queued together share one commit."""
        future: Future[tuple[bool, str]] = Future()
        try:
            _check(query)
        except InvalidRequest as exc:
            self.metrics.feedback_outcomes.labels(result="invalid").inc()
            future.set_exception(exc)
            return future
        try:
            self._reports.put_nowait((query, future))
        except queue.Full:
            self.metrics.feedback_outcomes.labels(result="overloaded").inc()
            future.set_exception(
                Overloaded(f"{MAX_QUEUED_OUTCOMES} outcomes are waiting for the store; retry with backoff")
            )
        return future

    def _commit_loop(self) -> None:
        while True:
            try:
                first = self._reports.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():  # only once what was queued before the stop is committed
                    return
                continue
            batch = [first]
            while len(batch) < COMMIT_BATCH:
                try:
                    batch.append(self._reports.get_nowait())
                except queue.Empty:
                    break
            # A caller that has gone (cancelled, or past its deadline) cancelled its future, which
            # then takes no answer; the others are marked running here and can no longer be.
            batch = [(q, f) for q, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._commit(batch)
            except Exception as exc:  # never leave a caller waiting
                log.exception("feedback commit failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StoreUnavailable(f"the feedback store failed: {exc}"))

    def _commit(self, batch: list[tuple[FeedbackQuery, Future[tuple[bool, str]]]]) -> None:
        started = time.perf_counter()
        try:
            self.flush()  # decisions still waiting in the queue must be found
            found = self.store.decisions(sorted({q.decision_id for q, _ in batch}))
            unwritten, dropped = self._unwritten({q.decision_id for q, _ in batch} - set(found))
            now = time.time()
            writes: list[tuple[Outcome, Future[tuple[bool, str]], StoredDecision]] = []
            for query, future in batch:
                decision = found.get(query.decision_id)
                if query.decision_id in unwritten:  # the flush above failed: retrying will find it
                    self.metrics.feedback_outcomes.labels(result="not_yet").inc()
                    future.set_exception(
                        StoreUnavailable("its decision is not in the feedback store yet (writes are failing)")
                    )
                    continue
                if (
                    decision is None
                    and query.decision_id not in dropped
                    and _made_lately(query.decision_id, now)
                ):  # most likely another replica's decision, which its writer has yet to store
                    self.metrics.feedback_outcomes.labels(result="not_yet").inc()
                    future.set_exception(
                        StoreUnavailable(
                            "its decision is not in the feedback store yet (made moments ago, perhaps "
                            "by another replica that has yet to write it); retry"
                        )
                    )
                    continue
                if decision is None or decision.created_at < now - self.retention_s:
                    self.metrics.feedback_outcomes.labels(result="not_found").inc()
                    what = "unknown" if decision is None else "expired"
                    future.set_exception(NotFound(f"decision_id: {what} decision {query.decision_id[:64]!r}"))
                    continue
                model = query.model or decision.model
                if model not in decision.models:
                    self.metrics.feedback_outcomes.labels(result="invalid").inc()
                    future.set_exception(
                        InvalidRequest("model", f"{model[:128]!r} was not a candidate of this decision")
                    )
                    continue
                assert query.score is not None  # checked when submitted
                outcome = Outcome(
                    query.decision_id,
                    model,
                    query.score,
                    query.input_tokens,
                    query.output_tokens,
                    query.cost_usd,
                    now,
                )
                writes.append((outcome, future, decision))
            recorded = self.store.add_outcomes([o for o, _, _ in writes])
        except StoreError as exc:
            self.metrics.feedback_store_errors.labels(op="outcome").inc()
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"the feedback store is unavailable: {exc}"))
            return
        self.metrics.feedback_store_seconds.labels(op="outcome").observe(time.perf_counter() - started)
        for (outcome, future, decision), new in zip(writes, recorded, strict=True):
            self.metrics.feedback_outcomes.labels(result="recorded" if new else "duplicate").inc()
            chosen = outcome.model == decision.model
            if new and chosen and self.on_reported_cost is not None and outcome.cost_usd is not None:
                self.on_reported_cost(decision.tenant, decision.cost_usd, outcome.cost_usd)
            where = f"{outcome.model} for decision {outcome.decision_id}"
            if new:
                future.set_result((True, f"recorded the outcome of {where}"))
            else:
                future.set_result((False, f"an outcome of {where} was already recorded; kept it"))

    # -- learning ----------------------------------------------------------------------------------

    def sync(self) -> None:
        """Adds the outcomes the store received since the last look (any replica's) to the memory."""
        try:
            if self._gaps:
                self._learn(self.store.outcomes_at(sorted(self._gaps)))
            while True:
                started = time.perf_counter()
                learned = self.store.outcomes_since(self._cursor, SYNC_BATCH)
                self.metrics.feedback_store_seconds.labels(op="sync").observe(time.perf_counter() - started)
                self._note_gaps(learned)
                self._learn(learned)
                if learned:
                    self._cursor = learned[-1].seq
                if len(learned) < SYNC_BATCH:
                    break
        except StoreError as exc:
            self.metrics.feedback_store_errors.labels(op="sync").inc()
            log.warning("feedback store: cannot read new outcomes: %s", exc)
            return  # gaps age only with syncs that looked for them: an outage does not expire them
        cutoff = time.monotonic() - GAP_WAIT_S
        self._gaps = {s: noticed for s, noticed in self._gaps.items() if noticed >= cutoff}

    def _note_gaps(self, learned: list[LearnedOutcome]) -> None:
        """Notes the numbers `learned` skips past the cursor, timed by this replica's own clock:
        the outcomes' received_at was written by whichever replica received them, and a clock that
        is off would make a number look too old to look for (or keep one looked for)."""
        noticed = time.monotonic()
        skipped: list[range] = []
        previous = self._cursor
        for outcome in learned:
            if outcome.seq > previous + 1:
                skipped.append(range(previous + 1, outcome.seq))
            previous = outcome.seq
        # The newest MAX_GAPS only, without listing the rest first: a history with large holes
        # (purged outcomes) read at start would otherwise fill the memory with numbers.
        newest: list[int] = []
        for numbers in reversed(skipped):
            room = MAX_GAPS - len(newest)
            if room <= 0:
                break
            newest.extend(reversed(numbers[-room:]))
        for seq in reversed(newest):
            self._gaps[seq] = noticed
        # every number noted is past the cursor, so the dict is in ascending order: keep its tail
        if len(self._gaps) > MAX_GAPS:
            self._gaps = dict(list(self._gaps.items())[-MAX_GAPS:])

    def _learn(self, learned: list[LearnedOutcome]) -> None:
        for outcome in learned:
            self._gaps.pop(outcome.seq, None)
        size = self.memory.dim + len(EXTRA_FEATURES)
        usable = [o for o in learned if o.features.size == size]
        if len(usable) < len(learned):
            log.warning(
                "feedback: %d outcome(s) of decisions whose stored features are of another size "
                "(a bundle with another embedder) or unreadable are not learnt",
                len(learned) - len(usable),
            )
        if not usable:
            return
        ignored = self.memory.add(
            [o.decision_id for o in usable],
            np.vstack([o.features[None, :] for o in usable]),
            [o.model for o in usable],
            [o.score for o in usable],
            [o.output_tokens for o in usable],
        )
        if ignored:
            log.warning(
                "feedback: %d outcome(s) of decisions whose stored embedding is not finite are not learnt",
                ignored,
            )
        self.metrics.online_memory.set(len(self.memory))

    def purge(self) -> None:
        try:
            self.store.purge(time.time() - self.retention_s)
        except StoreError as exc:
            self.metrics.feedback_store_errors.labels(op="purge").inc()
            log.warning("feedback store: purge failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        while True:  # outcomes the commit thread did not reach: their callers are told, not left waiting
            try:
                _, future = self._reports.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(StoreUnavailable("the server is shutting down; send it again"))
        self.flush()
        self.store.close()
