"""Shared fixtures: the real routing tables, and a small bundle built through the real pipeline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ROUTER_DATA_DIR", REPO.parent / "shared" / "data"))
# Large enough for every model to get a real booster, small enough to train in seconds.
SMALL_PROMPTS = 700


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "mmlu_pro" / "prompts.parquet").exists():
        raise RuntimeError(f"routing tables not found at {DATA} (set ROUTER_DATA_DIR)")
    return DATA


@pytest.fixture(scope="session")
def small_bundle(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained on a sample of mmlu_pro's train split, through `train_bundle`."""
    from training.pipeline import TrainConfig, train_bundle

    out = tmp_path_factory.mktemp("bundles") / "mmlu_small"
    train_bundle(data_dir / "mmlu_pro", out, TrainConfig(max_prompts=SMALL_PROMPTS))
    return out


@pytest.fixture(scope="session")
def server(small_bundle: Path) -> Iterator[object]:
    from tests.helpers import running_server

    with running_server(bundle=small_bundle) as srv:
        yield srv
