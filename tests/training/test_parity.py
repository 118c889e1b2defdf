"""Export parity and batch invariance.

The ONNX embedder against sentence-transformers; each heads part and the whole heads model against
its own Python prediction; and the property the service rests on: a prompt's embedding and
estimates are the same, bit for bit, alone or among any other prompts.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from router.core.embedder import Embedder
from router.core.heads import Heads
from training.boosters import BoosterParams, fit_per_model
from training.embedder_export import base_model_dir, cached_export
from training.heads_model import HeadsModel, HeadsParams, parity_problems
from training.mlp_heads import MlpParams
from training.quality_model import BlendParams, QualityBlend
from training.settings import TrainSettings
from training.tables import load_table

# fp32 export: float rounding only. int8 (per-channel dynamic quantisation): a stated cosine floor.
FP32_TOLERANCE = 1e-5
INT8_MIN_COSINE = 0.95
INT8_MEAN_COSINE = 0.985
QUICK = HeadsParams(
    blend=BlendParams(mlp=MlpParams(epochs=2, seeds=(0, 1))),
    boosters=BoosterParams(max_rounds=20, early_stopping_rounds=5),
)


def _embedder(precision: str) -> Embedder:
    exported = cached_export(TrainSettings().cache_dir, precision=precision)
    return Embedder(exported.onnx_path, exported.tokenizer_path)


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


@pytest.fixture(scope="module")
def mmlu(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """(features, scores, output tokens, models, texts) of 600 real mmlu_pro training prompts."""
    table = load_table(data_dir / "mmlu_pro").split("train")
    texts = list(table.prompts["prompt"][:600])
    emb = _embedder("int8").embed(texts)
    x = np.hstack([emb, np.ones((len(emb), 2), dtype=np.float32)])
    return x, table.matrix("score")[:600], table.matrix("output_tokens")[:600], table.models, texts


def test_fp32_onnx_embedder_matches_sentence_transformers(texts: list[str], reference: np.ndarray) -> None:
    ours = _embedder("fp32").embed(texts)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < FP32_TOLERANCE


def test_int8_onnx_embedder_stays_close_to_sentence_transformers(
    texts: list[str], reference: np.ndarray
) -> None:
    cosine = (_embedder("int8").embed(texts) * reference).sum(axis=1)
    assert cosine.min() > INT8_MIN_COSINE
    assert cosine.mean() > INT8_MEAN_COSINE


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_prompts_embedding_does_not_depend_on_the_others(texts: list[str], precision: str) -> None:
    embedder = _embedder(precision)
    alone = np.vstack([embedder.embed([t]) for t in texts])
    shuffled = list(reversed(texts))
    together = embedder.embed(shuffled)[::-1]
    assert np.array_equal(alone, together)


def test_boosters_and_their_onnx_graph_agree(data_dir: Path) -> None:
    table = load_table(data_dir / "dcrouter").split("train")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(table.prompts), 24)).astype(np.float32)
    x[:, 0] = np.arange(len(x)) % 7  # a feature the boosters can actually use
    out_tokens = rng.poisson(20 + 10 * (x[:, :1] % 3), size=(len(x), len(table.models))).astype(float)
    out_tokens[:, 0] = 0.0  # a constant head, exported as a constant column
    params = BoosterParams(max_rounds=30, early_stopping_rounds=5)
    boosters = fit_per_model(
        "poisson", table.models, x[:4000], out_tokens[:4000], x[4000:], out_tokens[4000:], params
    )
    session = ort.InferenceSession(boosters.to_onnx(x.shape[1]).SerializeToString())
    (o_onnx,) = session.run(["columns"], {"features": x[4000:]})
    o_lgb = boosters.predict(x[4000:])
    assert o_onnx.shape == (len(x) - 4000, len(table.models))
    assert np.abs(o_onnx - o_lgb).max() / o_lgb.max() < 1e-5
    assert np.all(o_onnx[:, 0] == 0.0) and o_onnx[:, 1].std() > 0


def test_quality_blend_and_its_onnx_graph_agree(mmlu) -> None:
    """MLP ensemble + neighbour memory + kernel, exported with torch.onnx, against torch itself."""
    x, score, tokens, _, _ = mmlu
    assert np.isnan(tokens).any() and (~np.isnan(tokens)).any()
    blend = QualityBlend.fit(x[:500], score[:500], tokens[:500], 384, QUICK.blend)
    session = ort.InferenceSession(blend.to_onnx().SerializeToString())
    q_onnx, o_onnx = session.run(["quality", "neighbour_output_tokens"], {"features": x[500:]})
    q_torch, o_torch = blend.predict(x[500:])
    # mmlu_pro repeats some prompts: identical neighbours tie, and torch and ONNX Runtime may order
    # them differently at the k-th place; the parity check allows a few such prompts
    assert parity_problems((q_torch, o_torch), (q_onnx, o_onnx)) == []
    exact = (np.abs(q_onnx - q_torch).max(axis=1) < 1e-5) & (np.abs(o_onnx - o_torch).max(axis=1) < 1e-3)
    assert exact.mean() >= 0.95
    # the neighbours' output length: within the range of what the training prompts were billed
    assert np.nanmin(tokens[:500]) <= o_onnx.min() and o_onnx.max() <= np.nanmax(tokens[:500])
    # a training prompt asked again is pulled to its own observed outcomes by the kernel; the
    # graph's int8 candidate search must find it as the exact search does
    again, _ = blend.predict(x[:50])
    q_again, _ = session.run(["quality", "neighbour_output_tokens"], {"features": x[:50]})
    assert np.mean(np.abs(q_again - again).max(axis=1) < 1e-5) >= 0.95
    observed = ~np.isnan(score[:50])
    assert np.abs(again - np.nan_to_num(score[:50]))[observed].mean() < 0.3


def test_heads_model_and_its_graph_are_a_pair_and_the_graph_is_batch_invariant(mmlu) -> None:
    x, score, tokens, models, _ = mmlu
    tokens = np.nan_to_num(tokens, nan=100.0)
    model = HeadsModel.fit(
        models, x[:500], score[:500], tokens[:500], 384, QUICK, validation=(x[500:], tokens[500:])
    )
    heads = Heads(model.export(x[500:]))  # export refuses a graph that disagrees with `predict`
    q_ref, o_ref = model.predict(x[500:])
    q, o = heads.run(x[500:])
    assert parity_problems((q_ref, o_ref), (q, o)) == []
    assert q.shape == (100, len(models)) and (q >= 0).all() and (q <= 1).all() and (o >= 0).all()
    # a row's estimates are the same, bit for bit, alone, in a batch of
    # two, and in a batch of 100 in another order
    rows = [heads.run(x[i : i + 1]) for i in range(500, 600)]
    pairs = [heads.run(x[i : i + 2]) for i in range(500, 600, 2)]
    order = np.random.default_rng(1).permutation(100)
    q_perm, o_perm = heads.run(x[500:][order])
    assert np.array_equal(np.vstack([r[0] for r in rows]), q)
    assert np.array_equal(np.vstack([r[1] for r in rows]), o)
    assert np.array_equal(np.vstack([p[0] for p in pairs]), q)
    assert np.array_equal(q_perm, q[order]) and np.array_equal(o_perm, o[order])


def test_engine_estimates_do_not_depend_on_the_batch(small_bundle: Path, data_dir: Path) -> None:
    from router.core.engine import open_engine

    _, engine = open_engine(small_bundle, provider="cpu")
    prompts = list(load_table(data_dir / "dcrouter").split("test").prompts["prompt"][:192])
    alone = [engine.estimate([p]) for p in prompts]
    rng = random.Random(0)
    for start in range(0, 192, 12):
        batch = prompts[start : start + 12]
        order = list(range(12))
        rng.shuffle(order)
        est = engine.estimate([batch[i] for i in order])
        for row, i in enumerate(order):
            assert np.array_equal(est.quality[row], alone[start + i].quality[0])
            assert np.array_equal(est.cost_usd[row], alone[start + i].cost_usd[0])


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
