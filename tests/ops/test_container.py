"""The serving image, built from the real Dockerfile with podman (both targets) and run the way the
Kubernetes manifests run it: non-root, read-only root filesystem, /tmp on a tmpfs, the bundle
mounted read-only (default target) or baked in. Checked through the generated gRPC client:
health, Route, /metrics, the image's health check, a drain on `podman stop` with calls in flight,
and that no training library is importable inside. The compose stack is checked against the same
built image.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from router.v1 import router_pb2, router_pb2_grpc
from tests.helpers import LONG_PROMPT
from tests.ops.podman import REPO, Podman
from tests.ops.support import DEPLOY, PROMETHEUS_CONFIG, load_dashboard, load_yaml
from training.bench import free_port, wait_serving

COMPOSE = DEPLOY / "compose.yaml"
MOUNTED = "localhost/cost-aware-router:test"
BAKED = "localhost/cost-aware-router:test-baked"
TRAINING_LIBRARIES = ("torch", "transformers", "sentence_transformers", "lightgbm", "pandas", "grpc_tools")
# What the build context may hold (the ignore file's allow-list); never .venv, .git, tests or data.
CONTEXT_ALLOWED = {"pyproject.toml", "setup.py", "README.md", "proto", "router", "deploy", "bundles"}


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman.start(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def images(podman: Podman, small_bundle: Path) -> Iterator[dict[str, str]]:
    """Both targets of the real Dockerfile; the baked one with the test bundle inside."""
    podman.build(MOUNTED, "--target=mounted")
    baked_dir = REPO / "bundles" / f".container-test-{uuid.uuid4().hex[:8]}"
    shutil.copytree(small_bundle, baked_dir)
    try:
        podman.build(BAKED, "--target=baked", f"--build-arg=BUNDLE={baked_dir.relative_to(REPO)}")
    finally:
        shutil.rmtree(baked_dir)
    yield {"mounted": MOUNTED, "baked": BAKED}


@pytest.fixture(scope="session")
def run_as() -> str:
    """The user the Kubernetes Deployment runs the container as."""
    deployment = load_yaml(DEPLOY / "k8s" / "base" / "deployment.yaml")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    return f"{context['runAsUser']}:{context.get('runAsGroup', context['runAsUser'])}"


class Container:
    def __init__(self, podman: Podman, name: str, port: int, metrics_port: int) -> None:
        self.podman, self.name, self.port, self.metrics_port = podman, name, port, metrics_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> bool:
        state = self.podman("inspect", "--format", "{{.State.Status}}", self.name, check=False)
        return state.stdout.strip() == "running"

    def wait_serving(self, timeout: float = 120) -> None:
        try:
            wait_serving(self.address, time.perf_counter() + timeout, alive=self.running)
        except RuntimeError as exc:
            raise AssertionError(f"{self.name}: {exc}\n{self.logs()[-4000:]}") from exc

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr


@contextmanager
def container(podman: Podman, image: str, user: str, bundle: Path | None = None) -> Iterator[Container]:
    """The image run as Kubernetes runs it, on host networking (ports from the ROUTER_* variables)."""
    name = f"router-test-{uuid.uuid4().hex[:8]}"
    port, metrics_port = free_port(), free_port()
    args = [
        "run", "-d", "--name", name, "--network=host", f"--user={user}", "--read-only",
        "--tmpfs=/tmp", "--cap-drop=ALL", "--security-opt=no-new-privileges",
        f"--env=ROUTER_PORT={port}", f"--env=ROUTER_METRICS_PORT={metrics_port}",
        "--env=ROUTER_HOST=127.0.0.1", "--env=ROUTER_METRICS_HOST=127.0.0.1",
    ]  # fmt: skip
    if bundle is not None:
        args.append(f"--volume={bundle}:/bundles/current:ro")
    podman("run", *args[1:], image)
    try:
        yield Container(podman, name, port, metrics_port)
    finally:
        podman("rm", "--force", "--time=0", name, check=False)


def test_the_build_context_holds_only_what_the_image_needs(podman: Podman, images: dict[str, str]) -> None:
    """What podman really sends with the shipped ignore file, listed by a probe build of it."""
    probe = REPO / "deploy" / "docker" / f".probe-{uuid.uuid4().hex[:8]}.Dockerfile"
    probe.write_text(f"FROM {images['mounted']}\nCOPY . /context\n", encoding="utf-8")
    try:
        podman.build("localhost/router-context-probe:test", dockerfile=probe)
    finally:
        probe.unlink()
    listing = podman(
        "run", "--rm", "--entrypoint=python", "localhost/router-context-probe:test", "-c",
        "import os; print('\\n'.join(os.path.relpath(os.path.join(d, f), '/context') "
        "for d, _, fs in os.walk('/context') for f in fs))",
    ).stdout.split()  # fmt: skip
    podman("rmi", "localhost/router-context-probe:test", check=False)
    top = {path.split("/")[0] for path in listing}
    assert top <= CONTEXT_ALLOWED, top - CONTEXT_ALLOWED
    assert "router/core/engine.py" in listing and "proto/router/v1/router.proto" in listing
    assert not [p for p in listing if re.search(r"_pb2(_grpc)?\.pyi?$", p)], "stale generated code"
    assert not [p for p in listing if p.startswith("deploy/") and not p.startswith("deploy/docker/")]


def test_the_mounted_image_serves_a_read_only_bundle_as_kubernetes_runs_it(
    podman: Podman, images: dict[str, str], small_bundle: Path, run_as: str
) -> None:
    info = podman.inspect(images["mounted"])
    assert info["Config"]["User"] == run_as, "the image's own user is the one the manifests expect"
    with container(podman, images["mounted"], run_as, bundle=small_bundle) as c:
        c.wait_serving()
        with grpc.insecure_channel(c.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            response = stub.Route(router_pb2.RouteRequest(prompt="What is the capital of Peru?"), timeout=30)
            info_reply = stub.Info(router_pb2.InfoRequest(), timeout=10)
        assert response.model in {e.model for e in response.estimates} and len(response.estimates) == 29
        assert info_reply.execution_provider == "CPUExecutionProvider"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=10).read()
        assert b'router_requests_total{code="OK",method="/router.v1.Router/Route"} 1.0' in metrics
        check = podman("exec", c.name, "python", "/opt/router/healthcheck.py", check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        whoami = podman("exec", c.name, "id", "-u").stdout.strip()
        assert whoami == run_as.split(":")[0]
        writable = podman("exec", c.name, "touch", "/opt/router/x", check=False)
        assert writable.returncode != 0, "the root filesystem must be read-only"
        assert "Traceback" not in c.logs()


def test_the_baked_image_serves_its_own_bundle(
    podman: Podman, images: dict[str, str], small_bundle: Path, run_as: str
) -> None:
    from router.core.manifest import Manifest

    with container(podman, images["baked"], run_as) as c:
        c.wait_serving()
        with grpc.insecure_channel(c.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            reply = stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
    assert reply.bundle_version == Manifest.read(small_bundle).bundle_version


def test_podman_stop_drains_32_calls_in_flight(
    podman: Podman, images: dict[str, str], small_bundle: Path, run_as: str
) -> None:
    with container(podman, images["mounted"], run_as, bundle=small_bundle) as c:
        c.wait_serving()
        codes: list[grpc.StatusCode] = []
        started = threading.Barrier(33)

        def call() -> None:
            with grpc.insecure_channel(c.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                started.wait()
                try:
                    stub.Route(router_pb2.RouteRequest(prompt=LONG_PROMPT), timeout=60)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        threads = [threading.Thread(target=call) for _ in range(32)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.3)  # the calls are on the wire and admitted
        stop = podman("stop", "--time=30", c.name, check=False)
        for t in threads:
            t.join(timeout=90)
        assert stop.returncode == 0, stop.stderr
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", c.name).stdout.strip()
        logs = c.logs()
    assert codes == [grpc.StatusCode.OK] * 32, codes
    assert exit_code == "0" and "shutting down: draining" in logs, logs[-2000:]


def test_no_training_library_is_importable_in_the_image(podman: Podman, images: dict[str, str]) -> None:
    for image in images.values():
        for name in TRAINING_LIBRARIES:
            result = podman(
                "run", "--rm", "--entrypoint=python", image, "-I", "-c", f"import {name}", check=False
            )
            assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (image, name)
        ok = podman("run", "--rm", "--entrypoint=python", image, "-I", "-c", "import onnxruntime, router.v1")
        assert ok.returncode == 0


@pytest.fixture(scope="module")
def image_env(podman: Podman, images: dict[str, str]) -> dict[str, str]:
    config = podman.inspect(images["mounted"])["Config"]
    return dict(item.split("=", 1) for item in config["Env"])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/), for the short and the long syntax."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out[target] = source
    return out


def test_compose_builds_this_dockerfile_and_mounts_bundles_read_only(
    compose: dict[str, Any], image_env: dict[str, str]
) -> None:
    router = compose["services"]["router"]
    build = router["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == REPO / "deploy" / "docker" / "Dockerfile"
    assert build["target"] in {"mounted", "baked"}
    env = router["environment"]
    assert env["ROUTER_BUNDLE"].startswith("/bundles/")
    (bundles,) = [v for v in router["volumes"] if v["target"] == "/bundles"]
    assert bundles["read_only"] is True and bundles["type"] == "bind"
    assert router["read_only"] is True and "/tmp" in router["tmpfs"]
    assert router["cap_drop"] == ["ALL"]
    # docker stop sends SIGTERM, then SIGKILL after stop_grace_period: it must outlast the drain.
    assert _seconds(router["stop_grace_period"]) > float(env["ROUTER_GRACE_PERIOD_S"])
    published = {int(p.rsplit(":", 1)[1]) for p in router["ports"]}
    assert published == {int(image_env["ROUTER_PORT"]), int(image_env["ROUTER_METRICS_PORT"])}


def test_compose_prometheus_scrapes_the_router_service_with_the_shipped_config(
    compose: dict[str, Any], image_env: dict[str, str]
) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    container_path = Path(config_arg.split("=", 1)[1])
    host_dir = (COMPOSE.parent / mounts[str(container_path.parent)]).resolve()
    assert host_dir / container_path.name == PROMETHEUS_CONFIG
    (job,) = [j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == "router"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert int(port) == int(image_env["ROUTER_METRICS_PORT"])


def test_compose_grafana_provisions_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = (COMPOSE.parent / mounts["/etc/grafana/provisioning"]).resolve()
    assert provisioning == DEPLOY / "grafana" / "provisioning"

    (provider,) = load_yaml(provisioning / "dashboards" / "router.yml")["providers"]
    dashboards_dir = (COMPOSE.parent / mounts[provider["options"]["path"]]).resolve()
    assert (dashboards_dir / "router.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).relative_to(provider["options"]["path"])).is_file()

    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    match = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"])
    assert match and match.group(1) in compose["services"], source["url"]
    prometheus_port = next(a for a in compose["services"]["prometheus"]["ports"]).rsplit(":", 1)[1]
    assert match.group(2) == prometheus_port
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    # $__rate_interval is only right when Grafana knows the scrape interval.
    (job,) = [j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == "router"]
    assert _seconds(source["jsonData"]["timeInterval"]) == _seconds(job["scrape_interval"])

    for name, service in compose["services"].items():
        for target, host in _bind_mounts(service).items():
            if not host.startswith("${") and host.startswith("."):
                assert (COMPOSE.parent / host).exists(), f"{name}: {host} (mounted on {target}) is missing"
