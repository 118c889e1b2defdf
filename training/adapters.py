"""Adapters from the two public routing-data formats users bring, to the canonical layout.

- SPROUT (CARROT's data set): a Hugging Face dataset with splits train / validation / test,
  columns `prompt`, `golden answer`, and one struct column per model
  `{num_input_tokens, num_output_tokens, response, score}`; prices come from a separate file.
- RouterBench: one wide table (pickle or CSV) with `sample_id`, `prompt`, `eval_name`, a score
  column per model, and `<model>|model_response`, `<model>|total_cost` columns.

Both produce a `RoutingTable`, which validates the result like any canonical table.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from training.tables import PRICE_COLUMNS, RoutingTable, TableError

SPROUT_FIELDS = ("num_input_tokens", "num_output_tokens", "score")
SPROUT_SPLITS = {"train": "train", "validation": "train", "test": "test"}
ROUTERBENCH_COST = "|total_cost"
ROUTERBENCH_RESPONSE = "|model_response"


def read_prices(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: price file not found")
    prices = pd.read_csv(path)
    missing = [c for c in PRICE_COLUMNS if c not in prices.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {', '.join(missing)}")
    if "price_source" not in prices.columns:
        prices["price_source"] = str(path.name)
    return prices


def _require_prices(models: list[str], prices: pd.DataFrame, where: str) -> pd.DataFrame:
    unpriced = sorted(set(models) - set(prices["model"]))
    if unpriced:
        raise TableError(f"{where}: model {unpriced[0]!r} has no price in the price file")
    return prices[prices["model"].isin(models)].reset_index(drop=True)


def _hash_split(ids: pd.Series, test_fraction: float = 0.2) -> np.ndarray:
    """A fixed split by a hash of the id, as the canonical tables use."""
    buckets = np.array([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % 100 for i in ids])
    return np.where(buckets < int(test_fraction * 100), "test", "train")


def load_sprout(source: str | Path, prices_file: Path, name: str = "sprout") -> RoutingTable:
    """From a hub id or a local path (a `save_to_disk` directory or data files `datasets` can read)."""
    import datasets

    path = Path(str(source))
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(str(source))
    if not isinstance(data, datasets.DatasetDict):
        raise TableError(f"{source}: expected a dataset with splits {', '.join(SPROUT_SPLITS)}")
    unknown = sorted(set(data) - set(SPROUT_SPLITS))
    if unknown:
        raise TableError(f"{source}: unexpected split {unknown[0]!r} (SPROUT has train, validation, test)")
    prompt_rows, outcome_rows = [], []
    models: list[str] | None = None
    for split_name, split in data.items():
        for col in ("prompt", "golden answer"):
            if col not in split.column_names:
                raise TableError(f"{source} [{split_name}]: missing column {col!r}")
        split_models = [c for c in split.column_names if c not in ("prompt", "golden answer")]
        if models is None:
            models = split_models
        for model in split_models:
            feature = split.features[model]
            keys = set(feature) if isinstance(feature, dict) else set()
            absent = [f for f in SPROUT_FIELDS if f not in keys]
            if absent:
                raise TableError(
                    f"{source} [{split_name}]: column {model!r} lacks struct field(s) {', '.join(absent)}"
                )
        frame = split.to_pandas()
        ids = [f"{name}/{split_name}/{i}" for i in range(len(frame))]
        prompt_rows.append(
            pd.DataFrame(
                {
                    "prompt_id": ids,
                    "prompt": frame["prompt"],
                    "source": name,
                    "split": SPROUT_SPLITS[split_name],
                }
            )
        )
        for model in split_models:
            cells = frame[model]
            outcome_rows.append(
                pd.DataFrame(
                    {
                        "prompt_id": ids,
                        "model": model,
                        "score": [c["score"] if c is not None else np.nan for c in cells],
                        "input_tokens": [c["num_input_tokens"] if c is not None else None for c in cells],
                        "output_tokens": [c["num_output_tokens"] if c is not None else None for c in cells],
                    }
                )
            )
    if not models:
        raise TableError(f"{source}: no model columns")
    prompts = pd.concat(prompt_rows, ignore_index=True)
    outcomes = pd.concat(outcome_rows, ignore_index=True).dropna(subset=["score"])
    prices = _require_prices(models, read_prices(prices_file), str(source))
    outcomes = _priced(outcomes, prices)
    return RoutingTable(name, prompts, outcomes, prices)


def _priced(outcomes: pd.DataFrame, prices: pd.DataFrame) -> pd.DataFrame:
    """cost_usd = input tokens x input price + output tokens x output price (null if a count is)."""
    merged = outcomes.merge(prices[list(PRICE_COLUMNS)], on="model", how="left")
    tokens_in = pd.to_numeric(merged["input_tokens"], errors="coerce")
    tokens_out = pd.to_numeric(merged["output_tokens"], errors="coerce")
    if (tokens_in < 0).any() or (tokens_out < 0).any():
        raise TableError("negative token count")
    merged["cost_usd"] = (
        tokens_in * merged["input_usd_per_mtok"] + tokens_out * merged["output_usd_per_mtok"]
    ) / 1e6
    return merged.drop(columns=["input_usd_per_mtok", "output_usd_per_mtok"])


def load_routerbench(path: Path, prices_file: Path, name: str = "routerbench") -> RoutingTable:
    """From RouterBench's pickle (.pkl) or a CSV export of it. Split: fixed 80/20 by sample_id hash."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    if path.suffix in (".pkl", ".pickle"):
        # Pickle runs code when read: only ever load files you produced or trust (never in the service).
        wide = pd.read_pickle(path)
    elif path.suffix == ".csv":
        wide = pd.read_csv(path)
    else:
        raise TableError(f"{path}: expected a .pkl or .csv RouterBench file")
    for col in ("sample_id", "prompt", "eval_name"):
        if col not in wide.columns:
            raise TableError(f"{path}: missing column {col!r}")
    models = [c[: -len(ROUTERBENCH_COST)] for c in wide.columns if str(c).endswith(ROUTERBENCH_COST)]
    if not models:
        raise TableError(f"{path}: no '<model>{ROUTERBENCH_COST}' columns")
    for model in models:
        if model not in wide.columns:
            raise TableError(f"{path}: model {model!r} has a cost column but no score column")
    ids = wide["sample_id"].astype(str)
    prompts = pd.DataFrame(
        {
            "prompt_id": ids,
            "prompt": wide["prompt"].astype(str),
            "source": wide["eval_name"].astype(str),
            "split": _hash_split(ids),
        }
    )
    outcomes = pd.concat(
        [
            pd.DataFrame(
                {
                    "prompt_id": ids,
                    "model": model,
                    "score": pd.to_numeric(wide[model], errors="coerce"),
                    "input_tokens": pd.NA,
                    "output_tokens": pd.NA,
                    "cost_usd": pd.to_numeric(wide[model + ROUTERBENCH_COST], errors="coerce"),
                }
            )
            for model in models
        ],
        ignore_index=True,
    ).dropna(subset=["score"])
    prices = _require_prices(models, read_prices(prices_file), str(path))
    return RoutingTable(name, prompts, outcomes, prices)


def write_canonical(table: RoutingTable, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.prompts.to_parquet(out_dir / "prompts.parquet", index=False)
    table.outcomes.to_parquet(out_dir / "outcomes.parquet", index=False)
    table.prices.to_csv(out_dir / "models.csv", index=False)
    (out_dir / "README.md").write_text(
        f"# {table.name}\n\nConverted to the canonical layout by `router convert`.\n", encoding="utf-8"
    )
