"""What the ops tests share: where deploy/ keeps things, reading the dashboard and the rules, and a
real Prometheus server run on loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from training.bench import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "router.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "router-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "router-alerts.test.yml"
K8S = DEPLOY / "k8s"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
ROUTE_METHOD = "/router.v1.Router/Route"

# The service's own metric families and the process collector's: what a query may only name if the
# router exports it. Anything else (up, ALERTS, ...) is Prometheus's own.
_SERVICE_METRIC = re.compile(r"\b((?:router|process)_[a-zA-Z0-9_]+)")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def require_binary(name: str) -> str:
    """The binary's path; a test that needs a missing one fails, because a skip would hide it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: install Debian's `prometheus` package (`make prometheus`)")
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def service_metric_names(expr: str) -> set[str]:
    return set(_SERVICE_METRIC.findall(expr))


def queried_metrics(expr: str) -> set[str]:
    """Every metric an expression reads: selectors with braces (up{...} too), and bare service names."""
    return {name for name, _ in _SELECTOR.findall(expr)} | service_metric_names(expr)


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Label names matched in each `metric{...}` selector of the expression."""
    out: dict[str, set[str]] = {}
    for metric, matchers in _SELECTOR.findall(expr):
        out.setdefault(metric, set()).update(_MATCHER.findall(matchers))
    return out


def legend_labels(legend: str) -> set[str]:
    return set(_LEGEND_LABEL.findall(legend or ""))


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's `label_values(...)`, in either of the forms Grafana saves."""
    query = variable.get("query")
    return str(query.get("query", "")) if isinstance(query, dict) else str(query or "")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replaces Grafana's $name and ${name} by concrete values; fails on any it does not know."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    # Names are matched greedily, so $__rate_interval is one name, never $__rate followed by text.
    return re.sub(r"\$\{([a-zA-Z_][a-zA-Z0-9_]*)\}|\$([a-zA-Z_][a-zA-Z0-9_]*)", one, expr)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


@dataclass
class Prometheus:
    """A Prometheus server the test started, on loopback, with its TSDB in a temporary folder."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        try:
            body = http_get(f"{self.url}/api/v1/{path}?{query}")
        except urllib.error.HTTPError as exc:  # 400/422 for a query that does not parse or evaluate
            body = exc.read()
        return dict(json.loads(body))

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def wait_for(self, expr: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Polls until the instant query returns at least one series."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.query(expr)
            if last.get("status") == "success" and last["data"]["result"]:
                return list(last["data"]["result"])
            time.sleep(0.25)
        raise AssertionError(f"no data for {expr!r}; last answer {last}\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def run_prometheus(config: Path, workdir: Path) -> Iterator[Prometheus]:
    """Starts `prometheus` on a free loopback port and stops it afterwards."""
    binary = require_binary("prometheus")
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{prom.tail()}")
            try:
                if http_get(f"{prom.url}/-/ready", timeout=1).strip():
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after 30 s:\n{prom.tail()}")
            time.sleep(0.1)
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
