"""Runs a heads graph: features in, per-model quality and output length out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from router.core.runtime import make_session

OUTPUTS = ("quality", "output_tokens")


class Heads:
    def __init__(self, source: Path | bytes) -> None:
        """`source`: the bundle's heads file, or a serialised graph not yet written to one."""
        # On the CPU whatever the embedder uses: tree ensembles have no CUDA kernels (a GPU would
        # only add copies). Batches run on one thread: split across threads whose spinning slowed
        # the encoder beside them. A lone prompt is latency-bound instead, and gets two threads
        # that spin rather than sleep between operators (docs/BENCHMARKS.md). Every operator of
        # the graph computes a row from that row alone, so which session ran a prompt, and with
        # which others, does not change its estimates (a test holds this).
        self._session = make_session(source, provider="cpu", threads=1)
        self._lone = make_session(source, provider="cpu", threads=2, spinning=True)
        name = source.name if isinstance(source, Path) else "heads graph"
        inputs = self._session.get_inputs()
        outputs = {o.name: o for o in self._session.get_outputs()}
        if len(inputs) != 1 or set(outputs) != set(OUTPUTS):
            raise ValueError(f"{name}: heads graph must map one input to outputs {OUTPUTS}")
        self._input = inputs[0].name
        n_features = inputs[0].shape[-1]
        n_models = outputs["quality"].shape[-1]
        if not isinstance(n_features, int) or not isinstance(n_models, int):
            raise ValueError(f"{name}: heads graph must have fixed feature and model dimensions")
        self.n_features = n_features
        self.n_models = n_models

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quality, output tokens), each prompts x models, float64."""
        session = self._lone if len(features) == 1 else self._session
        quality, out_tokens = session.run(list(OUTPUTS), {self._input: features})
        return quality.astype(np.float64), out_tokens.astype(np.float64)
