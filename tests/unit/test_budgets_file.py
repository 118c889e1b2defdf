"""The budgets file's reader, on files on disk: what it refuses and what it warns about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from router.serving.budgets import BudgetsError, read_budgets


def test_keys_beside_the_budgets_are_kept_out_but_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(
        "owner: platform-team\n"
        "tenants:\n"
        "  batch-jobs: {limit_usd: 5.0, limit: 2.0, note: nightly}\n"
        "  search-team: {target_usd_per_1k: 0.18}\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="router.serving.budgets"):
        budgets = read_budgets(path)
    assert budgets.tenants["batch-jobs"].limit_usd == 5.0
    named = " ".join(r.getMessage() for r in caplog.records)
    for key in ("owner", "tenants.batch-jobs.limit", "tenants.batch-jobs.note"):
        assert f" {key} is not a budgets key" in named
    assert "search-team" not in named and "limit_usd" not in named


def test_a_file_without_tenants_is_refused_rather_than_lifting_every_budget(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    for text in ("tenant:\n  batch-jobs: {limit_usd: 5.0}\n", "{}\n"):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(BudgetsError, match="tenants: Field required"):
            read_budgets(path)
    path.write_text("tenants: {}\n", encoding="utf-8")
    assert read_budgets(path).tenants == {}


def test_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    """PyYAML's YAML 1.1 reads `5e-3` as a string; the strict number check then refused a file
    that earlier releases read as 0.005."""
    path = tmp_path / "budgets.yaml"
    path.write_text(
        "tenants:\n  a: {limit_usd: 5e-3, window_s: 1e3}\n  b: {target_usd_per_1k: 1.8E-1}\n",
        encoding="utf-8",
    )
    budgets = read_budgets(path)
    assert budgets.tenants["a"].limit_usd == 0.005 and budgets.tenants["a"].window_s == 1000.0
    assert budgets.tenants["b"].target_usd_per_1k == 0.18
    path.write_text('tenants:\n  a: {limit_usd: "5e-3"}\n', encoding="utf-8")
    with pytest.raises(BudgetsError, match="limit_usd"):  # a quoted number is still text
        read_budgets(path)
