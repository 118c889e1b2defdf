"""`router predict`: a bundle's estimates for every prompt of a split and every model of the bundle.

Runs the service's own estimation path (`router.estimator.Estimator`); only the embeddings come
from the on-disk cache, computed by the bundle's own embedder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from router.estimator import Estimates, Estimator, open_bundle
from training.embed_cache import EmbeddingCache
from training.settings import TrainSettings
from training.tables import RoutingTable, load_table


def estimate_table(
    estimator: Estimator, table: RoutingTable, settings: TrainSettings | None = None
) -> Estimates:
    settings = settings or TrainSettings()
    texts = list(table.prompts["prompt"])
    tokens = estimator.tokenize(texts)
    embeddings = EmbeddingCache(settings.cache_dir, estimator.bundle.embedder).embed(texts)
    return estimator.estimate(texts, tokens, embeddings)


def predict_to_parquet(bundle_dir: Path, data_dir: Path, split: str, out: Path) -> int:
    estimator = open_bundle(bundle_dir, provider="cpu")
    table = load_table(data_dir).split(split)
    est = estimate_table(estimator, table)
    n, m = est.quality.shape
    frame = pd.DataFrame(
        {
            "prompt_id": np.repeat(table.prompts["prompt_id"].to_numpy(), m),
            "model": np.tile(np.array(est.models, dtype=object), n),
            "quality": est.quality.ravel(),
            "cost_usd": est.cost_usd.ravel(),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return len(frame)
