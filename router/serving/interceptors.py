"""gRPC interceptors: error mapping + call metrics, and bearer-token access control.

Handlers carry no try/except: domain errors are mapped to status codes here, in one table, and
anything unexpected leaves as a bare INTERNAL with the details only in the server log.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from router.core.errors import (
    BudgetExhausted,
    DeadlineExceeded,
    FeedbackDisabled,
    InvalidRequest,
    Misconfigured,
    NotFound,
    NotReady,
    Overloaded,
    RouterError,
    StoreUnavailable,
)
from router.serving.metrics import Metrics

log = logging.getLogger(__name__)

STATUS_OF: dict[type[RouterError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BudgetExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    FeedbackDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    Misconfigured: grpc.StatusCode.FAILED_PRECONDITION,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _wrap_unary(
    handler: grpc.RpcMethodHandler, behaviour: Behaviour, deserializer: Callable[[bytes], Any] | None = None
) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class _Undecodable:
    """A request gRPC could not parse (a string field that is not UTF-8): answered here as
    INVALID_ARGUMENT, where gRPC itself would answer UNKNOWN and log a traceback per call."""

    reason: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def read(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc)[:200])

    return read


class ErrorsAndMetrics(grpc.aio.ServerInterceptor):
    """Maps RouterError subclasses to gRPC codes and counts every unary call by method and code."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown method (gRPC answers UNIMPLEMENTED) or a stream: not ours to count
        inner = handler.unary_unary
        method = details.method  # a registered method name, so a small fixed set of label values
        metrics = self._metrics

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, _Undecodable):
                    raise InvalidRequest("request", f"is not a valid message ({request.reason})")
                return await inner(request, context)
            except RouterError as exc:
                code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
                await context.abort(code, str(exc))
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", method)
                await context.abort(code, "internal error")
            finally:
                metrics.requests.labels(method=method, code=code.name).inc()
                metrics.request_seconds.labels(method=method).observe(time.perf_counter() - started)

        return _wrap_unary(handler, behaviour, _tolerant(handler.request_deserializer))


class BearerToken(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>`, compared in constant time."""

    def __init__(self, token: bytes, exempt_prefixes: tuple[str, ...]) -> None:
        self._expected = b"Bearer " + token
        self._exempt = exempt_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(self._exempt):
            return await continuation(details)
        presented = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode("utf-8") if isinstance(value, str) else value
                break
        if hmac.compare_digest(presented, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        reason = "missing bearer token" if not presented else "invalid bearer token"

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if handler is None:
            return grpc.unary_unary_rpc_method_handler(refuse)
        if handler.unary_unary is not None:
            return _wrap_unary(handler, refuse)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream_refusal(reason), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _stream_refusal(reason), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )


def _stream_refusal(reason: str) -> Callable[..., Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - makes this an async generator, as stream handlers must be

    return refuse
