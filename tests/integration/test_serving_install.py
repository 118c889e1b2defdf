"""The serving install on its own: a fresh virtual environment with only the `cpu` extra.

It must install, list only the commands that work there, serve a bundle and answer Route, and
carry none of the training stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.v1 import router_pb2
from tests.helpers import router_stub, serve_command
from training.bench import free_port, wait_serving

REPO = Path(__file__).resolve().parents[2]
TRAINING_LIBRARIES = ("torch", "lightgbm", "transformers", "sentence_transformers", "pandas", "onnxmltools")


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("serving") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # A regular install from a copy of the sources, as the container image makes it.
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{REPO}[cpu]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


@pytest.fixture
def served(serving_venv: Path, small_bundle: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        serve_command([str(serving_venv / "bin" / "router")], small_bundle, port=port),
        cwd=serving_venv,  # not the repository: the venv's own install must be what runs
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        try:
            wait_serving(address, time.perf_counter() + 120, lambda: proc.poll() is None)
        except RuntimeError:
            exited = proc.poll() is not None
            raise AssertionError(proc.stderr.read() if exited and proc.stderr else "never SERVING") from None
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=venv, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_serving_install_carries_no_training_library(serving_venv: Path) -> None:
    python = str(serving_venv / "bin" / "python")
    for name in TRAINING_LIBRARIES:
        result = _run(serving_venv, python, "-c", f"import {name}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, name
    assert _run(serving_venv, python, "-c", "import onnxruntime, router.v1.router_pb2_grpc").returncode == 0


@pytest.mark.slow
def test_the_serving_install_lists_only_what_works_there(serving_venv: Path) -> None:
    router = str(serving_venv / "bin" / "router")
    listed = _run(serving_venv, router, "--help")
    assert listed.returncode == 0, listed.stderr
    assert "{serve,route}" in listed.stdout and "train" not in listed.stdout
    refused = _run(serving_venv, router, "train", "--data", "x", "--out", "y")
    assert refused.returncode == 2 and "invalid choice: 'train'" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_the_serving_install_serves_a_bundle(served: str) -> None:
    with router_stub(served) as stub:
        response = stub.Route(router_pb2.RouteRequest(prompt="What is the capital of Peru?"), timeout=30)
    assert response.model in {e.model for e in response.estimates} and len(response.estimates) == 29
