"""Loading real routing tables, and refusing bad ones with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.tables import RoutingTable, TableError, carve_validation, complete_rows, load_table


def _copy(
    data_dir: Path, tmp_path: Path, n_prompts: int = 50
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    src = data_dir / "mmlu_pro"
    prompts = pd.read_parquet(src / "prompts.parquet").head(n_prompts)
    outcomes = pd.read_parquet(src / "outcomes.parquet")
    outcomes = outcomes[outcomes["prompt_id"].isin(prompts["prompt_id"])].reset_index(drop=True)
    return prompts, outcomes, pd.read_csv(src / "models.csv")


def _write(tmp_path: Path, prompts: pd.DataFrame, outcomes: pd.DataFrame, models: pd.DataFrame) -> Path:
    out = tmp_path / "table"
    out.mkdir(exist_ok=True)
    prompts.to_parquet(out / "prompts.parquet")
    outcomes.to_parquet(out / "outcomes.parquet")
    models.to_csv(out / "models.csv", index=False)
    return out


@pytest.mark.parametrize("name", ["mmlu_pro", "dcrouter", "routellm_pair"])
def test_every_shipped_table_loads(data_dir: Path, name: str) -> None:
    table = load_table(data_dir / name)
    train, test = table.split("train"), table.split("test")
    assert len(train.prompts) > len(test.prompts) > 0
    score = train.matrix("score")
    assert score.shape == (len(train.prompts), len(table.models))
    assert np.nanmin(score) >= 0 and np.nanmax(score) <= 1
    assert complete_rows(test).sum() > 0


def test_validation_is_carved_from_train_reproducibly(data_dir: Path) -> None:
    train = load_table(data_dir / "dcrouter").split("train")
    fit, val = carve_validation(train, 0.15, seed=0)
    again = carve_validation(train, 0.15, seed=0)[1]
    assert set(fit.prompts["prompt_id"]).isdisjoint(val.prompts["prompt_id"])
    assert len(fit.prompts) + len(val.prompts) == len(train.prompts)
    assert list(val.prompts["prompt_id"]) == list(again.prompts["prompt_id"])
    assert 0.10 < len(val.prompts) / len(train.prompts) < 0.20
    few = train.subset(list(train.prompts["prompt_id"][:3]))
    with pytest.raises(TableError, match="3 train prompts are too few to carve a validation share"):
        carve_validation(few, 0.15, seed=0)


def test_missing_column_is_named(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    with pytest.raises(TableError, match=r"missing column.*score"):
        load_table(_write(tmp_path, p, o.drop(columns=["score"]), m))


def test_score_outside_unit_interval_is_refused(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    o.loc[3, "score"] = 1.5
    with pytest.raises(TableError, match=r"score must be a number in 0\.\.1"):
        load_table(_write(tmp_path, p, o, m))


def test_negative_cost_is_refused(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    o.loc[0, "cost_usd"] = -0.01
    with pytest.raises(TableError, match="negative cost_usd"):
        load_table(_write(tmp_path, p, o, m))


def _break(change: str, p: pd.DataFrame, o: pd.DataFrame, m: pd.DataFrame) -> None:
    if change == "huge_tokens":
        o["output_tokens"] = o["output_tokens"].astype(float)
        o.loc[0, "output_tokens"] = 1e15
    elif change == "text_tokens":
        o["input_tokens"] = [str(int(t)) for t in o["input_tokens"].fillna(1)]
        o.loc[0, "input_tokens"] = "many"
    elif change == "infinite_cost":
        o.loc[0, "cost_usd"] = np.inf
    elif change == "infinite_price":
        m.loc[0, "input_usd_per_mtok"] = np.inf
    elif change == "text_price":
        m["input_usd_per_mtok"] = m["input_usd_per_mtok"].astype(object)
        m.loc[0, "input_usd_per_mtok"] = "abc"
    elif change == "integer_ids":
        ids = {pid: i for i, pid in enumerate(p["prompt_id"])}
        p["prompt_id"] = p["prompt_id"].map(ids)
        o["prompt_id"] = o["prompt_id"].map(ids)
    elif change == "padded_name":
        m.loc[0, "model"] = f" {m.loc[0, 'model']} "
    elif change == "blank_prompt":
        p.loc[1, "prompt"] = " \u200b\n"
    elif change == "null_id":
        o.drop(o.index[o["prompt_id"] == p.loc[0, "prompt_id"]], inplace=True)
        p.loc[0, "prompt_id"] = None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("huge_tokens", "output_tokens must be a count up to 10,000,000, found 1000000000000000.0"),
        ("text_tokens", "input_tokens must be a count up to 10,000,000, found 'many'"),
        ("infinite_cost", "cost_usd must be a finite number, found inf"),
        ("infinite_price", "input_usd_per_mtok of .* must be a number from 0 to 1e\\+06, found inf"),
        ("text_price", "input_usd_per_mtok of .* must be a number from 0 to 1e\\+06, found 'abc'"),
        ("integer_ids", "prompt_id must be text, found int64 values"),
        ("null_id", "prompt_id is null in row 0"),
        ("blank_prompt", "1 prompt\\(s\\) have no text \\(first: prompt_id '.*'\\).*--feedback URL"),
        ("padded_name", "models: model name ' .* ' has leading or trailing spaces"),
    ],
)
def test_values_no_evaluation_holds_are_refused_not_trained_on(
    data_dir: Path, tmp_path: Path, change: str, message: str
) -> None:
    """Each of these loaded before: a 1e15-token answer trained into 1e9 USD estimates, a text
    price was fitted over as if missing, integer ids emptied every carved split, a prompt with no
    visible text was embedded as if it had some."""
    p, o, m = _copy(data_dir, tmp_path)
    _break(change, p, o, m)
    with pytest.raises(TableError, match=message):
        load_table(_write(tmp_path, p, o, m))


def test_duplicate_pair_is_refused(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    o = pd.concat([o, o.iloc[[5]]], ignore_index=True)
    with pytest.raises(TableError, match="duplicate \\(prompt_id, model\\) pair"):
        load_table(_write(tmp_path, p, o, m))


def test_model_missing_from_models_csv_is_refused(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    dropped = m["model"].iloc[0]
    with pytest.raises(TableError, match=f"{dropped}.*no row in models.csv"):
        load_table(_write(tmp_path, p, o, m.iloc[1:]))


def test_missing_list_prices_are_fitted_from_recorded_costs(data_dir: Path, tmp_path: Path) -> None:
    """As RouterBench publishes: cost_usd and token counts per call, no price list."""
    p, o, m = _copy(data_dir, tmp_path)
    listed = m.set_index("model")
    table = load_table(_write(tmp_path, p, o, m.drop(columns=["input_usd_per_mtok", "output_usd_per_mtok"])))
    fitted = table.prices.set_index("model")
    for model in table.models:
        for col in ("input_usd_per_mtok", "output_usd_per_mtok"):
            assert fitted.loc[model, col] == pytest.approx(listed.loc[model, col], rel=0.02, abs=1e-3)
        assert fitted.loc[model, "price_source"].startswith("fitted from")
        assert "mean absolute error" in fitted.loc[model, "price_source"]


def test_a_model_with_neither_prices_nor_recorded_costs_is_refused(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    first = m["model"].iloc[0]
    m.loc[0, "output_usd_per_mtok"] = None
    o.loc[o["model"] == first, "cost_usd"] = None
    with pytest.raises(TableError, match=f"{first}.*no list price.*cost_usd"):
        load_table(_write(tmp_path, p, o, m))


def test_missing_file_and_unknown_split_are_named(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TableError, match="missing file"):
        load_table(tmp_path)
    table = load_table(data_dir / "mmlu_pro")
    with pytest.raises(TableError, match="unknown split"):
        table.split("validation")
    assert isinstance(table, RoutingTable)


def test_latency_columns_are_optional_and_checked(data_dir: Path, tmp_path: Path) -> None:
    from training.tables import latency_of

    p, o, m = _copy(data_dir, tmp_path)
    m["ttft_ms"] = [250.0] + [None] * (len(m) - 1)
    m["tpot_ms"] = [12.5] + [None] * (len(m) - 1)
    table = load_table(_write(tmp_path, p, o, m))
    rows = table.prices.set_index("model")
    first, second = m["model"].iloc[0], m["model"].iloc[1]
    assert latency_of(rows.loc[first].to_dict()) == {"ttft_ms": 250.0, "tpot_ms": 12.5}
    assert latency_of(rows.loc[second].to_dict()) == {"ttft_ms": None, "tpot_ms": None}
    m.loc[1, "tpot_ms"] = -3.0
    with pytest.raises(TableError, match=f"tpot_ms of '{second}' must be a non-negative number"):
        load_table(_write(tmp_path, p, o, m))


def test_a_cost_left_empty_is_what_its_tokens_cost_at_the_list_price(data_dir: Path, tmp_path: Path) -> None:
    """A table that records tokens and prices but no bills had no complete prompt to validate on."""
    p, o, m = _copy(data_dir, tmp_path)
    recorded = o.set_index(["prompt_id", "model"])["cost_usd"]
    o = o.assign(cost_usd=np.nan)
    o.loc[o.index[:5], "output_tokens"] = None  # then the input tokens alone, as input-only costs are
    table = load_table(_write(tmp_path, p, o, m))
    priced = table.outcomes.set_index(["prompt_id", "model"])["cost_usd"].astype(float)
    full = priced.index.isin(o.loc[o.index[5:]].set_index(["prompt_id", "model"]).index)
    np.testing.assert_allclose(priced[full], recorded[priced.index[full]], rtol=1e-6)
    listed = m.set_index("model")
    for (prompt_id, model), cost in priced[~full].items():
        tokens = o.set_index(["prompt_id", "model"]).loc[(prompt_id, model), "input_tokens"]
        assert cost == pytest.approx(tokens * listed.loc[model, "input_usd_per_mtok"] / 1e6)
    assert complete_rows(table).any()


def test_model_names_that_read_as_numbers_stay_names(data_dir: Path, tmp_path: Path) -> None:
    p, o, m = _copy(data_dir, tmp_path)
    names = {name: str(i) for i, name in enumerate(m["model"], start=1)}
    table = load_table(
        _write(tmp_path, p, o.assign(model=o["model"].map(names)), m.assign(model=m["model"].map(names)))
    )
    assert sorted(table.models) == sorted(names.values())


def test_a_table_few_of_whose_prompts_every_model_answered_still_gets_usable_presets(
    data_dir: Path, tmp_path: Path
) -> None:
    """Two models scored on disjoint halves of the prompts (a table merged from benchmarks that
    scored different models): no validation prompt is complete, and every preset came out at
    w = 1, so a call without its own w always went to the cheapest model."""
    import json

    from training.pipeline import TrainConfig, train_bundle

    p, o, m = _copy(data_dir, tmp_path, n_prompts=300)
    p = p.assign(split="train")
    first, second = m["model"].iloc[0], m["model"].iloc[1]
    half = set(p["prompt_id"].iloc[::2])
    gone = ((o["model"] == first) & o["prompt_id"].isin(half)) | (
        (o["model"] == second) & ~o["prompt_id"].isin(half)
    )
    bundle = tmp_path / "bundle"
    train_bundle(_write(tmp_path, p, o[~gone], m), bundle, TrainConfig())
    policy = json.loads((bundle / "manifest.json").read_text())["policy"]
    weights = {name: preset["cost_weight"] for name, preset in policy["presets"].items()}
    assert policy["default_cost_weight"] < 1.0
    assert weights["quality"] == 0.0 <= weights["cost-50"] <= weights["cost-30"] <= weights["cost-10"]
    assert weights["cost-50"] < 1.0
    assert "calibrated on estimates" in policy["presets"]["cost-30"]["description"]
