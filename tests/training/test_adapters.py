"""SPROUT and RouterBench adapters, on files written in those formats from real rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.adapters import load_routerbench, load_sprout, write_canonical
from training.tables import TableError, load_table

MODELS = ["gemini-1.5-flash-002", "Meta-Llama-3_1-8B-Instruct", "Yi-6B"]


@pytest.fixture(scope="module")
def real_rows(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    src = data_dir / "mmlu_pro"
    prompts = pd.read_parquet(src / "prompts.parquet")
    prompts = pd.concat(
        [prompts[prompts.split == "train"].head(60), prompts[prompts.split == "test"].head(20)]
    )
    outcomes = pd.read_parquet(src / "outcomes.parquet")
    outcomes = outcomes[outcomes.prompt_id.isin(prompts.prompt_id) & outcomes.model.isin(MODELS)]
    models = pd.read_csv(src / "models.csv")
    return prompts.reset_index(drop=True), outcomes.reset_index(drop=True), models[models.model.isin(MODELS)]


def _sprout_dataset(prompts: pd.DataFrame, outcomes: pd.DataFrame, tmp_path: Path) -> Path:
    import datasets

    splits = {}
    train = prompts[prompts.split == "train"]
    for name, part in (
        ("train", train.iloc[:40]),
        ("validation", train.iloc[40:]),
        ("test", prompts[prompts.split == "test"]),
    ):
        columns: dict[str, list] = {"prompt": list(part.prompt), "golden answer": ["A"] * len(part)}
        for model in MODELS:
            rows = outcomes[outcomes.model == model].set_index("prompt_id")
            columns[model] = [
                {
                    "num_input_tokens": int(rows.loc[pid, "input_tokens"]),
                    "num_output_tokens": int(rows.loc[pid, "output_tokens"]),
                    "response": "…",
                    "score": float(rows.loc[pid, "score"]),
                }
                for pid in part.prompt_id
            ]
        splits[name] = datasets.Dataset.from_dict(columns)
    path = tmp_path / "sprout"
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def test_sprout_adapter_reproduces_the_rows(real_rows, tmp_path: Path) -> None:
    prompts, outcomes, models = real_rows
    prices = tmp_path / "prices.csv"
    models.to_csv(prices, index=False)
    table = load_sprout(_sprout_dataset(prompts, outcomes, tmp_path), prices)
    assert sorted(table.models) == sorted(MODELS)
    assert (table.prompts.split == "train").sum() == 60 and (table.prompts.split == "test").sum() == 20
    # the same prompts, scores and costs as the source table (cost recomputed from tokens x prices)
    merged = table.outcomes.merge(table.prompts[["prompt_id", "prompt"]], on="prompt_id").merge(
        outcomes.merge(prompts[["prompt_id", "prompt"]], on="prompt_id"),
        on=["prompt", "model"],
        suffixes=("", "_src"),
    )
    assert len(merged) == len(outcomes)
    assert np.allclose(merged.score, merged.score_src)
    assert np.allclose(merged.cost_usd.astype(float), merged.cost_usd_src, rtol=1e-6)
    out = tmp_path / "canonical"
    write_canonical(table, out)
    assert len(load_table(out).outcomes) == len(outcomes)


def test_sprout_model_without_price_is_refused(real_rows, tmp_path: Path) -> None:
    prompts, outcomes, models = real_rows
    prices = tmp_path / "prices.csv"
    models[models.model != "Yi-6B"].to_csv(prices, index=False)
    with pytest.raises(TableError, match="'Yi-6B' has no price"):
        load_sprout(_sprout_dataset(prompts, outcomes, tmp_path), prices)


def _routerbench_frame(prompts: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    wide = pd.DataFrame(
        {"sample_id": prompts.prompt_id, "prompt": prompts.prompt, "eval_name": prompts.source}
    )
    for model in MODELS:
        rows = outcomes[outcomes.model == model].set_index("prompt_id")
        wide[model] = rows.loc[prompts.prompt_id, "score"].to_numpy()
        wide[f"{model}|model_response"] = "…"
        wide[f"{model}|total_cost"] = rows.loc[prompts.prompt_id, "cost_usd"].to_numpy()
    return wide


@pytest.mark.parametrize("suffix", [".pkl", ".csv"])
def test_routerbench_adapter_reads_pickle_and_csv(real_rows, tmp_path: Path, suffix: str) -> None:
    prompts, outcomes, models = real_rows
    wide = _routerbench_frame(prompts, outcomes)
    path = tmp_path / f"routerbench{suffix}"
    wide.to_pickle(path) if suffix == ".pkl" else wide.to_csv(path, index=False)
    prices = tmp_path / "prices.csv"
    models.to_csv(prices, index=False)
    table = load_routerbench(path, prices)
    assert sorted(table.models) == sorted(MODELS)
    assert set(table.prompts.split) == {"train", "test"}
    got = table.outcomes.set_index(["prompt_id", "model"]).sort_index()
    want = outcomes.set_index(["prompt_id", "model"]).sort_index()
    assert np.allclose(got.score, want.score)
    assert np.allclose(got.cost_usd.astype(float), want.cost_usd)


def test_routerbench_bad_tables_are_refused(real_rows, tmp_path: Path) -> None:
    prompts, outcomes, models = real_rows
    prices = tmp_path / "prices.csv"
    models.to_csv(prices, index=False)
    wide = _routerbench_frame(prompts, outcomes)
    wide.drop(columns=["eval_name"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(TableError, match="missing column 'eval_name'"):
        load_routerbench(tmp_path / "a.csv", prices)
    bad = wide.copy()
    bad.loc[0, "Yi-6B"] = 7.0
    bad.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(TableError, match=r"score must be a number in 0\.\.1"):
        load_routerbench(tmp_path / "b.csv", prices)
    bad = wide.copy()
    bad.loc[0, "Yi-6B|total_cost"] = -1.0
    bad.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(TableError, match="negative cost_usd"):
        load_routerbench(tmp_path / "c.csv", prices)
