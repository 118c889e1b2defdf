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
        # only add copies). One thread, one session, for a lone prompt and a batch alike: with more
        # threads ONNX Runtime splits a lone row's trees across them and adds the partial sums in
        # another order than for a batch, so a prompt's output length (and cost) would depend on
        # whether it came alone. With one thread every operator computes a row from that row alone,
        # in the same order, whatever the batch (a test holds this); a second thread bought a lone
        # prompt about a tenth of a millisecond (docs/BENCHMARKS.md).
        self._session = make_session(source, provider="cpu", threads=1)
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
        if outputs["output_tokens"].shape[-1] != n_models:
            raise ValueError(
                f"{name}: heads graph gives output_tokens for {outputs['output_tokens'].shape[-1]} "
                f"models and quality for {n_models}"
            )
        self.n_features = n_features
        self.n_models = n_models

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quality, output tokens), each prompts x models, float64."""
        quality, out_tokens = self._session.run(list(OUTPUTS), {self._input: features})
        return quality.astype(np.float64), out_tokens.astype(np.float64)
