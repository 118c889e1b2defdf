"""Runs a bundle's heads graph: features in, per-model quality and output length out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from router.runtime import make_session

OUTPUTS = ("quality", "output_tokens")


class Heads:
    def __init__(self, path: Path) -> None:
        # On the CPU whatever the embedder uses: tree ensembles have no CUDA kernels (a GPU would
        # only add copies). Batches run on one thread: split across threads whose spinning slowed
        # the encoder beside them. A lone prompt is latency-bound instead, and gets two threads
        # that spin rather than sleep between operators (measured, 29-model mmlu_pro bundle, three
        # bench runs each: Route p50 at c=1 over the raw embedder 1.13-1.15 against 1.20-1.22,
        # while the same spinning session for batches cost c=8 throughput 0.73-0.81 against
        # 0.81-0.84). Two sessions of one graph cost ~30 MB.
        self._session = make_session(path, provider="cpu", threads=1)
        self._lone = make_session(path, provider="cpu", threads=2, spinning=True)
        inputs = self._session.get_inputs()
        outputs = {o.name: o for o in self._session.get_outputs()}
        if len(inputs) != 1 or set(outputs) != set(OUTPUTS):
            raise ValueError(f"{path.name}: heads graph must map one input to outputs {OUTPUTS}")
        self._input = inputs[0].name
        n_features = inputs[0].shape[-1]
        n_models = outputs["quality"].shape[-1]
        if not isinstance(n_features, int) or not isinstance(n_models, int):
            raise ValueError(f"{path.name}: heads graph must have fixed feature and model dimensions")
        self.n_features = n_features
        self.n_models = n_models

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        session = self._lone if len(features) == 1 else self._session
        quality, out_tokens = session.run(list(OUTPUTS), {self._input: features})
        return quality.astype(np.float64), out_tokens.astype(np.float64)
