"""What a Route call asks for, the server's limits on it, and its validation into policy terms."""

from __future__ import annotations

from dataclasses import dataclass

from router.core.engine import Engine
from router.core.errors import InvalidRequest
from router.core.features import BLANK, blank
from router.core.policy import Decision, Preferences


@dataclass(frozen=True, slots=True)
class RouteQuery:
    prompt: str
    cost_weight: float | None = None
    allowed_models: tuple[str, ...] = ()
    max_cost_usd: float | None = None
    preset: str = ""
    tenant: str = ""
    max_latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class RouteResult:
    decision: Decision
    bundle_version: str
    input_tokens: int
    decision_id: str


@dataclass(frozen=True, slots=True)
class Limits:
    max_prompt_chars: int
    max_allowed_models: int
    max_in_flight: int
    max_batch_size: int
    max_batch_wait_s: float


def validate(query: RouteQuery, engine: Engine, limits: Limits) -> Preferences:
    """The server's own limits first, then the engine's check of the caller's wishes."""
    if blank(query.prompt):
        raise InvalidRequest("prompt", BLANK)
    if len(query.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            "prompt", f"is {len(query.prompt)} characters; the limit is {limits.max_prompt_chars}"
        )
    if len(query.allowed_models) > limits.max_allowed_models:
        raise InvalidRequest(
            "allowed_models",
            f"has {len(query.allowed_models)} entries; the limit is {limits.max_allowed_models}",
        )
    return engine.preferences(
        cost_weight=query.cost_weight,
        preset=query.preset,
        allowed_models=query.allowed_models,
        max_cost_usd=query.max_cost_usd,
        max_latency_ms=query.max_latency_ms,
    )
