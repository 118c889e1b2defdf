"""Per-token prices implied by recorded costs, for tables that publish costs but no list prices.

RouterBench, for one, records each call's `cost_usd` with its token counts and no price list. For a
model whose list prices are missing, cost = 1e-6 x (input tokens x input price + output tokens x
output price) is fitted by non-negative least squares on its outcomes that record all three, and
the fit's error is kept with the prices (it reaches the bundle manifest as the price source).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from router.core.pricing import PER_TOKEN
from training.errors import TableError

PRICES = ("input_usd_per_mtok", "output_usd_per_mtok")
TOKENS = ("input_tokens", "output_tokens")
MIN_ROWS = 10
LIST_PRICE = "list price"


def fill_prices(name: str, prices: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """`prices` with every missing price fitted from `outcomes`; refuses a model that has neither."""
    from scipy.optimize import nnls

    prices = prices.copy()
    for col in PRICES:
        prices[col] = pd.to_numeric(prices[col], errors="coerce") if col in prices.columns else np.nan
    if "price_source" not in prices.columns:
        prices["price_source"] = LIST_PRICE
    prices["price_source"] = prices["price_source"].fillna(LIST_PRICE).astype(str)
    for i, row in prices.iterrows():
        if not (np.isnan(row[PRICES[0]]) or np.isnan(row[PRICES[1]])):
            continue
        mine = outcomes[outcomes["model"] == row["model"]]
        cost, tokens_in, tokens_out = (_numbers(mine[c]) for c in ("cost_usd", *TOKENS))
        usable = ~np.isnan(cost) & ~np.isnan(tokens_in) & ~np.isnan(tokens_out)
        if usable.sum() < MIN_ROWS:
            raise TableError(
                f"{name} models: {row['model']!r} has no list price, and fewer than {MIN_ROWS} of its "
                "outcomes record cost_usd with input and output tokens to fit one from"
            )
        design = PER_TOKEN * np.column_stack([tokens_in[usable], tokens_out[usable]])
        fitted, _ = nnls(design, cost[usable])
        predicted = design @ fitted
        paid = cost[usable] > 0
        error = (
            float(np.mean(np.abs(predicted[paid] - cost[usable][paid]) / cost[usable][paid]))
            if paid.any()
            else 0.0
        )
        prices.loc[i, PRICES[0]] = float(fitted[0])
        prices.loc[i, PRICES[1]] = float(fitted[1])
        prices.loc[i, "price_source"] = (
            f"fitted from {int(usable.sum())} recorded costs (mean absolute error {error:.1%})"
        )
    return prices


def _numbers(column: pd.Series) -> np.ndarray:
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
