"""Assembles and runs the server: gRPC (Router, health, reflection), metrics, bundle watch, shutdown.

Health starts NOT_SERVING and turns SERVING only once the bundle is loaded, verified and warm.
On SIGTERM it turns NOT_SERVING, new calls are refused, admitted calls get the grace period to
finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from router.core.feedback_store import open_store
from router.serving.bundle_store import BundleStore
from router.serving.config import ServeSettings
from router.serving.feedback import FeedbackService
from router.serving.grpc_api import RouterServicer
from router.serving.interceptors import BearerToken, ErrorsAndMetrics
from router.serving.ledger import open_ledger
from router.serving.metrics import Metrics
from router.serving.requests import Limits
from router.serving.service import RouterService
from router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def limits_of(settings: ServeSettings) -> Limits:
    return Limits(
        max_prompt_chars=settings.max_prompt_chars,
        max_allowed_models=settings.max_allowed_models,
        max_in_flight=settings.max_in_flight,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000.0,
    )


def _read(path: Path) -> bytes:
    return path.read_bytes()


class RouterServer:
    def __init__(self, settings: ServeSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.limits = limits_of(settings)
        self.metrics.max_in_flight.set(settings.max_in_flight)
        self.store = BundleStore(
            settings.bundle, self.metrics, provider=settings.provider, threads=settings.threads
        )
        self.ledger = (
            open_ledger(settings.budgets, settings.spend_store, self.metrics) if settings.budgets else None
        )
        self.feedback = (
            FeedbackService(
                open_store(settings.feedback_store),
                self.metrics,
                self.store.online,
                retention_s=settings.feedback_retention_s,
                on_reported_cost=self.ledger.reported_cost if self.ledger is not None else None,
            )
            if settings.feedback_store
            else None
        )
        self.service = RouterService(
            self.store,
            self.limits,
            self.metrics,
            ledger=self.ledger,
            feedback=self.feedback,
            explore=settings.explore,
            store_prompts=settings.store_prompts,
            log_prompts=settings.log_prompts,
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_http: object | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    @staticmethod
    def _bind(add_port: Callable[[], int], address: str) -> int:
        """grpc says a port it cannot bind (in use, no permission) with a bare RuntimeError."""
        try:
            return add_port()
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc

    async def start(self) -> None:
        s = self.settings
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorsAndMetrics(self.metrics)]
        token = s.token()
        if token is not None:
            exempt: tuple[str, ...] = ()
            if s.auth_exempt_health:
                exempt += (HEALTH_PREFIX,)
            if s.auth_exempt_reflection:
                exempt += REFLECTION_PREFIXES
            # Outermost, so that an unauthenticated caller learns nothing else.
            interceptors.insert(0, BearerToken(token, exempt))
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(self.service), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{s.host}:{s.port}"
        grpc_server = self._server
        if s.tls_cert is not None and s.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(_read(s.tls_key), _read(s.tls_cert))],
                root_certificates=_read(s.tls_client_ca) if s.tls_client_ca else None,
                require_client_auth=s.tls_client_ca is not None,
            )
            self.port = self._bind(lambda: grpc_server.add_secure_port(address, credentials), address)
        else:
            self.port = self._bind(lambda: grpc_server.add_insecure_port(address), address)
        http_server, _ = start_http_server(
            s.metrics_port, addr=s.metrics_host, registry=self.metrics.registry
        )
        self._metrics_http = http_server
        self.metrics_port = http_server.server_port
        await self._server.start()
        log.info(
            "gRPC listening on %s:%d, metrics on %s:%d", s.host, self.port, s.metrics_host, self.metrics_port
        )

        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, self.store.load_initial)
        if self.feedback is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.feedback.start)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING (bundle loaded and warm in %.2f s)", time.perf_counter() - started)
        if s.bundle_poll_s > 0:
            self._watch = asyncio.get_running_loop().create_task(self._watch_bundle(), name="bundle-watch")

    async def _watch_bundle(self) -> None:
        while True:
            await asyncio.sleep(self.settings.bundle_poll_s)
            try:
                await self.store.reload_if_changed()
                if self.ledger is not None:
                    self.ledger.reload_if_changed()
            except Exception:  # the watcher must outlive any one bad attempt
                log.exception("bundle watch failed")

    async def shutdown(self) -> None:
        """NOT_SERVING, refuse new calls, let admitted ones finish within the grace period, stop."""
        if self._stopping:  # a second SIGTERM or Ctrl-C: the first shutdown is under way
            return
        self._stopping = True
        grace = self.settings.grace_period_s
        log.info("shutting down: draining for up to %.1f s", grace)
        await self.health.enter_graceful_shutdown()
        self.service.stop_accepting()
        started = time.perf_counter()
        drained = await self.service.drain(grace)
        if drained:
            log.info("drained in %.2f s", time.perf_counter() - started)
        else:
            log.warning("grace period over with calls still in flight")
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            await self._server.stop(max(grace - (time.perf_counter() - started), 0.0))
        log.info("gRPC server stopped after %.2f s", time.perf_counter() - started)
        await self.service.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]
        log.info("shut down after %.2f s", time.perf_counter() - started)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(settings: ServeSettings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server = RouterServer(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.shutdown()))
    try:
        await server.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await server.shutdown()
        raise
    await server.wait()
