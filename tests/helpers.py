"""Test helpers: run the real server in-process on loopback, on its own event loop thread."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from router.core.features import EXTRA_FEATURES
from router.core.feedback_store import DecisionRecord
from router.core.manifest import CHECKSUM_FIELD, MANIFEST, content_checksum
from router.serving.config import ServeSettings
from router.serving.server import RouterServer
from router.v1 import router_pb2, router_pb2_grpc

PROMPT = "Which gas makes up most of the Earth's atmosphere?"
LONG_PROMPT = "Explain, step by step, how a compiler turns source code into machine code. " * 30


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


def serve_command(
    router: list[str], bundle: Path, *, port: int = 0, extra: tuple[str, ...] = ()
) -> list[str]:
    """`router serve` on loopback with an ephemeral metrics port; `router` is how to run the CLI."""
    return [
        *router,
        "serve",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--metrics-host",
        "127.0.0.1",
        *extra,
    ]


@contextmanager
def router_stub(address: str) -> Iterator[router_pb2_grpc.RouterStub]:
    channel = grpc.insecure_channel(address)
    try:
        yield router_pb2_grpc.RouterStub(channel)
    finally:
        channel.close()


def certificate(common_name: str, issuer: tuple[Any, Any] | None = None, *, ca: bool) -> tuple[Any, Any]:
    """A (certificate, key) pair valid for localhost and 127.0.0.1; self-signed without an issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def write_pem(cert: Any, key: Any, directory: Path, stem: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], object], *, reseal: bool = True) -> None:
    """Changes a bundle's manifest.json in place and, unless told not to, seals it again, as a
    tool that rewrites manifests on purpose would (the fault under test is then the change itself)."""
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal:
        manifest[CHECKSUM_FIELD] = content_checksum(manifest)
    path.write_text(json.dumps(manifest))


def point_link(link: Path, target: Path) -> None:
    """Atomic symlink swap, as an operator (or a Kubernetes volume update) does it."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def wait_for_version(stub: router_pb2_grpc.RouterStub, version: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).bundle_version == version:
            return
        time.sleep(0.1)
    raise AssertionError(f"server never switched to {version}")


class Traffic:
    """Clients calling Route in a loop on their own threads, recording every outcome."""

    def __init__(self, address: str, clients: int, prompt: str = PROMPT) -> None:
        self.address = address
        self.prompt = prompt
        self.results: list[tuple[float, float, grpc.StatusCode, str]] = []  # start, end, code, version
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = stub.Route(router_pb2.RouteRequest(prompt=self.prompt), timeout=30)
                    outcome = (started, time.monotonic(), grpc.StatusCode.OK, r.bundle_version)
                except grpc.RpcError as exc:
                    outcome = (started, time.monotonic(), exc.code(), "")
                with self._lock:
                    self.results.append(outcome)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@contextmanager
def killed_afterwards(bundle: Path, *extra: str) -> Iterator[router_pb2_grpc.RouterStub]:
    """`router serve` in a process of its own, a stub to it, and SIGKILL once the block is done:
    whatever the server acknowledged must then be found where it said it wrote it."""
    import signal
    import subprocess
    import sys

    from training.bench import free_port, wait_serving

    port = free_port()
    command = serve_command([sys.executable, "-m", "router.cli"], bundle, port=port, extra=extra)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, time.perf_counter() + 120, lambda: proc.poll() is None)
        with router_stub(address) as stub:
            yield stub
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def send_feedback(stub, decision_id: str, score: float | None, **fields) -> router_pb2.FeedbackResponse:
    """Feedback for a decision; score None leaves the field unset (to test that it is required)."""
    request = router_pb2.FeedbackRequest(decision_id=decision_id, **fields)
    if score is not None:
        request.score = score
    return stub.Feedback(request, timeout=30)


def route_once_the_store_is_retried(stub, request: router_pb2.RouteRequest) -> router_pb2.RouteResponse:
    """After a spend store failure, budgeted calls fail at once until RETRY_AFTER_S has passed."""
    from router.serving.ledger import RETRY_AFTER_S

    deadline = time.monotonic() + 10 * RETRY_AFTER_S
    while True:
        try:
            return stub.Route(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.1)


def decision_record(decision_id: str, embedding_dim: int = 384) -> DecisionRecord:
    """A decision between two models as the service records it, for feedback store tests."""
    return DecisionRecord(
        id=decision_id,
        created_at=time.time(),
        tenant="",
        bundle_version="test",
        model="small",
        cost_weight=0.1,
        propensity=1.0,
        models=("small", "large"),
        quality=np.array([0.5, 0.8]),
        cost_usd=np.array([1e-4, 1e-3]),
        output_tokens=np.array([100.0, 120.0]),
        input_tokens=20,
        features=np.full(embedding_dim + len(EXTRA_FEATURES), 0.05, dtype=np.float32),
        prompt=None,
    )
