"""The container's health probe (deploy/docker/healthcheck.py) against the real server: it must say
healthy only when the router's service is SERVING, over plaintext or TLS, configured by the same
ROUTER_* variables as the server, and never hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import ServerThread, certificate, running_server, write_pem
from tests.ops.support import DEPLOY
from training.bench import free_port

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
    cert, key = certificate("localhost", ca=True)
    return write_pem(cert, key, directory, "server")


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
