"""What the online memory costs a Route batch: the engine's estimates (tokenizer, embedder, heads)
for a batch of real prompts, and the memory's look-up for the same batch when it holds S scored
prompts, measured alternately in one run.

    python -m training.online_bench --bundle bundles/default --data ../shared/data/mmlu_pro

The memory is filled with random unit vectors, every bundle model scored on each (as shadow
evaluations would send). A look-up rescores, one prompt at a time, every entry within rounding of
its K-th nearest: few for spread-out entries, but all copies of a prompt asked again and again
(one entry per decision). `--popular F` makes that share of the memory copies of the first
benchmark prompt, which then leads every batch. The figure is the look-up's time as a share of the
engine's, per memory size and batch size.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from router.core.engine import Engine, open_engine
from router.core.online import OnlineMemory
from training.bench import load_prompts


def filled_memory(
    engine: Engine, size: int, popular: np.ndarray, share: float, seed: int = 0
) -> OnlineMemory:
    dim = engine.embedder.dim
    memory = OnlineMemory(dim, capacity=size)
    rng = np.random.default_rng(seed)
    copies = int(share * size)
    for start in range(0, size, 10_000):
        n = min(10_000, size - start)
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        emb[: max(0, min(n, copies - start))] = popular
        keys = [f"bench-{start + i}" for i in range(n)]
        for model in engine.models:
            scores = rng.random(n).tolist()
            memory.add(keys, emb, [model] * n, scores, rng.integers(1, 1_000, n).astype(float).tolist())
    return memory


def _median_s(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(
    bundle: Path, data: Path, sizes: list[int], batches: list[int], rounds: int, repeats: int, popular: float
) -> list[dict]:
    _, engine = open_engine(bundle)
    prompts = load_prompts(data, max(batches))
    lead = engine.featurize(prompts[:1]).features[0, : engine.embedder.dim]
    rows = []
    for size in sizes:
        memory = filled_memory(engine, size, lead, popular)
        for batch in batches:
            texts = prompts[:batch]
            features = engine.featurize(texts).features
            quality, tokens = engine.heads.run(features)
            estimate = functools.partial(engine.estimate, texts)
            look_up = functools.partial(memory.adjust, features, engine.models, quality, tokens)
            engine_s, memory_s = [], []
            for _ in range(rounds):  # alternated, so that a shared machine's drift hits both alike
                engine_s.append(_median_s(estimate, repeats))
                memory_s.append(_median_s(look_up, repeats))
            e, m = statistics.median(engine_s), statistics.median(memory_s)
            rows.append(
                {"memory": size, "batch": batch, "engine_ms": e * 1e3, "memory_ms": m * 1e3, "share": m / e}
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mmlu_pro"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000], help="scored prompts held")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="prompts per engine batch")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the engine and the memory")
    parser.add_argument("--repeats", type=int, default=5, help="batches timed per round (the median counts)")
    parser.add_argument("--popular", type=float, default=0.0, help="share of the memory that is one prompt")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or min(args.batches) < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--sizes, --batches, --rounds and --repeats must be positive")
    if not 0.0 <= args.popular <= 1.0:
        parser.error(f"--popular must be a share from 0 to 1, got {args.popular}")
    print("memory  batch  engine ms (no memory)  memory look-up ms  look-up / engine")
    for r in measure(
        args.bundle, args.data, args.sizes, args.batches, args.rounds, args.repeats, args.popular
    ):
        figures = f"{r['engine_ms']:>21.1f}  {r['memory_ms']:>17.1f}  {r['share']:>16.3f}"
        print(f"{r['memory']:>6}  {r['batch']:>5}  {figures}")


if __name__ == "__main__":
    main()
