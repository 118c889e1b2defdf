"""RouterBench (Martian), as published: `routerbench_0shot.pkl` and `routerbench_5shot.pkl`.

Follows the pickled pandas DataFrame of withmartian/routerbench (or a CSV export of it): columns
`sample_id`, `prompt`, `eval_name`, one score column per model (0..1, named by the model),
`<model>|model_response`, `<model>|total_cost` (USD) and `oracle_model_to_route_to`.

`prompt` holds the turns of the conversation: a Python list, or (as the published file stores it)
the repr of one, e.g. "['Solve problem 0.']", with several turns for MT-Bench. The turns are
joined into one text with TURN_SEPARATOR and their number kept in a `turns` column; a prompt that
is not a list repr is kept as it is. `eval_name` becomes the source, `|total_cost` the recorded
`cost_usd`. The published file has no token counts and no split: the split is fixed by a hash of
`sample_id` (80/20), and prices come from the prices file.

Pickle runs code when read: only load files you produced or trust (never done in the service).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.adapters.common import hash_split, numeric_cells, read_prices, require_prices
from training.tables import RoutingTable, TableError

COST = "|total_cost"
# A blank line between turns: how multi-turn prompts are usually flattened for a single encoder.
TURN_SEPARATOR = "\n\n"


def turns_of(value: Any, where: str) -> list[str]:
    """The turns of one RouterBench prompt cell."""
    if isinstance(value, list | tuple | np.ndarray):
        turns = [str(t) for t in value]
    elif isinstance(value, str):
        turns = [value]
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                parsed = None
            if isinstance(parsed, list) and all(isinstance(t, str) for t in parsed):
                turns = parsed
    else:
        raise TableError(f"{where}: prompt is {type(value).__name__}, not text or a list of turns")
    if not turns or not any(t.strip() for t in turns):
        raise TableError(f"{where}: prompt is empty")
    return turns


def load_routerbench(path: Path, prices_file: Path, name: str = "routerbench") -> RoutingTable:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    if path.suffix in (".pkl", ".pickle"):
        wide = pd.read_pickle(path)
    elif path.suffix == ".csv":
        wide = pd.read_csv(path)
    else:
        raise TableError(f"{path}: expected a .pkl or .csv RouterBench file")
    for col in ("sample_id", "prompt", "eval_name"):
        if col not in wide.columns:
            raise TableError(f"{path}: missing column {col!r}")
    models = [c[: -len(COST)] for c in wide.columns if str(c).endswith(COST)]
    if not models:
        raise TableError(f"{path}: no '<model>{COST}' columns")
    for model in models:
        if model not in wide.columns:
            raise TableError(f"{path}: model {model!r} has a cost column but no score column")
    ids = wide["sample_id"].astype(str)
    turns = [turns_of(v, f"{path}: sample_id {sid!r}") for sid, v in zip(ids, wide["prompt"], strict=True)]
    prompts = pd.DataFrame(
        {
            "prompt_id": ids,
            "prompt": [TURN_SEPARATOR.join(t) for t in turns],
            "turns": [len(t) for t in turns],
            "source": wide["eval_name"].astype(str),
            "split": hash_split(ids),
        }
    )
    outcomes = pd.concat(
        [
            pd.DataFrame(
                {
                    "prompt_id": ids,
                    "model": model,
                    "score": numeric_cells(wide[model], f"{path}: score of {model}"),
                    "input_tokens": pd.NA,
                    "output_tokens": pd.NA,
                    "cost_usd": numeric_cells(wide[model + COST], f"{path}: {model}{COST}"),
                }
            )
            for model in models
        ],
        ignore_index=True,
    ).dropna(subset=["score"])
    prices = require_prices(models, read_prices(prices_file), str(path))
    return RoutingTable(name, prompts, outcomes, prices)
