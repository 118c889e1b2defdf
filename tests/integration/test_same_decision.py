"""The same request gets the same decision whatever the load, and `router predict` agrees with Route.

400 real mmlu_pro test prompts go to the real server once one at a time, and once from 32
concurrent clients mixed with 400 other prompts (so that the micro-batcher forms batches of
whatever arrives together), at every preset of the bundle and at w = 0.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pandas as pd
import pytest

from router.v1 import router_pb2, router_pb2_grpc
from tests.helpers import router_stub, running_server

N_PROMPTS = 400
CLIENTS = 32
TOLERANCE = 1e-5

Setting = tuple[str, float | None]  # (preset, cost_weight)


@pytest.fixture(scope="module")
def prompts(data_dir: Path) -> pd.DataFrame:
    table = pd.read_parquet(data_dir / "mmlu_pro" / "prompts.parquet")
    return table[table.split == "test"].sample(2 * N_PROMPTS, random_state=7).reset_index(drop=True)


def _request(prompt: str, setting: Setting) -> router_pb2.RouteRequest:
    preset, w = setting
    request = router_pb2.RouteRequest(prompt=prompt, preset=preset)
    if w is not None:
        request.cost_weight = w
    return request


def _key(response: router_pb2.RouteResponse) -> tuple[str, dict[str, tuple[float, float]]]:
    return response.model, {e.model: (e.quality, e.cost_usd) for e in response.estimates}


async def _concurrently(address: str, calls: list[tuple[int, router_pb2.RouteRequest]]) -> dict:
    results: dict[int, router_pb2.RouteResponse] = {}
    queue = iter(calls)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def client() -> None:
            for key, request in queue:
                response = await stub.Route(request, timeout=120)
                if key >= 0:
                    results[key] = response

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return results


@pytest.mark.slow
def test_same_prompt_same_decision_alone_and_under_load(small_bundle: Path, prompts: pd.DataFrame) -> None:
    texts = list(prompts.prompt[:N_PROMPTS])
    others = list(prompts.prompt[N_PROMPTS:])
    with running_server(bundle=small_bundle) as srv, router_stub(srv.address) as stub:
        info = stub.Info(router_pb2.InfoRequest(), timeout=10)
        settings: list[Setting] = [(p.name, None) for p in info.presets] + [("", 0.0)]
        assert len(settings) >= 5
        calls = [
            (i * len(settings) + s, _request(t, setting))
            for i, t in enumerate(texts)
            for s, setting in enumerate(settings)
        ]
        alone = {key: stub.Route(request, timeout=30) for key, request in calls}
        mixed = calls + [(-1, router_pb2.RouteRequest(prompt=t)) for t in others]
        random.Random(3).shuffle(mixed)
        loaded = asyncio.run(_concurrently(srv.address, mixed))
        batch_sizes = _histogram_count(srv, "router_batch_size")
    assert batch_sizes["above_one"] > 0, "the concurrent pass never formed a batch"
    assert set(loaded) == set(alone)
    differing_models = [key for key in alone if alone[key].model != loaded[key].model]
    assert differing_models == []
    worst = 0.0
    for key in alone:
        (_, a), (_, b) = _key(alone[key]), _key(loaded[key])
        worst = max(worst, *(abs(a[m][0] - b[m][0]) + abs(a[m][1] - b[m][1]) for m in a))
    assert worst <= TOLERANCE


def _histogram_count(srv, name: str) -> dict[str, float]:
    import urllib.request

    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    counts = {}
    for line in text.splitlines():
        if line.startswith(f'{name}_bucket{{le="1.0"}}'):
            counts["one"] = float(line.split()[-1])
        if line.startswith(f"{name}_count"):
            counts["all"] = float(line.split()[-1])
    return {"above_one": counts["all"] - counts["one"]}


@pytest.mark.slow
def test_router_predict_gives_the_estimates_route_gives(
    small_bundle: Path, prompts: pd.DataFrame, data_dir: Path, tmp_path: Path
) -> None:
    """`router predict` on a table of the same prompts, against the server's Route estimates."""
    src = data_dir / "mmlu_pro"
    chosen = prompts[:N_PROMPTS]
    table = tmp_path / "mmlu_pro_same"
    table.mkdir()
    chosen.to_parquet(table / "prompts.parquet")
    outcomes = pd.read_parquet(src / "outcomes.parquet")
    outcomes[outcomes.prompt_id.isin(chosen.prompt_id)].to_parquet(table / "outcomes.parquet")
    shutil.copy(src / "models.csv", table / "models.csv")
    out = tmp_path / "predictions.parquet"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "predict",
            "--bundle",
            str(small_bundle),
            "--data",
            str(table),
            "--split",
            "test",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    predicted = pd.read_parquet(out).set_index(["prompt_id", "model"])
    with running_server(bundle=small_bundle) as srv, router_stub(srv.address) as stub:
        routed = {
            pid: stub.Route(router_pb2.RouteRequest(prompt=text), timeout=30)
            for pid, text in zip(chosen.prompt_id, chosen.prompt, strict=True)
        }
    assert len(predicted) == N_PROMPTS * len(next(iter(routed.values())).estimates)
    worst = 0.0
    for pid, response in routed.items():
        for e in response.estimates:
            row = predicted.loc[(pid, e.model)]
            worst = max(worst, abs(row.quality - e.quality), abs(row.cost_usd - e.cost_usd))
    assert worst <= TOLERANCE
