"""Routing tables in the canonical layout (prompts.parquet, outcomes.parquet, models.csv).

Everything the trainer and the evaluator read goes through `RoutingTable`, which refuses a table
with a message naming the problem rather than training on garbage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from router.core.features import BLANK, blank
from router.core.pricing import MAX_TOKENS, MAX_USD_PER_MTOK, PER_TOKEN
from training.errors import TableError
from training.implied_prices import fill_prices

PROMPT_COLUMNS = ("prompt_id", "prompt", "split")
OUTCOME_COLUMNS = ("prompt_id", "model", "score")
PRICE_COLUMNS = ("model", "input_usd_per_mtok", "output_usd_per_mtok")
# Optional in models.csv: time to first token and per output token, ms (latency ceilings).
LATENCY_COLUMNS = ("ttft_ms", "tpot_ms")
SPLITS = ("train", "test")


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(f"{what}: missing column(s) {', '.join(missing)}")


def plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, for messages (nan, not np.float64(nan))."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def out_of_range(given: pd.Series, high: float) -> pd.Series:
    """Cells that hold something other than a finite number from 0 to `high` (empty cells pass)."""
    value = pd.to_numeric(given, errors="coerce").astype(float)
    return (given.notna() & value.isna()) | (value < 0) | (value > high) | np.isinf(value)


def check_prices(prices: pd.DataFrame, where: str) -> None:
    """A price given must be one (an empty cell is unknown, and may be fitted from costs)."""
    for col in PRICE_COLUMNS[1:]:
        if col not in prices.columns:
            continue
        given = prices[col]
        bad = out_of_range(given, MAX_USD_PER_MTOK)
        if bad.any():
            raise TableError(
                f"{where}: {col} of {prices.loc[bad, 'model'].iloc[0]!r} must be a number from 0 to "
                f"{MAX_USD_PER_MTOK:,g}, found {plain(given[bad].iloc[0])!r}"
            )


@dataclass
class RoutingTable:
    """One routing table. `outcomes` has one row per observed (prompt, model) pair."""

    name: str
    prompts: pd.DataFrame  # prompt_id, prompt, split, [source]
    outcomes: pd.DataFrame  # prompt_id, model, score, input_tokens, output_tokens, cost_usd
    prices: pd.DataFrame  # model, input_usd_per_mtok, output_usd_per_mtok

    def __post_init__(self) -> None:
        self._validate()

    @property
    def models(self) -> list[str]:
        return list(self.prices["model"])

    def _validate(self) -> None:
        _require(self.prompts, PROMPT_COLUMNS, f"{self.name} prompts")
        _require(self.outcomes, OUTCOME_COLUMNS, f"{self.name} outcomes")
        _require(self.prices, ("model",), f"{self.name} models")
        p, o = self.prompts, self.outcomes
        for col in ("input_tokens", "output_tokens", "cost_usd"):
            if col not in o.columns:
                o[col] = pd.NA
        for frame, what in ((p, "prompts"), (o, "outcomes")):
            ids = frame["prompt_id"]
            if ids.isna().any():
                raise TableError(f"{self.name} {what}: prompt_id is null in row {int(np.argmax(ids.isna()))}")
            if len(ids) and pd.api.types.infer_dtype(ids) != "string":
                raise TableError(
                    f"{self.name} {what}: prompt_id must be text, found {type(ids.iloc[0]).__name__} values"
                )
        if p["prompt_id"].duplicated().any():
            dup = p.loc[p["prompt_id"].duplicated(), "prompt_id"].iloc[0]
            raise TableError(f"{self.name} prompts: duplicate prompt_id {dup!r}")
        if p["prompt"].isna().any():
            raise TableError(f"{self.name} prompts: {int(p['prompt'].isna().sum())} prompt(s) are null")
        empty = p["prompt"].map(lambda text: blank(str(text)))
        if empty.any():
            # `router feedback export` of a store kept without --store-prompts writes no text; its
            # outcomes reach a retrain through the stored features instead.
            raise TableError(
                f"{self.name} prompts: {int(empty.sum())} prompt(s) have no text (first: prompt_id "
                f"{p.loc[empty, 'prompt_id'].iloc[0]!r}); a prompt {BLANK}. Outcomes logged without "
                "their text join a retrain with `router train --data TABLE --feedback URL`"
            )
        bad_split = sorted(set(p["split"].dropna().unique()) - set(SPLITS))
        if bad_split or p["split"].isna().any():
            raise TableError(f"{self.name} prompts: split must be train or test, found {bad_split or 'null'}")
        if o[["prompt_id", "model"]].duplicated().any():
            row = o.loc[o[["prompt_id", "model"]].duplicated(), ["prompt_id", "model"]].iloc[0]
            raise TableError(
                f"{self.name} outcomes: duplicate (prompt_id, model) pair "
                f"({row['prompt_id']!r}, {row['model']!r})"
            )
        scores = pd.to_numeric(o["score"], errors="coerce")
        if scores.isna().any() or ((scores < 0) | (scores > 1)).any():
            bad = o.loc[scores.isna() | (scores < 0) | (scores > 1), "score"].iloc[0]
            raise TableError(f"{self.name} outcomes: score must be a number in 0..1, found {bad!r}")
        for col in ("input_tokens", "output_tokens", "cost_usd"):
            values = pd.to_numeric(o[col], errors="coerce").astype(float)
            if (values < 0).any():
                raise TableError(f"{self.name} outcomes: negative {col} ({values[values < 0].iloc[0]})")
            bad = out_of_range(o[col], np.inf if col == "cost_usd" else MAX_TOKENS)
            if bad.any():
                limit = "a finite number" if col == "cost_usd" else f"a count up to {MAX_TOKENS:,}"
                raise TableError(
                    f"{self.name} outcomes: {col} must be {limit}, found {plain(o.loc[bad, col].iloc[0])!r}"
                )
        unknown_prompts = set(o["prompt_id"]) - set(p["prompt_id"])
        if unknown_prompts:
            raise TableError(
                f"{self.name} outcomes: prompt_id {sorted(unknown_prompts)[0]!r} is not in prompts"
            )
        listed = self.prices["model"]
        if listed.duplicated().any():
            raise TableError(f"{self.name} models: duplicate model {listed[listed.duplicated()].iloc[0]!r}")
        for names, what in ((o["model"], "outcomes"), (listed, "models")):
            padded = [n for n in names.dropna().unique() if str(n) != str(n).strip()]
            if padded:
                raise TableError(
                    f"{self.name} {what}: model name {padded[0]!r} has leading or trailing spaces"
                )
        unpriced = sorted(set(o["model"]) - set(self.prices["model"]))
        if unpriced:
            raise TableError(f"{self.name}: model {unpriced[0]!r} has outcomes but no row in models.csv")
        check_prices(self.prices, f"{self.name} models")
        m = fill_prices(self.name, self.prices[self.prices["model"].isin(set(o["model"]))], o)
        for col in ("input_usd_per_mtok", "output_usd_per_mtok"):
            price = pd.to_numeric(m[col], errors="coerce")
            if price.isna().any() or (price < 0).any():
                model = m.loc[price.isna() | (price < 0), "model"].iloc[0]
                raise TableError(f"{self.name} models: {col} of {model!r} must be a non-negative number")
        for col in LATENCY_COLUMNS:  # optional; empty means unknown
            if col in m.columns:
                value = pd.to_numeric(m[col], errors="coerce")
                bad = (value.isna() & m[col].notna()) | (value < 0)
                if bad.any():
                    model = m.loc[bad, "model"].iloc[0]
                    raise TableError(f"{self.name} models: {col} of {model!r} must be a non-negative number")
                m = m.assign(**{col: value.astype(float)})
        self.outcomes = o.assign(
            score=scores.astype(float),
            input_tokens=pd.to_numeric(o["input_tokens"], errors="coerce").astype("Float64"),
            output_tokens=pd.to_numeric(o["output_tokens"], errors="coerce").astype("Float64"),
            cost_usd=_priced(o, m),
        )
        # Only models that were actually observed are candidates.
        self.prices = (
            m[m["model"].isin(set(o["model"]))]
            .reset_index(drop=True)
            .astype({"input_usd_per_mtok": float, "output_usd_per_mtok": float})
        )
        if self.prices.empty:
            raise TableError(f"{self.name}: no outcomes")

    def split(self, split: str) -> RoutingTable:
        if split not in SPLITS:
            raise TableError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        prompts = self.prompts[self.prompts["split"] == split].reset_index(drop=True)
        if prompts.empty:
            raise TableError(f"{self.name}: split {split!r} has no prompts")
        outcomes = self.outcomes[self.outcomes["prompt_id"].isin(set(prompts["prompt_id"]))]
        return RoutingTable(self.name, prompts, outcomes.reset_index(drop=True), self.prices)

    def subset(self, prompt_ids: pd.Index | list[str] | np.ndarray) -> RoutingTable:
        keep = set(prompt_ids)
        prompts = self.prompts[self.prompts["prompt_id"].isin(keep)].reset_index(drop=True)
        outcomes = self.outcomes[self.outcomes["prompt_id"].isin(keep)].reset_index(drop=True)
        return RoutingTable(self.name, prompts, outcomes, self.prices)

    def scored(self) -> RoutingTable:
        """Only the prompts with an outcome of some model: one without teaches nothing, and as a
        neighbour or a fitted row it only dilutes what the others teach."""
        scored = self.prompts["prompt_id"].isin(set(self.outcomes["prompt_id"]))
        return self if scored.all() else self.subset(self.prompts.loc[scored, "prompt_id"])

    def without_models(self, models: Sequence[str]) -> RoutingTable:
        """The same table without the outcomes and prices of `models` (each must be one of its own)."""
        unknown = sorted(set(models) - set(self.models))
        if unknown:
            raise TableError(f"{self.name}: no model {unknown[0]!r} to leave out")
        if not models:
            return self
        drop = set(models)
        outcomes = self.outcomes[~self.outcomes["model"].isin(drop)].reset_index(drop=True)
        prices = self.prices[~self.prices["model"].isin(drop)].reset_index(drop=True)
        return RoutingTable(self.name, self.prompts, outcomes, prices)

    def matrix(self, column: str, models: Sequence[str] | None = None) -> np.ndarray:
        """(prompts x models) array of an outcome column, NaN where the pair is unobserved; columns
        in the order of `models` (default: this table's)."""
        wide = self.outcomes.pivot(index="prompt_id", columns="model", values=column)
        wide = wide.reindex(index=self.prompts["prompt_id"], columns=list(models or self.models))
        return wide.to_numpy(dtype=float, na_value=np.nan)

    def fingerprint(self) -> str:
        """Identifies the exact rows trained on (recorded in the bundle manifest)."""
        digest = hashlib.sha256()
        for frame, cols in (
            (self.prompts, ["prompt_id", "prompt", "split"]),
            (self.outcomes, ["prompt_id", "model", "score", "input_tokens", "output_tokens", "cost_usd"]),
            (self.prices, list(PRICE_COLUMNS)),
        ):
            ordered = frame[cols].sort_values(cols[:2] if len(cols) > 3 else cols[:1])
            digest.update(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes())
        return digest.hexdigest()


def latency_of(row: Mapping[str, object]) -> dict[str, float | None]:
    """A models.csv row's latency columns, None where absent or empty."""
    out: dict[str, float | None] = {}
    for col in LATENCY_COLUMNS:
        value = row.get(col)
        out[col] = None if value is None or pd.isna(value) else float(value)  # type: ignore[arg-type]
    return out


def _priced(outcomes: pd.DataFrame, prices: pd.DataFrame) -> pd.Series:
    """cost_usd, and where the source left it empty what the call's tokens cost at the list price:
    input tokens, plus output tokens where known (as the shared tables' input-only costs are).
    Without this, a table that records tokens and prices but no bills had no complete prompt to
    validate or evaluate on."""
    cost = pd.to_numeric(outcomes["cost_usd"], errors="coerce").astype("Float64")
    tokens_in = pd.to_numeric(outcomes["input_tokens"], errors="coerce").astype(float)
    missing = cost.isna().to_numpy() & ~np.isnan(tokens_in.to_numpy())
    if not missing.any():
        return cost
    listed = prices.set_index("model")
    models = outcomes.loc[missing, "model"]
    tokens_out = (
        pd.to_numeric(outcomes.loc[missing, "output_tokens"], errors="coerce").astype(float).fillna(0.0)
    )
    bill = PER_TOKEN * (
        tokens_in[missing] * models.map(listed["input_usd_per_mtok"]).astype(float)
        + tokens_out * models.map(listed["output_usd_per_mtok"]).astype(float)
    )
    cost[missing] = bill.to_numpy()
    return cost


def load_table(directory: Path) -> RoutingTable:
    """Reads a table in the canonical layout (see the data README)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TableError(f"{directory}: no such directory")
    files = {name: directory / name for name in ("prompts.parquet", "outcomes.parquet", "models.csv")}
    absent = [name for name, path in files.items() if not path.exists()]
    if absent:
        raise TableError(f"{directory}: missing file(s) {', '.join(absent)} (canonical layout)")
    try:
        prompts = pd.read_parquet(files["prompts.parquet"])
        outcomes = pd.read_parquet(files["outcomes.parquet"])
        prices = pd.read_csv(files["models.csv"], dtype={"model": str})  # a model named 7 is "7"
    except Exception as exc:  # pyarrow / pandas raise many types for unreadable files
        raise TableError(f"{directory}: cannot read table ({exc})") from exc
    return RoutingTable(directory.name, prompts, outcomes, prices)


def carve_validation(
    table: RoutingTable, fraction: float = 0.15, seed: int = 0
) -> tuple[RoutingTable, RoutingTable]:
    """Splits a train table into (fit, validation) by a hash of prompt_id: stable across runs."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    ids = table.prompts["prompt_id"].astype(str)
    salted = pd.util.hash_pandas_object(ids + f"#{seed}", index=False).to_numpy()
    is_val = (salted % 10_000) < int(fraction * 10_000)
    if is_val.all() or not is_val.any():
        raise TableError(
            f"{table.name}: its {len(ids)} train prompts are too few to carve a validation share "
            f"({fraction:.0%}) from them and keep the rest for fitting"
        )
    return table.subset(ids[~is_val]), table.subset(ids[is_val])


def complete_rows(table: RoutingTable, models: Sequence[str] | None = None) -> np.ndarray:
    """Mask of prompts that every model answered with a known cost (where METRICS.md evaluates)."""
    score, cost = table.matrix("score", models), table.matrix("cost_usd", models)
    return ~(np.isnan(score).any(axis=1) | np.isnan(cost).any(axis=1))
