"""The core of the service: validate a route query, estimate (batched), apply the policy.

Knows nothing of protobuf or gRPC. Holds the active bundle and swaps it atomically: each call
captures the bundle it was admitted under and finishes on it, even if a new one arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from router.batching import MicroBatcher
from router.errors import DeadlineExceeded, InvalidRequest, NotReady, Overloaded
from router.estimator import Estimator, open_bundle
from router.metrics import Metrics
from router.policy import Decision, Estimate, Preferences, decide

log = logging.getLogger(__name__)

WARMUP_PROMPTS = (
    "Hi",
    "Summarise the main causes of the French Revolution in three sentences.",
    "Solve for x: 3x + 7 = 22. Show your work step by step, then state the answer. " * 12,
)


@dataclass(frozen=True, slots=True)
class RouteQuery:
    prompt: str
    cost_weight: float | None = None
    allowed_models: tuple[str, ...] = ()
    max_cost_usd: float | None = None
    preset: str = ""


@dataclass(frozen=True, slots=True)
class RouteResult:
    decision: Decision
    bundle_version: str
    input_tokens: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_prompt_chars: int
    max_allowed_models: int
    max_in_flight: int
    max_batch_size: int
    max_batch_wait_s: float
    embed_batch_size: int = 8


@dataclass(frozen=True, slots=True)
class _Job:
    estimator: Estimator
    query: RouteQuery
    prefs: Preferences
    submitted: float


@dataclass(frozen=True)
class ActiveBundle:
    estimator: Estimator
    loaded_at: float
    manifest_key: str


def manifest_key(path: Path) -> str:
    """Identifies what a bundle path currently points at (a symlink swap or a rewrite changes it)."""
    manifest = Path(path) / "manifest.json"
    stat = manifest.stat()
    return f"{manifest.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"


def validate(query: RouteQuery, estimator: Estimator, limits: Limits) -> Preferences:
    """Turns a query into policy preferences, or names the field that is wrong."""
    manifest = estimator.bundle.manifest
    if not query.prompt.strip():
        raise InvalidRequest("prompt", "must not be empty or whitespace")
    if len(query.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            "prompt", f"is {len(query.prompt)} characters; the limit is {limits.max_prompt_chars}"
        )
    presets = manifest.policy.presets
    if query.preset and query.cost_weight is not None:
        raise InvalidRequest("preset", "give either cost_weight or preset, not both")
    if query.preset:
        if query.preset not in presets:
            raise InvalidRequest(
                "preset", f"unknown preset {query.preset[:64]!r}; known: {', '.join(sorted(presets))}"
            )
        w = presets[query.preset].cost_weight
    elif query.cost_weight is not None:
        w = query.cost_weight
        if not math.isfinite(w) or not 0.0 <= w <= 1.0:
            raise InvalidRequest("cost_weight", f"must be a number in [0, 1], got {w}")
    else:
        w = manifest.policy.default_cost_weight
    allowed = None
    if query.allowed_models:
        if len(query.allowed_models) > limits.max_allowed_models:
            raise InvalidRequest(
                "allowed_models",
                f"has {len(query.allowed_models)} entries; the limit is {limits.max_allowed_models}",
            )
        if len(set(query.allowed_models)) != len(query.allowed_models):
            raise InvalidRequest("allowed_models", "lists a model more than once")
        known = set(estimator.bundle.models)
        unknown = [m for m in query.allowed_models if m not in known]
        if unknown:
            raise InvalidRequest("allowed_models", f"unknown model {unknown[0][:128]!r} (see ListModels)")
        allowed = frozenset(query.allowed_models)
    ceiling = query.max_cost_usd
    if ceiling is not None and (not math.isfinite(ceiling) or ceiling < 0):
        raise InvalidRequest("max_cost_usd", f"must be a non-negative number, got {ceiling}")
    return Preferences(cost_weight=w, allowed_models=allowed, max_cost_usd=ceiling)


class RouterService:
    def __init__(
        self,
        bundle_path: Path,
        limits: Limits,
        metrics: Metrics,
        *,
        provider: str,
        threads: int,
        log_prompts: bool = False,
    ) -> None:
        self.bundle_path = Path(bundle_path)
        self.log_prompts = log_prompts
        self.limits = limits
        self.metrics = metrics
        self.provider = provider
        self.threads = threads
        self._active: ActiveBundle | None = None
        self._in_flight = 0
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        # One engine thread: ONNX Runtime already spreads a batch over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._batcher: MicroBatcher[_Job, RouteResult] = MicroBatcher(
            self._run_batch,
            max_batch=limits.max_batch_size,
            max_wait_s=limits.max_batch_wait_s,
            executor=self._executor,
        )
        self._rejected_keys: set[str] = set()

    # -- bundle lifecycle -------------------------------------------------------------------

    @property
    def active(self) -> ActiveBundle:
        if self._active is None:
            raise NotReady("no bundle loaded")
        return self._active

    def load_initial(self) -> None:
        """Loads the configured bundle (blocking); raises BundleError if it is unusable."""
        self._active = self._load(self.bundle_path)

    def start(self) -> None:
        """Starts the batch worker; call from the event loop that serves the calls."""
        self._batcher.start()

    def _load(self, path: Path) -> ActiveBundle:
        key = manifest_key(path)
        try:
            estimator = open_bundle(path, provider=self.provider, threads=self.threads)
            warm_up(estimator)
        except Exception:
            self.metrics.bundle_loads.labels(result="failure").inc()
            raise
        self.metrics.bundle_loads.labels(result="success").inc()
        active = ActiveBundle(estimator, time.time(), key)
        m = estimator.bundle.manifest
        self.metrics.set_bundle(
            m.bundle_version, m.embedder.precision, estimator.bundle.models, active.loaded_at
        )
        self.metrics.set_provider(estimator.bundle.embedder.provider)
        log.info(
            "bundle %s loaded (%d models, embedder %s on %s)",
            m.bundle_version,
            len(estimator.bundle.models),
            m.embedder.precision,
            estimator.bundle.embedder.provider,
        )
        return active

    async def reload_if_changed(self) -> bool:
        """Loads and swaps in the bundle at the watched path if it changed; a bad one is refused."""
        try:
            key = manifest_key(self.bundle_path)
        except OSError:
            return False  # mid-swap or missing: keep serving, look again later
        if (self._active is not None and key == self._active.manifest_key) or key in self._rejected_keys:
            return False
        try:
            fresh = await asyncio.get_running_loop().run_in_executor(None, self._load, self.bundle_path)
        except Exception as exc:
            self._rejected_keys.add(key)
            log.error("new bundle at %s refused, still serving the old one: %s", self.bundle_path, exc)
            return False
        old = self._active
        self._active = fresh  # atomic: calls admitted from now on use the new bundle
        log.info(
            "swapped bundle %s -> %s",
            old.estimator.bundle.version if old else None,
            fresh.estimator.bundle.version,
        )
        return True

    # -- calls -----------------------------------------------------------------------------

    async def route(self, query: RouteQuery, timeout_s: float | None = None) -> RouteResult:
        if not self._accepting:
            raise NotReady("shutting down")
        if self._in_flight >= self.limits.max_in_flight:
            raise Overloaded(f"more than {self.limits.max_in_flight} calls in flight; retry with backoff")
        estimator = self.active.estimator
        prefs = validate(query, estimator, self.limits)
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self._in_flight)
        try:
            job = _Job(estimator, query, prefs, time.perf_counter())
            try:
                result = await asyncio.wait_for(self._batcher.submit(job), timeout_s)
            except asyncio.TimeoutError as exc:
                raise DeadlineExceeded("deadline passed before the route was computed") from exc
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            if self._in_flight == 0:
                self._idle.set()
        if self.log_prompts:  # opt-in only: prompts may hold secrets or personal data
            log.info("routed prompt %r -> %s", query.prompt[:2000], result.decision.model)
        self.metrics.decisions.labels(model=result.decision.model).inc()
        chosen = next(s for s in result.decision.scored if s.estimate.model == result.decision.model)
        self.metrics.predicted_spend.labels(model=result.decision.model).inc(chosen.estimate.cost_usd)
        return result

    def _run_batch(self, jobs: Sequence[_Job]) -> list[RouteResult | BaseException]:
        """Runs in the engine thread: one embedder and heads run per bundle present in the batch."""
        started = time.perf_counter()
        for job in jobs:
            self.metrics.stage_seconds.labels(stage="queue").observe(started - job.submitted)
        results: list[RouteResult | BaseException] = [RuntimeError("not computed")] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.estimator), []).append(i)
        self.metrics.batch_size.observe(len(jobs))
        for idx in groups.values():
            estimator = jobs[idx[0]].estimator
            texts = [jobs[i].query.prompt for i in idx]
            t0 = time.perf_counter()
            tokens = estimator.tokenize(texts)
            embeddings = estimator.embed(tokens, self.limits.embed_batch_size)
            t1 = time.perf_counter()
            est = estimator.estimate(texts, tokens, embeddings)
            t2 = time.perf_counter()
            self.metrics.stage_seconds.labels(stage="embed").observe(t1 - t0)
            self.metrics.stage_seconds.labels(stage="heads").observe(t2 - t1)
            c_ref = estimator.bundle.manifest.policy.c_ref_usd
            version = estimator.bundle.version
            for row, i in enumerate(idx):
                t3 = time.perf_counter()
                estimates = [
                    Estimate(model, q, c)
                    for model, q, c in zip(
                        est.models, est.quality[row].tolist(), est.cost_usd[row].tolist(), strict=True
                    )
                ]
                try:
                    decision = decide(estimates, jobs[i].prefs, c_ref)
                    results[i] = RouteResult(decision, version, int(est.input_tokens[row]))
                except ValueError as exc:  # validated before; kept as a per-call error, not a batch failure
                    results[i] = InvalidRequest("allowed_models", str(exc))
                self.metrics.stage_seconds.labels(stage="policy").observe(time.perf_counter() - t3)
        return results

    # -- shutdown --------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, grace_s: float) -> bool:
        """Waits for admitted calls to finish; True if they all did within the grace period."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        await self._batcher.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)


def warm_up(estimator: Estimator) -> None:
    """First runs allocate ONNX Runtime buffers; pay that before taking traffic, not on a caller."""
    for size in (1, 4):
        estimator.estimate_texts(list(WARMUP_PROMPTS[:size]) * (1 if size == 1 else 2))
