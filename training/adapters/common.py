"""What the adapters share: the prices file, a fixed split by hash, pricing outcomes, and writing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from router.core.pricing import PER_TOKEN
from training.outputs import TABLE_MARKER, replaced_dir
from training.tables import PRICE_COLUMNS, RoutingTable, TableError, check_prices

TEST_FRACTION = 0.2


def read_prices(path: Path) -> pd.DataFrame:
    """A CSV with columns model, input_usd_per_mtok, output_usd_per_mtok [, price_source]."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: price file not found")
    try:
        prices = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for a malformed file
        raise TableError(f"{path}: cannot read it as CSV ({exc})") from exc
    missing = [c for c in PRICE_COLUMNS if c not in prices.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {', '.join(missing)}")
    twice = prices.loc[prices["model"].duplicated(), "model"]
    if len(twice):  # else every outcome of the model doubles, and the error blames the data
        raise TableError(f"{path}: model {twice.iloc[0]!r} is listed twice")
    check_prices(prices, str(path))
    if "price_source" not in prices.columns:
        prices["price_source"] = str(path.name)
    return prices


def require_prices(models: list[str], prices: pd.DataFrame, where: str) -> pd.DataFrame:
    unpriced = sorted(set(models) - set(prices["model"]))
    if unpriced:
        raise TableError(f"{where}: model {unpriced[0]!r} has no price in the price file")
    return prices[prices["model"].isin(models)].reset_index(drop=True)


def numeric_cells(values: pd.Series, what: str) -> pd.Series:
    """Cells as floats: numbers, booleans (and their text, 'True'/'false'), blank as missing;
    any other text is refused, naming it, rather than read as missing (a score that silently
    became 'not evaluated' dropped its row)."""
    cells = values.map(_cell)
    numbers = pd.to_numeric(cells, errors="coerce")
    bad = numbers.isna() & cells.notna()
    if bad.any():
        raise TableError(f"{what}: {values[bad].iloc[0]!r} is not a number")
    return numbers.astype(float)


def _cell(value: object) -> object:
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        return {"": np.nan, "true": 1.0, "false": 0.0}.get(text, text)
    return np.nan if pd.isna(value) else value  # type: ignore[call-overload]


def hash_split(ids: pd.Series) -> np.ndarray:
    """A fixed train/test split by a hash of the id, for sources that publish none."""
    buckets = np.array([int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) % 100 for i in ids])
    return np.where(buckets < int(TEST_FRACTION * 100), "test", "train")


def priced(
    outcomes: pd.DataFrame, prices: pd.DataFrame, *, unknown_output_costs_nothing: bool = False
) -> pd.DataFrame:
    """cost_usd = input tokens x input price + output tokens x output price. A null count makes the
    cost null, except output counts with `unknown_output_costs_nothing` (sources that score
    log-likelihoods and generate nothing)."""
    merged = outcomes.merge(prices[list(PRICE_COLUMNS)], on="model", how="left")
    tokens_in = pd.to_numeric(merged["input_tokens"], errors="coerce")
    tokens_out = pd.to_numeric(merged["output_tokens"], errors="coerce")
    if (tokens_in < 0).any() or (tokens_out < 0).any():
        raise TableError("negative token count")
    billed_out = tokens_out.fillna(0.0) if unknown_output_costs_nothing else tokens_out
    merged["cost_usd"] = PER_TOKEN * (
        tokens_in * merged["input_usd_per_mtok"] + billed_out * merged["output_usd_per_mtok"]
    )
    return merged.drop(columns=["input_usd_per_mtok", "output_usd_per_mtok"])


def write_canonical(table: RoutingTable, out_dir: Path) -> None:
    """Writes the table in the canonical layout; the directory appears only once it is complete."""
    with replaced_dir(out_dir, TABLE_MARKER) as staging:
        table.prompts.to_parquet(staging / "prompts.parquet", index=False)
        table.outcomes.to_parquet(staging / TABLE_MARKER, index=False)
        table.prices.to_csv(staging / "models.csv", index=False)
        (staging / "README.md").write_text(
            f"# {table.name}\n\nConverted to the canonical layout by `router convert`.\n", encoding="utf-8"
        )
