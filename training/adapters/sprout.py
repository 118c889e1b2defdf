"""SPROUT, CARROT's routing data, as published on the Hugging Face hub.

Follows `CARROT-LLM-Routing/SPROUT` (13 models) and its variant `SPROUT-o3mini` (one model more):
splits `train`, `validation` and `test`, as parquet files (`data/<split>-*.parquet`, or the hub's
converted `<split>/*.parquet`), as a `datasets.save_to_disk` directory, or by hub id through
`datasets`. Columns:

- metadata: `key`, `dataset` (the source benchmark), `dataset_level`, `dataset_idx`, `prompt`,
  `golden_answer`;
- one struct column per model: `score` (0..1, may be null), `num_input_tokens`,
  `num_output_tokens` and the model's `response`.

What the canonical table gets: `prompt_id` = `key` (or `<split>/<row>` where there is none),
`source` = `dataset`, the other metadata kept as prompt columns, `train` and `validation` in the
`train` split (the trainer carves its own validation), `test` in `test`. A null score, or a null
cell, is an unobserved pair, not a failure. Prompts are kept whole (SPROUT's RAG prompts reach
about 87,000 characters; the embedder truncates, the token counts do not). Cost = the recorded
token counts x the prices file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.adapters.common import numeric_cells, priced, read_prices, require_prices
from training.tables import RoutingTable, TableError

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "validation": "train", "test": "test"}
METADATA = ("key", "dataset", "dataset_level", "dataset_idx", "prompt", "golden_answer", "golden answer")
FIELDS = ("score", "num_input_tokens", "num_output_tokens")


def _split_of(path: Path, root: Path) -> str:
    """A parquet file's split, from its name (`train-0000-of-0003.parquet`) or its folder."""
    for part in [path.name, *reversed(path.relative_to(root).parts[:-1])]:
        for split in SPLITS:
            if part == split or part.startswith((f"{split}-", f"{split}_", f"{split}.")):
                return split
    raise TableError(f"{path}: cannot tell its split (expected train, validation or test in its name)")


def _read(source: str | Path) -> dict[str, tuple[str, pa.Table]]:
    """Split name -> (where it came from, its arrow table)."""
    path = Path(str(source))
    if path.is_dir() and (path / "dataset_dict.json").exists():
        import datasets

        data = datasets.load_from_disk(str(path))
        return {name: (f"{path} [{name}]", split.data.table) for name, split in data.items()}
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise TableError(f"{path}: no parquet files and no save_to_disk dataset")
        parts: dict[str, list[pa.Table]] = {}
        for file in files:
            try:
                parts.setdefault(_split_of(file, path), []).append(pq.read_table(file))
            except (pa.ArrowInvalid, OSError) as exc:
                raise TableError(f"{file}: not a readable parquet file ({exc})") from exc
        return {
            name: (f"{path} [{name}]", pa.concat_tables(tables, promote_options="default"))
            for name, tables in parts.items()
        }
    import datasets

    try:
        data = datasets.load_dataset(str(source))
    except Exception as exc:  # offline, unknown id, ...: datasets raises many types
        raise TableError(f"{source}: not a local directory, and the hub could not be read ({exc})") from exc
    return {name: (f"{source} [{name}]", split.data.table) for name, split in data.items()}


def _models(table: pa.Table, where: str) -> list[str]:
    """The struct columns with SPROUT's fields: the models."""
    models = []
    for field in table.schema:
        if field.name in METADATA:
            continue
        if not pa.types.is_struct(field.type):
            log.info("%s: column %r is neither metadata nor a model; not kept", where, field.name)
            continue
        names = {field.type.field(i).name for i in range(field.type.num_fields)}
        absent = [f for f in FIELDS if f not in names]
        if absent:
            raise TableError(
                f"{where}: model column {field.name!r} lacks struct field(s) {', '.join(absent)}"
            )
        models.append(field.name)
    return models


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def load_sprout(source: str | Path, prices_file: Path, name: str = "sprout") -> RoutingTable:
    splits = _read(source)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise TableError(f"{source}: unexpected split {unknown[0]!r} (SPROUT has train, validation, test)")
    prompt_frames, outcome_frames, models = [], [], []
    for split, (where, table) in splits.items():
        if "prompt" not in table.column_names:
            raise TableError(f"{where}: missing column 'prompt'")
        prompts = _column(table, "prompt")
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise TableError(f"{where}: row {empty[0]}: prompt is null or empty")
        if "key" in table.column_names:
            ids = np.array([str(k) for k in _column(table, "key")], dtype=object)
        else:
            ids = np.array([f"{name}/{split}/{i}" for i in range(len(table))], dtype=object)
        frame = pd.DataFrame({"prompt_id": ids, "prompt": prompts, "split": SPLITS[split]})
        frame["source"] = _column(table, "dataset") if "dataset" in table.column_names else name
        for meta in ("dataset_level", "dataset_idx", "golden_answer", "golden answer"):
            if meta in table.column_names:
                frame[meta.replace(" ", "_")] = [None if v is None else str(v) for v in _column(table, meta)]
        prompt_frames.append(frame)
        split_models = _models(table, where)
        models += [m for m in split_models if m not in models]
        for model in split_models:
            cells = table.column(model)
            outcome_frames.append(
                pd.DataFrame(
                    {
                        "prompt_id": ids,
                        "model": model,
                        "score": pc.struct_field(cells, "score").to_numpy(zero_copy_only=False),
                        "input_tokens": pc.struct_field(cells, "num_input_tokens").to_pandas(),
                        "output_tokens": pc.struct_field(cells, "num_output_tokens").to_pandas(),
                    }
                )
            )
    if not models:
        raise TableError(f"{source}: no model columns (struct columns with {', '.join(FIELDS)})")
    prompts = pd.concat(prompt_frames, ignore_index=True)
    outcomes = pd.concat(outcome_frames, ignore_index=True)
    outcomes["score"] = numeric_cells(outcomes["score"], f"{source}: score")
    outcomes = outcomes.dropna(subset=["score"]).reset_index(drop=True)
    prices = require_prices(models, read_prices(prices_file), str(source))
    return RoutingTable(name, prompts, priced(outcomes, prices), prices)
