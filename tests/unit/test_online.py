"""The online memory: a batch looked up at once gets exactly what each prompt gets alone, and that is
the K-nearest pull computed the plain way, in float64, one prompt at a time."""

from __future__ import annotations

import numpy as np
import pytest

from router.core.online import STRENGTH, TAU, K, OnlineMemory, _unit, similarities

DIM = 384
MODELS = [f"model-{i}" for i in range(5)]


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _memory(rng: np.random.Generator, n: int, scale: float = 1.0) -> tuple[OnlineMemory, np.ndarray]:
    memory = OnlineMemory(DIM, capacity=n)
    emb = _random_unit(rng, n)
    emb[1::5] = emb[0::5][: len(emb[1::5])]  # exact duplicates: ties for the K-th place
    keys = [f"d{i}" for i in range(n)]
    for model in MODELS:
        reported = rng.random(n) < 0.4  # each model scored on some prompts only
        tokens = rng.integers(1, 500, n).astype(float)
        tokens[rng.random(n) < 0.3] = np.nan  # output length not always reported
        memory.add(
            [k for k, r in zip(keys, reported, strict=True) if r],
            emb[reported] * np.float32(scale),
            [model] * int(reported.sum()),
            rng.random(int(reported.sum())).tolist(),
            tokens[reported].tolist(),
        )
    return memory, emb


def _queries(rng: np.random.Generator, emb: np.ndarray, n: int) -> np.ndarray:
    near = emb[: n // 2] + 1e-3 * _random_unit(rng, n // 2)  # close to held prompts, where the pull is strong
    queries = np.vstack([near, _random_unit(rng, n - n // 2)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    extras = np.zeros((n, 6), dtype=np.float32)  # the head features after the embedding
    return np.hstack([queries, extras]).astype(np.float32)


def _plain(memory: OnlineMemory, features: np.ndarray, quality: np.ndarray, tokens: np.ndarray) -> tuple:
    """The rule of router/core/online.py's docstring, written out: every entry scored against the
    prompt, the K most similar (ties to the lower slot), per model over those with its outcome."""
    n = memory._size
    quality, tokens = quality.copy(), tokens.copy()
    for row, prompt in enumerate(_unit(features[:, :DIM])):
        assert prompt is not None
        sims = similarities(memory._emb[:n], prompt)
        near = np.lexsort((np.arange(n), -sims))[:K]
        weight = np.exp((sims[near] - 1.0) / TAU)
        for j, model in enumerate(MODELS):
            column = memory._columns[model]
            for values, out in ((memory._score, quality), (memory._tokens, tokens)):
                v = values[near, column]
                known = ~np.isnan(v)
                if known.any():
                    w = weight[known]
                    out[row, j] = (w @ v[known] + STRENGTH * out[row, j]) / (w.sum() + STRENGTH)
    return quality, tokens


@pytest.mark.parametrize(("held", "scale"), [(K // 2, 1.0), (3_000, 1.0), (3_000, 1e-22), (3_000, 1e4)])
def test_a_batch_gets_what_each_prompt_gets_alone_and_the_plain_rule(held: int, scale: float) -> None:
    # stored features come from a database: their scale is not the embedder's unit length
    rng = np.random.default_rng(held)
    memory, emb = _memory(rng, held, scale)
    features = _queries(rng, emb, 24)
    quality = rng.random((24, len(MODELS)))
    tokens = rng.random((24, len(MODELS))) * 300

    batch_q, batch_t = memory.adjust(features, MODELS, quality, tokens)
    for row in range(24):
        alone_q, alone_t = memory.adjust(
            features[row : row + 1], MODELS, quality[row : row + 1], tokens[row : row + 1]
        )
        assert np.array_equal(alone_q[0], batch_q[row]) and np.array_equal(alone_t[0], batch_t[row])

    plain_q, plain_t = _plain(memory, features, quality, tokens)
    np.testing.assert_allclose(batch_q, plain_q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(batch_t, plain_t, rtol=1e-12, atol=0)
    assert np.abs(batch_q[:12] - quality[:12]).max() > 0.05  # near held prompts the pull is real


def test_models_without_nearby_outcomes_keep_the_bundle_estimate() -> None:
    rng = np.random.default_rng(1)
    memory = OnlineMemory(DIM, capacity=10)
    emb = _random_unit(rng, 1)
    memory.add(["d0"], emb, [MODELS[0]], [1.0], [float("nan")])
    features = np.hstack([emb, np.zeros((1, 6), dtype=np.float32)])
    quality, tokens = np.full((1, 3), 0.2), np.full((1, 3), 50.0)
    q, t = memory.adjust(features, [MODELS[0], MODELS[1], "never-reported"], quality, tokens)
    assert q[0, 0] == pytest.approx((1.0 + STRENGTH * 0.2) / (1.0 + STRENGTH))  # its own outcome, cosine 1
    assert q[0, 1] == 0.2 and q[0, 2] == 0.2  # no outcome of these models: untouched
    assert np.array_equal(t, tokens)  # no output length reported


def test_the_oldest_prompt_goes_first_when_full() -> None:
    rng = np.random.default_rng(2)
    memory = OnlineMemory(DIM, capacity=3)
    emb = _random_unit(rng, 4)
    for i in range(4):
        memory.add([f"d{i}"], emb[i : i + 1], [MODELS[0]], [1.0], [10.0])
    assert len(memory) == 3
    features = np.hstack([emb[:1], np.zeros((1, 6), dtype=np.float32)])
    q, _ = memory.adjust(features, [MODELS[0]], np.zeros((1, 1)), np.zeros((1, 1)))
    # d0 is gone: what is left of the memory is random directions, far from it, and barely pulls
    assert q[0, 0] < 0.01


def test_embeddings_that_are_not_finite_or_have_no_length_are_not_learnt_nor_looked_up() -> None:
    rng = np.random.default_rng(3)
    memory = OnlineMemory(DIM, capacity=200)
    emb = _random_unit(rng, 100)
    bad = np.vstack([np.full(DIM, np.nan), np.zeros(DIM), np.full(DIM, np.inf)]).astype(np.float32)
    keys = [f"d{i}" for i in range(103)]
    ignored = memory.add(keys, np.vstack([emb, bad]), [MODELS[0]] * 103, [1.0] * 103, [10.0] * 103)
    assert ignored == 3 and len(memory) == 100
    features = np.hstack([np.vstack([emb[:2], bad]), np.zeros((5, 6), dtype=np.float32)])
    quality, tokens = np.zeros((5, 1)), np.full((5, 1), 5.0)
    q, t = memory.adjust(features, [MODELS[0]], quality, tokens)
    assert (q[:2, 0] > 0.4).all() and (t[:2, 0] > 7.0).all()  # pulled towards their own outcomes
    assert np.array_equal(q[2:], quality[2:]) and np.array_equal(t[2:], tokens[2:])  # left as they were
