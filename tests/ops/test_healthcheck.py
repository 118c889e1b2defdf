"""The container's health probe (deploy/docker/healthcheck.py) against the real server: it must say
healthy only when the router's service is SERVING, over plaintext or TLS, configured by the same
ROUTER_* variables as the server, and never hang."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import ServerThread, running_server
from tests.ops.support import DEPLOY, free_port

PROBE = DEPLOY / "docker" / "healthcheck.py"


def _probe(env: dict[str, str], *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Runs the probe as the image does: its own process, from outside the source tree."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    return subprocess.run(
        [sys.executable, str(PROBE), *args],
        env=clean | env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_probe_is_healthy_on_the_port_from_router_port(server: ServerThread) -> None:
    done = _probe({"ROUTER_PORT": str(server.server.port)})
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_probe_is_unhealthy_for_an_unknown_service_and_a_closed_port(server: ServerThread) -> None:
    unknown = _probe({}, "--address", server.address, "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr

    started = time.monotonic()
    closed = _probe({"ROUTER_PORT": str(free_port())}, "--timeout", "2")
    assert closed.returncode == 1
    assert "UNAVAILABLE" in closed.stderr or "DEADLINE_EXCEEDED" in closed.stderr, closed.stderr
    assert time.monotonic() - started < 15, "the probe must give up within its timeout"


def test_probe_speaks_tls_and_fails_once_the_drain_starts(small_bundle: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with running_server(bundle=small_bundle, tls_cert=cert, tls_key=key) as srv:
        env = {"ROUTER_PORT": str(srv.server.port), "ROUTER_TLS_CERT": str(cert)}
        healthy = _probe(env)
        assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING"), healthy.stderr

        plaintext = _probe({"ROUTER_PORT": str(srv.server.port)}, "--timeout", "2")
        assert plaintext.returncode == 1, "a plaintext probe must not pass against a TLS port"

        # What SIGTERM does first: health NOT_SERVING, so that the orchestrator stops sending calls.
        srv.call(srv.server.health.enter_graceful_shutdown())
        draining = _probe(env)
        assert (draining.returncode, draining.stdout.strip()) == (1, "NOT_SERVING"), draining.stderr
