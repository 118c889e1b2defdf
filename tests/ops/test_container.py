"""The Dockerfile, its ignore file and the compose stack, read as files (no Docker engine here): the
serving image installs only the `cpu` extra, runs as a numeric non-root user with a gRPC health
check, and the compose stack's services, mounts and ports fit together with the shipped configs."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ops.support import DEPLOY, PROMETHEUS_CONFIG, REPO, load_dashboard, load_yaml

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = value
        return out


def _stages() -> list[Stage]:
    """The Dockerfile's stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(pending)
            pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), flags=re.IGNORECASE)
            assert match, line
            stages.append(Stage(match.group(2) or str(len(stages)), match.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in _stages()}


def _ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_image_is_multi_stage_and_the_default_target_mounts_the_bundle(stages: dict[str, Stage]) -> None:
    ordered = _stages()
    assert len(ordered) >= 2
    assert {"build", "runtime", "baked"} <= set(stages)
    # The last stage is what `docker build` builds by default: the runtime, bundle from a volume.
    assert ordered[-1].base == "runtime" and not ordered[-1].instructions
    assert stages["runtime"].base == stages["build"].base, "the venv is copied: same Python in both"


def test_serving_image_installs_the_cpu_extra_only(stages: dict[str, Stage]) -> None:
    installs = [a for s in stages.values() for a in s.all("RUN") if "pip install" in a]
    assert installs and all(a.startswith("/opt/router/bin/pip") for a in installs)
    extras = {e for a in installs for group in re.findall(r"\.\[([^\]]*)\]", a) for e in group.split(",")}
    assert extras == {"cpu"}, f"extras installed: {extras}"
    assert not re.search(r"\b(torch|lightgbm|sentence-transformers|onnxruntime-gpu)\b", " ".join(installs))
    # Nothing is installed in the runtime stage: it only copies the venv built in `build`.
    assert not [a for a in stages["runtime"].all("RUN") if "install" in a]
    assert "--from=build /opt/router /opt/router" in stages["runtime"].all("COPY")
    # The build fails if a training library arrives through a dependency.
    guard = " ".join(stages["build"].all("RUN"))
    for library in ("torch", "transformers", "sentence_transformers", "lightgbm"):
        assert f"'{library}'" in guard


def test_runtime_runs_non_root_with_grpc_health_check_and_the_routers_ports(stages: dict[str, Stage]) -> None:
    runtime = stages["runtime"]
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric, so that runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) > 0
    deployment = load_yaml(DEPLOY / "k8s" / "base" / "deployment.yaml")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)

    (health,) = runtime.all("HEALTHCHECK")
    command = health.split("CMD", 1)[1]
    assert "/opt/router/healthcheck.py" in command
    assert "deploy/docker/healthcheck.py /opt/router/healthcheck.py" in runtime.all("COPY")

    env = runtime.env()
    exposed = {int(p) for args in runtime.all("EXPOSE") for p in args.split()}
    assert exposed == {int(env["ROUTER_PORT"]), int(env["ROUTER_METRICS_PORT"])}
    assert env["ROUTER_HOST"] == env["ROUTER_METRICS_HOST"] == "0.0.0.0"
    assert env["ROUTER_BUNDLE"] == "/bundles/current"
    assert runtime.all("ENTRYPOINT") == ['["router", "serve"]']
    baked = stages["baked"].env()
    assert baked["ROUTER_BUNDLE"] == "/opt/router/bundle" and float(baked["ROUTER_BUNDLE_POLL_S"]) == 0
    assert any(a.endswith(" /opt/router/bundle") for a in stages["baked"].all("COPY"))


def test_build_context_holds_what_the_image_copies_and_nothing_heavy(stages: dict[str, Stage]) -> None:
    sources = []
    for stage in stages.values():
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if not args.startswith("--from"):
                sources += words[:-1]
    assert sources
    for source in sources:
        if source.startswith("${"):
            source = "bundles/default"  # the `baked` stage's default BUNDLE build argument
        else:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    for heavy in (".venv/bin/python", ".git/config", "tests/conftest.py", "training/pipeline.py"):
        assert _ignored(heavy), f"{heavy} would be sent to the Docker daemon"
    assert _ignored("router/v1/router_pb2.py"), "a stale generated file would shadow the build's"


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


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def test_compose_builds_this_dockerfile_and_mounts_bundles_read_only(
    compose: dict[str, Any], stages: dict[str, Stage]
) -> None:
    router = compose["services"]["router"]
    build = router["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["target"] in stages
    env = router["environment"]
    assert env["ROUTER_BUNDLE"].startswith("/bundles/")
    (bundles,) = [v for v in router["volumes"] if v["target"] == "/bundles"]
    assert bundles["read_only"] is True and bundles["type"] == "bind"
    assert router["read_only"] is True and "/tmp" in router["tmpfs"]
    assert router["cap_drop"] == ["ALL"]
    # docker stop sends SIGTERM, then SIGKILL after stop_grace_period: it must outlast the drain.
    assert _seconds(router["stop_grace_period"]) > float(env["ROUTER_GRACE_PERIOD_S"])
    published = {int(p.rsplit(":", 1)[1]) for p in router["ports"]}
    runtime_env = stages["runtime"].env()
    assert published == {int(runtime_env["ROUTER_PORT"]), int(runtime_env["ROUTER_METRICS_PORT"])}


def test_compose_prometheus_scrapes_the_router_service_with_the_shipped_config(
    compose: dict[str, Any], stages: dict[str, Stage]
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
    assert int(port) == int(stages["runtime"].env()["ROUTER_METRICS_PORT"])


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
