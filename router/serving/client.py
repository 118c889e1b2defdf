"""A small client: a channel to the router with optional TLS, mutual TLS and bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from router.v1 import router_pb2_grpc


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return continuation(details._replace(metadata=metadata), request)


def channel(
    address: str,
    *,
    token: str | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    if ca is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
        chan = grpc.secure_channel(address, credentials, options=options)
    else:
        chan = grpc.insecure_channel(address, options=options)
    if token:
        chan = grpc.intercept_channel(chan, _BearerToken(token))
    return chan


@contextmanager
def connect(
    address: str,
    *,
    token_file: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Iterator[router_pb2_grpc.RouterStub]:
    token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
    chan = channel(address, token=token, ca=ca, cert=cert, key=key)
    try:
        yield router_pb2_grpc.RouterStub(chan)
    finally:
        chan.close()
