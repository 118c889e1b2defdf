"""The error taxonomy. Domain code raises these; the gRPC layer maps each kind to one status code."""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error a caller may see the message of."""


class InvalidRequest(RouterError):
    """A request field is wrong; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Overloaded(RouterError):
    """Too many calls in flight: shed at once rather than queue without bound."""


class BudgetExhausted(RouterError):
    """A tenant's hard spend limit for the current window is reached (and it asked to be refused)."""


class NotFound(RouterError):
    """What a call refers to does not exist (an unknown or expired decision id)."""


class StoreUnavailable(RouterError):
    """The feedback or spend store cannot be reached; Route keeps serving the calls that need neither."""


class FeedbackDisabled(RouterError):
    """Feedback needs a store (router serve --feedback-store)."""


class Misconfigured(RouterError):
    """The server's configuration cannot serve the call, whatever the caller sends (a tenant whose
    allow-list names no model of the bundle served)."""


class NotReady(RouterError):
    """No bundle loaded yet, or shutting down."""


class DeadlineExceeded(RouterError):
    """The caller's deadline passed before the work could finish."""


class BundleError(Exception):
    """A bundle that must not be served; the message says why."""
