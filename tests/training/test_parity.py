"""Export parity: the ONNX embedder against sentence-transformers, the ONNX heads against LightGBM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from router.embedder import Embedder
from training.embedder_export import base_model_dir, cached_export
from training.heads import HeadParams, fit_heads
from training.onnx_heads import heads_to_onnx
from training.settings import TrainSettings
from training.tables import load_table

# fp32 export: float rounding only. int8 (per-channel dynamic quantisation): a stated cosine floor.
FP32_TOLERANCE = 1e-5
INT8_MIN_COSINE = 0.95
INT8_MEAN_COSINE = 0.985


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> list[str]:
    prompts = load_table(data_dir / "dcrouter").prompts["prompt"]
    longest = max(prompts, key=len)  # far beyond 256 word pieces: exercises truncation
    return [
        *prompts.head(40),
        longest,
        "hi",
        "Quelle heure est-il ? 今何時ですか？ Сколько времени?",
        "a" * 3000,
    ]


@pytest.fixture(scope="module")
def reference(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model_dir()), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(texts, normalize_embeddings=True, batch_size=8)


def test_fp32_onnx_embedder_matches_sentence_transformers(texts: list[str], reference: np.ndarray) -> None:
    exported = cached_export(TrainSettings().cache_dir, precision="fp32")
    ours = Embedder(exported.onnx_path, exported.tokenizer_path).embed(texts, batch_size=7)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < FP32_TOLERANCE


def test_int8_onnx_embedder_stays_close_to_sentence_transformers(
    texts: list[str], reference: np.ndarray
) -> None:
    exported = cached_export(TrainSettings().cache_dir, precision="int8")
    ours = Embedder(exported.onnx_path, exported.tokenizer_path).embed(texts)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() > INT8_MIN_COSINE
    assert cosine.mean() > INT8_MEAN_COSINE


def test_batching_does_not_change_embeddings(texts: list[str]) -> None:
    exported = cached_export(TrainSettings().cache_dir, precision="fp32")
    embedder = Embedder(exported.onnx_path, exported.tokenizer_path)
    alone = np.vstack([embedder.embed([t]) for t in texts[:12]])
    together = embedder.embed(texts[:12], batch_size=12)
    assert np.abs(alone - together).max() < FP32_TOLERANCE


def test_lightgbm_heads_and_their_onnx_graph_agree(data_dir: Path) -> None:
    table = load_table(data_dir / "dcrouter").split("train")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(table.prompts), 24)).astype(np.float32)
    x[:, 0] = np.arange(len(x)) % 7  # a feature the heads can actually use
    score = table.matrix("score")
    out_tokens = rng.poisson(50, size=score.shape).astype(float)
    out_tokens[:, 0] = 0.0  # a constant head, exported as a constant column
    params = HeadParams(max_rounds=30, early_stopping_rounds=5)
    heads = fit_heads(
        table.models,
        x[:4000],
        score[:4000],
        out_tokens[:4000],
        x[4000:],
        score[4000:],
        out_tokens[4000:],
        params,
    )
    session = ort.InferenceSession(heads_to_onnx(heads, x.shape[1]).SerializeToString())
    q_onnx, o_onnx = session.run(["quality", "output_tokens"], {"features": x[4000:]})
    q_lgb, o_lgb = heads.predict(x[4000:])
    assert q_onnx.shape == (len(x) - 4000, len(table.models))
    assert np.abs(q_onnx - q_lgb).max() < 1e-5
    assert np.abs(o_onnx - o_lgb).max() / o_lgb.max() < 1e-5
    assert np.all(o_onnx[:, 0] == 0.0)
