"""`router predict`: a bundle's estimates for every prompt of a split and every model of the bundle.

Runs the engine on the prompt texts, exactly as `Route` does: the figures are the service's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from router.core.engine import open_engine
from training.tables import load_table


def predict_to_parquet(bundle_dir: Path, data_dir: Path, split: str, out: Path) -> int:
    _, engine = open_engine(bundle_dir, provider="cpu")
    table = load_table(data_dir).split(split)
    est = engine.estimate(list(table.prompts["prompt"]))
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
