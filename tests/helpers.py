"""Test helpers: run the real server in-process on loopback, on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from router.config import ServeSettings
from router.server import RouterServer
from router.v1 import router_pb2_grpc


class ServerThread:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.server = RouterServer(settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=120)
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop(self) -> None:
        self.call(self.server.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextmanager
def running_server(**overrides: Any) -> Iterator[ServerThread]:
    base = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "metrics_host": "127.0.0.1",
        "bundle_poll_s": 0,
    }
    thread = ServerThread(ServeSettings(**(base | overrides))).start()
    try:
        yield thread
    finally:
        thread.stop()


@contextmanager
def router_stub(address: str) -> Iterator[router_pb2_grpc.RouterStub]:
    channel = grpc.insecure_channel(address)
    try:
        yield router_pb2_grpc.RouterStub(channel)
    finally:
        channel.close()
