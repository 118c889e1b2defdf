"""The budget replay's figures on runs shorter than its transient and window, and on tables whose
prompts have no category (a traceback, or windows averaged over fewer calls than they claim)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.budget_replay import TRANSIENT, WINDOW, _categories, _windows


def test_a_run_shorter_than_transient_and_window_uses_its_own_sizes() -> None:
    spend = np.r_[np.full(40, 2.0), np.full(80, 1.0)]  # over the target at first, then on it
    figures = _windows(spend, target=1.0)
    assert figures["transient_calls"] == 40 and figures["window_calls"] == 80
    assert figures["worst_window_over_target"] == pytest.approx(1.0)
    assert figures["windows_within_10pct"] == 1.0
    assert figures["whole_run_over_target"] == pytest.approx(spend.mean())


def test_a_long_run_keeps_the_issues_transient_and_window() -> None:
    spend = np.r_[np.full(TRANSIENT, 3.0), np.full(WINDOW, 1.0), np.full(WINDOW, 0.5)]
    figures = _windows(spend, target=1.0)
    assert (figures["transient_calls"], figures["window_calls"]) == (TRANSIENT, WINDOW)
    assert figures["worst_window_over_target"] == pytest.approx(0.5)
    assert 0 < figures["windows_within_10pct"] < 1


def test_prompts_without_a_category_are_one_category() -> None:
    assert _categories(pd.DataFrame({"prompt": ["a", "b"]})).tolist() == ["", ""]
    mixed = pd.DataFrame({"source": ["math", None, "law"]})
    assert _categories(mixed).tolist() == ["math", "", "law"]
    assert np.argsort(_categories(mixed), kind="stable").tolist() == [1, 2, 0]
