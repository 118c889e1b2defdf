"""Export parity: the ONNX embedder against sentence-transformers, the ONNX heads against LightGBM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from router.embedder import Embedder
from training.bundle_writer import parity_problems
from training.embedder_export import base_model_dir, cached_export
from training.heads import HeadParams, fit_per_model
from training.mlp_heads import MlpParams
from training.onnx_heads import assemble, per_model_part
from training.quality_model import BlendParams, QualityBlend
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
    out_tokens = rng.poisson(20 + 10 * (x[:, :1] % 3), size=(len(x), len(table.models))).astype(float)
    out_tokens[:, 0] = 0.0  # a constant head, exported as a constant column
    params = HeadParams(max_rounds=30, early_stopping_rounds=5)
    heads = fit_per_model(
        "poisson", table.models, x[:4000], out_tokens[:4000], x[4000:], out_tokens[4000:], params
    )
    part = per_model_part(heads.heads, x.shape[1])
    session = ort.InferenceSession(
        assemble(
            x.shape[1],
            len(table.models),
            quality=[(part, "columns", 0.0)],
            output_tokens=[(part, "columns", 1.0)],
        ).SerializeToString()
    )
    _, o_onnx = session.run(["quality", "output_tokens"], {"features": x[4000:]})
    o_lgb = heads.predict(x[4000:])
    assert o_onnx.shape == (len(x) - 4000, len(table.models))
    assert np.abs(o_onnx - o_lgb).max() / o_lgb.max() < 1e-5
    assert np.all(o_onnx[:, 0] == 0.0) and o_onnx[:, 1].std() > 0


def test_quality_blend_and_its_onnx_graph_agree(data_dir: Path) -> None:
    """MLP ensemble + neighbour memory + kernel, exported with torch.onnx, against torch itself."""
    table = load_table(data_dir / "mmlu_pro").split("train")
    exported = cached_export(TrainSettings().cache_dir, precision="int8")
    texts = list(table.prompts["prompt"][:600])
    emb = Embedder(exported.onnx_path, exported.tokenizer_path).embed(texts)
    x = np.hstack([emb, np.ones((len(emb), 2), dtype=np.float32)])
    score = table.matrix("score")[:600]
    tokens = table.matrix("output_tokens")[:600]
    assert np.isnan(tokens).any() and (~np.isnan(tokens)).any()
    blend = QualityBlend.fit(
        x[:500], score[:500], tokens[:500], emb.shape[1], BlendParams(mlp=MlpParams(epochs=2, seeds=(0, 1)))
    )
    part = blend.to_onnx()
    session = ort.InferenceSession(
        assemble(
            x.shape[1],
            score.shape[1],
            quality=[(part, "quality", 1.0)],
            output_tokens=[(part, "neighbour_output_tokens", 1.0)],
        ).SerializeToString()
    )
    q_onnx, o_onnx = session.run(["quality", "output_tokens"], {"features": x[500:]})
    q_torch, o_torch = blend.predict(x[500:])
    # mmlu_pro repeats some prompts: identical neighbours tie, and torch and ONNX Runtime may order
    # them differently at the k-th place; the bundle's parity check allows a few such prompts
    assert parity_problems((q_torch, o_torch), (q_onnx, o_onnx)) == []
    exact = (np.abs(q_onnx - q_torch).max(axis=1) < 1e-5) & (np.abs(o_onnx - o_torch).max(axis=1) < 1e-3)
    assert exact.mean() >= 0.95
    # the neighbours' output length: within the range of what the training prompts were billed
    assert np.nanmin(tokens[:500]) <= o_onnx.min() and o_onnx.max() <= np.nanmax(tokens[:500])
    # a training prompt asked again is pulled to its own observed outcomes by the kernel; the
    # graph's int8 candidate search must find it as the exact search does
    again, _ = blend.predict(x[:50])
    q_again, _ = session.run(["quality", "output_tokens"], {"features": x[:50]})
    assert np.mean(np.abs(q_again - again).max(axis=1) < 1e-5) >= 0.95
    observed = ~np.isnan(score[:50])
    assert np.abs(again - np.nan_to_num(score[:50]))[observed].mean() < 0.3


def test_parity_check_allows_a_neighbour_tie_but_not_a_broken_export() -> None:
    rng = np.random.default_rng(0)
    q, o = rng.uniform(size=(100, 5)), rng.uniform(10, 500, size=(100, 5))
    assert parity_problems((q, o), (q + 1e-6, o * (1 + 1e-6))) == []
    tie_q, tie_o = q.copy(), o.copy()
    tie_q[3] += 0.004  # one prompt whose 128th neighbour swapped
    tie_o[3] *= 1.05
    assert parity_problems((q, o), (tie_q, tie_o)) == []
    assert parity_problems((q, o), (q + 0.01, o)) != []  # wrong everywhere
    assert parity_problems((q, o), (q, o[:, ::-1])) != []  # models' columns mixed up
