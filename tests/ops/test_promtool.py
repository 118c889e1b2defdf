"""promtool on what deploy/prometheus ships: the config and rules are valid, and the rules' own unit
tests (synthetic series in, expected alerts out) pass and cover every alert both ways."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.ops.support import (
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    RULES,
    alert_rules,
    load_yaml,
    require_binary,
)


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_shipped_config_is_valid_and_loads_the_rules() -> None:
    # `check config` also checks every rule file the config names, resolved as Prometheus would.
    done = _promtool("check", "config", PROMETHEUS_CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout, done.stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout, done.stdout


def test_shipped_rules_are_valid() -> None:
    done = _promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout, done.stdout


def test_promtool_rejects_a_rule_that_does_not_parse(tmp_path: Path) -> None:
    """The two checks above have teeth: a typo in an expression fails them."""
    broken = tmp_path / "broken.yml"
    text = RULES.read_text().replace("sum by (job, instance) (increase(", "sum by (job, instance) (increse(")
    assert text != RULES.read_text()
    broken.write_text(text)
    done = _promtool("check", "rules", broken)
    assert done.returncode != 0
    assert "increse" in done.stdout + done.stderr


def test_alert_unit_tests_pass_and_cover_every_alert_firing_and_silent() -> None:
    done = _promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout

    fires: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), f"no unit test shows these alerts firing: {sorted(names - fires)}"
    assert names - silent == set(), f"no unit test shows these staying silent: {sorted(names - silent)}"
