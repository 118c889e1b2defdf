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
# The fleet tests train without this mmlu_pro model and add it back from this many anchors.
HELD_OUT = "gemini-1.5-pro-002"
N_ANCHORS = 60


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


@pytest.fixture(scope="session")
def without(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mmlu_pro bundle trained without the held-out model."""
    from training.pipeline import TrainConfig, train_bundle

    out = tmp_path_factory.mktemp("fleet") / "without"
    config = TrainConfig(max_prompts=SMALL_PROMPTS, exclude_models=(HELD_OUT,))
    train_bundle(data_dir / "mmlu_pro", out, config)
    return out


@pytest.fixture(scope="session")
def anchor_files(without: Path, data_dir: Path) -> tuple[Path, Path]:
    """Anchors chosen by `router anchors`, scored with the held-out model's real outcomes."""
    import pandas as pd

    from router.cli import main

    prompts = without.parent / "anchors.parquet"
    assert main(["anchors", "--bundle", str(without), "--data", str(data_dir / "mmlu_pro"),
                 "--n", str(N_ANCHORS), "--out", str(prompts)]) == 0  # fmt: skip
    anchors = pd.read_parquet(prompts)
    outcomes = pd.read_parquet(data_dir / "mmlu_pro" / "outcomes.parquet")
    mine = outcomes[(outcomes["model"] == HELD_OUT) & outcomes["prompt_id"].isin(anchors["prompt_id"])]
    path = without.parent / "outcomes.parquet"
    mine.to_parquet(path, index=False)
    return prompts, path


@pytest.fixture(scope="session")
def added(without: Path, anchor_files: tuple[Path, Path]) -> Path:
    """`without` with the held-out model added back by `router add-model`."""
    from router.cli import main

    out = without.parent / "added"
    prompts, outcomes = anchor_files
    code = main(
        ["add-model", "--bundle", str(without), "--model", HELD_OUT, "--prompts", str(prompts),
         "--outcomes", str(outcomes), "--input-usd-per-mtok", "1.25", "--output-usd-per-mtok", "5",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    return out
