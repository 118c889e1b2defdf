"""Logged feedback as training data: `router feedback export`, and `router train --feedback URL`.

The store keeps each decision's head features (the embedding and the extras, as the engine computed
them) and its prompt text only with `--store-prompts`, so the router can learn from feedback
without the text:

- export writes a routing table in the canonical layout (prompt_id = the decision id; the prompt
  text where it was stored, else empty; source `feedback/<tenant>`; every prompt in `train`),
  plus `features.parquet` (prompt_id and the stored features), and a `models.csv` without prices
  (give them, or let the trainer fit them from the reported costs and token counts);
- train folds the store's outcomes into a full retrain of a table: its prompts join the fitted
  part (never the validation carve, so the figures stay comparable), with their stored features,
  for the table's models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from router.core.feedback_store import StoreError, open_store, shown, sqlite_path
from training.errors import TableError
from training.outputs import TABLE_MARKER, replaced_dir


@dataclass(frozen=True)
class FeedbackRows:
    """Training rows from a feedback store, for the table's models (in its order)."""

    features: np.ndarray  # prompts x head features, float32
    score: np.ndarray  # prompts x models, NaN where no outcome
    output_tokens: np.ndarray  # prompts x models, NaN where not reported
    outcomes: int

    def __len__(self) -> int:
        return len(self.features)


def _rows(url: str) -> list:
    try:
        store = open_store(url, create=False)
        try:
            return list(store.export())
        finally:
            store.close()
    except StoreError as exc:
        message = str(exc)  # most already name the store, none with its password
        raise TableError(message if shown(url) in message else f"{shown(url)}: {message}") from exc


def load_feedback(url: str, models: list[str], n_features: int) -> FeedbackRows:
    rows = _rows(url)
    index = {m: j for j, m in enumerate(models)}
    kept = [r for r in rows if any(o.model in index for o in r.outcomes)]
    for r in kept:
        if len(r.decision.features) != n_features:
            raise TableError(
                f"feedback store {url}: decision {r.decision.id} has {len(r.decision.features)} features, "
                f"this embedder {n_features}"
            )
    score = np.full((len(kept), len(models)), np.nan)
    tokens = np.full_like(score, np.nan)
    outcomes = 0
    for i, r in enumerate(kept):
        for o in r.outcomes:
            if o.model in index:
                score[i, index[o.model]] = o.score
                if o.output_tokens is not None:
                    tokens[i, index[o.model]] = o.output_tokens
                outcomes += 1
    features = np.array([r.decision.features for r in kept], dtype=np.float32).reshape(len(kept), n_features)
    return FeedbackRows(features, score, tokens, outcomes)


def export_feedback(url: str, out_dir: Path) -> tuple[int, int]:
    """Writes the store's decisions with outcomes as a canonical table; (prompts, outcomes)."""
    rows = _rows(url)
    if not rows:
        raise TableError(f"feedback store {shown(url)}: no outcomes to export")
    prompts = pd.DataFrame(
        {
            "prompt_id": [r.decision.id for r in rows],
            "prompt": [r.decision.prompt or "" for r in rows],
            "source": [f"feedback/{r.decision.tenant}" for r in rows],
            "split": "train",
            "bundle_version": [r.decision.bundle_version for r in rows],
        }
    )
    outcomes = pd.DataFrame(
        [
            {
                "prompt_id": o.decision_id,
                "model": o.model,
                "score": o.score,
                "input_tokens": o.input_tokens if o.input_tokens is not None else r.decision.input_tokens,
                "output_tokens": o.output_tokens,
                "cost_usd": o.cost_usd,
            }
            for r in rows
            for o in r.outcomes
        ]
    )
    models = pd.DataFrame(
        {"model": sorted(set(outcomes["model"])), "input_usd_per_mtok": None, "output_usd_per_mtok": None}
    )
    features = pd.DataFrame(
        {"prompt_id": prompts["prompt_id"], "features": [r.decision.features.tolist() for r in rows]}
    )
    with replaced_dir(
        out_dir, TABLE_MARKER, inputs=[p for p in [sqlite_path(url)] if p is not None]
    ) as staging:
        prompts.to_parquet(staging / "prompts.parquet", index=False)
        outcomes.astype({"output_tokens": "Int64", "input_tokens": "Int64"}).to_parquet(
            staging / TABLE_MARKER, index=False
        )
        models.to_csv(staging / "models.csv", index=False)
        features.to_parquet(staging / "features.parquet", index=False)
        (staging / "README.md").write_text(
            "# Feedback\n\nExported from a feedback store by `router feedback export`: one prompt per "
            "decision with outcomes (text only where it was stored), features.parquet with the stored "
            "head features, models.csv without prices.\n",
            encoding="utf-8",
        )
    return len(prompts), len(outcomes)
