"""`router bench`: serving speed and memory against a running server, beside the raw embedder.

A benchmark, not a test: it prints figures (and optionally writes JSON) measured in one run, so
ratios between them are meaningful on a shared, noisy machine:

1. the raw embedder (the bundle's own `Embedder`, in this process, while the server is idle):
   single-prompt latency and throughput; and, for reference, the same ONNX encoder fed
   length-sorted padded batches (faster, but a prompt's int8 embedding then depends on its batch,
   which is why the engine does not run it that way);
2. Route p50 / p99 at concurrency 1, alternating prompt by prompt with the raw embedder (two
   passes over the prompts);
3. Route throughput and p99 at 8, 32 and 128 concurrent clients, in rounds alternating with the
   raw embedder and the batched reference;
4. the server's resident memory before and after (from its /metrics endpoint), and start-up time.

The ratios use the alternated measurements: the machine's speed drifts within a run (it is shared),
and alternating makes the drift hit both sides of a ratio alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from router.core.bundle import load_bundle
from router.core.embedder import Embedder
from router.core.runtime import make_session
from router.v1 import router_pb2, router_pb2_grpc
from training.tables import load_table

# Batch sizes the batched reference is measured at; the best is reported.
REFERENCE_BATCH_SIZES = (2, 4, 8, 16, 32)
C1_PASSES = 2


@dataclass
class LoadResult:
    concurrency: int
    calls: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds


def load_prompts(data_dir: Path, n: int, seed: int = 0) -> list[str]:
    prompts = list(load_table(data_dir).split("test").prompts["prompt"])
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


class BatchedReference:
    """The bundle's ONNX encoder fed length-sorted, padded batches: what batching would buy."""

    def __init__(self, embedder: Embedder, threads: int) -> None:
        self._embedder = embedder
        self._session = make_session(embedder.onnx_path, threads=threads)

    def embed(self, texts: Sequence[str], batch_size: int) -> None:
        tokens = sorted(self._embedder.tokenize(texts), key=lambda t: len(t.ids))
        for start in range(0, len(tokens), batch_size):
            group = tokens[start : start + batch_size]
            width = max(len(t.ids) for t in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, t in enumerate(group):
                ids[row, : len(t.ids)] = t.ids
                mask[row, : len(t.ids)] = 1
            self._session.run(None, {"input_ids": ids, "attention_mask": mask})


def _rate(embed: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    embed()
    return n / (time.perf_counter() - started)


def raw_embedder(embedder: Embedder, reference: BatchedReference, prompts: list[str]) -> dict:
    """The embedder alone (tokenize + encoder) as the engine runs it, and the batched reference."""
    embedder.embed(prompts[:8])  # warm-up
    single = []
    for text in prompts:
        started = time.perf_counter()
        embedder.embed([text])
        single.append(time.perf_counter() - started)
    by_batch = {
        size: _rate(partial(reference.embed, prompts, size), len(prompts)) for size in REFERENCE_BATCH_SIZES
    }
    best = max(by_batch, key=lambda k: by_batch[k])
    return {
        "provider": embedder.provider,
        "single_p50_ms": _percentile(single, 50),
        "single_p99_ms": _percentile(single, 99),
        "throughput": _rate(lambda: embedder.embed(prompts), len(prompts)),
        "reference_throughput_by_batch": by_batch,
        "reference_best_batch": best,
    }


async def _drive_raw(
    address: str, prompts: list[str], concurrency: int, calls: int, timeout: float
) -> tuple[list[float], int, float]:
    """`calls` Route calls from `concurrency` clients: (latencies, errors, elapsed seconds)."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(calls))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def client() -> None:
            nonlocal errors
            for i in counter:
                request = router_pb2.RouteRequest(prompt=prompts[i % len(prompts)])
                started = time.perf_counter()
                try:
                    await stub.Route(request, timeout=timeout)
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def _drive(address: str, prompts: list[str], concurrency: int, calls: int, timeout: float) -> LoadResult:
    latencies, errors, elapsed = asyncio.run(_drive_raw(address, prompts, concurrency, calls, timeout))
    return LoadResult(
        concurrency, len(latencies), errors, elapsed, _percentile(latencies, 50), _percentile(latencies, 99)
    )


def paired_single(embedder: Embedder, address: str, prompts: list[str]) -> tuple[LoadResult, list[float]]:
    """Route at c=1 and the raw embedder on the same prompt, alternately, so that the machine's
    drift (it is shared) hits both sides of the ratio alike. Returns Route's result and raw times."""
    raw: list[float] = []
    route: list[float] = []
    errors = 0
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for text in prompts:
            started = time.perf_counter()
            embedder.embed([text])
            raw.append(time.perf_counter() - started)
            started = time.perf_counter()
            try:
                stub.Route(router_pb2.RouteRequest(prompt=text), timeout=30.0)
                route.append(time.perf_counter() - started)
            except grpc.RpcError:
                errors += 1
    result = LoadResult(1, len(route), errors, sum(route), _percentile(route, 50), _percentile(route, 99))
    return result, raw


def paired_throughput(
    embedder: Embedder,
    reference: BatchedReference,
    batch: int,
    address: str,
    prompts: list[str],
    concurrency: int,
    calls: int,
    rounds: int = 3,
) -> tuple[LoadResult, float, float]:
    """Route at `concurrency`, the raw embedder and the batched reference, in alternating rounds.
    Returns Route's result and the two raw throughputs over the same rounds."""
    raw_seconds = reference_seconds = 0.0
    latencies: list[float] = []
    errors = 0
    seconds = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        embedder.embed(prompts)
        raw_seconds += time.perf_counter() - started
        started = time.perf_counter()
        reference.embed(prompts, batch)
        reference_seconds += time.perf_counter() - started
        lat, err, elapsed = asyncio.run(_drive_raw(address, prompts, concurrency, calls // rounds, 60.0))
        latencies += lat
        errors += err
        seconds += elapsed
    route = LoadResult(
        concurrency, len(latencies), errors, seconds, _percentile(latencies, 50), _percentile(latencies, 99)
    )
    n = rounds * len(prompts)
    return route, n / raw_seconds, n / reference_seconds


def measure_startup(bundle_dir: Path, timeout: float = 60.0) -> dict:
    """Seconds from spawning `router serve` to health SERVING, and its RSS then (a fresh process)."""
    import os
    import signal
    import subprocess
    import sys

    port, metrics_port = free_port(), free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--bundle",
            str(bundle_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--metrics-host",
            "127.0.0.1",
            "--bundle-poll-s",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    try:
        wait_serving(f"127.0.0.1:{port}", started + timeout, lambda: proc.poll() is None)
        serving_s = time.perf_counter() - started
        return {
            "seconds_to_serving": serving_s,
            "rss_at_serving_mb": server_rss_mb(f"http://127.0.0.1:{metrics_port}/metrics"),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def serving(bundle: Path, *extra: str, log: Path | None = None, timeout: float = 180.0) -> Iterator[str]:
    """`router serve` of `bundle` in a process of its own on a free loopback port (metrics on an
    ephemeral one, no bundle polling, `extra` flags), its output to `log` or nowhere; yields the
    address once it is SERVING, and stops it with SIGTERM afterwards."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    command = ["serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--metrics-port", "0", "--metrics-host", "127.0.0.1", "--bundle-poll-s", "0", *extra]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", *command], stdout=out, stderr=out, env=os.environ.copy()
        )
        try:
            address = f"127.0.0.1:{port}"
            wait_serving(address, time.perf_counter() + timeout, lambda: proc.poll() is None)
            yield address
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


def wait_serving(address: str, deadline: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Polls gRPC health until the router reports SERVING (by perf_counter `deadline`)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if time.perf_counter() > deadline or not alive():
                raise RuntimeError(f"the server at {address} did not become SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="router.v1.Router"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_rss_mb(metrics_url: str) -> float | None:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return None
    match = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) / 2**20 if match else None


def run_bench(
    server: str,
    metrics_url: str,
    bundle_dir: Path,
    data_dir: Path,
    n_prompts: int = 256,
    concurrency: Sequence[int] = (8, 32, 128),
    calls_per_level: int = 512,
    threads: int = 0,
    soak: int = 0,
) -> dict:
    prompts = load_prompts(data_dir, n_prompts)
    result: dict = {"server": server, "prompts": len(prompts), "data": str(data_dir)}
    wait_serving(server, time.perf_counter() + 120.0)
    result["startup"] = [measure_startup(bundle_dir) for _ in range(3)]
    result["rss_before_mb"] = server_rss_mb(metrics_url)
    embedder = load_bundle(bundle_dir, provider="auto", threads=threads).embedder
    reference = BatchedReference(embedder, threads)
    result["embedder"] = raw_embedder(embedder, reference, prompts)
    best = result["embedder"]["reference_best_batch"]
    _drive(server, prompts, 4, 64, 30.0)  # warm the server's connection and buffers
    # Two passes: the ratio of two medians is noisy on a shared machine, more pairs steady it.
    c1, raw_single = paired_single(embedder, server, prompts * C1_PASSES)
    result["route_c1"] = c1.__dict__ | {"throughput": c1.throughput}
    result["paired_embedder_single_p50_ms"] = _percentile(raw_single, 50)
    result["route_concurrent"] = []
    for level in concurrency:
        r, raw_throughput, reference_throughput = paired_throughput(
            embedder, reference, best, server, prompts, level, max(calls_per_level, 2 * level)
        )
        result["route_concurrent"].append(
            r.__dict__
            | {
                "throughput": r.throughput,
                "paired_embedder_throughput": raw_throughput,
                "paired_reference_throughput": reference_throughput,
            }
        )
    if soak:
        result["rss_before_soak_mb"] = server_rss_mb(metrics_url)
        s = _drive(server, prompts, 32, soak, 60.0)
        result["soak"] = s.__dict__ | {"throughput": s.throughput}
    result["rss_after_mb"] = server_rss_mb(metrics_url)
    result["ratios"] = {
        "route_p50_c1_over_embedder_single_p50": c1.p50_ms / result["paired_embedder_single_p50_ms"],
        **{
            f"throughput_c{r['concurrency']}_over_embedder": r["throughput"] / r["paired_embedder_throughput"]
            for r in result["route_concurrent"]
        },
        **{
            f"throughput_c{r['concurrency']}_over_batched_reference": r["throughput"]
            / r["paired_reference_throughput"]
            for r in result["route_concurrent"]
        },
    }
    result["route_c1_p50_minus_embedder_ms"] = c1.p50_ms - result["paired_embedder_single_p50_ms"]
    return result


def format_report(r: dict) -> str:
    emb = r["embedder"]
    lines = [
        f"prompts: {r['prompts']} from {r['data']} (test split); embedder provider {emb['provider']}",
        f"raw embedder (one prompt per encoder run, as served): single p50 {emb['single_p50_ms']:.2f} ms, "
        f"p99 {emb['single_p99_ms']:.2f} ms; {emb['throughput']:.1f} prompts/s",
        "batched reference (padded, not batch-invariant): "
        + ", ".join(f"batch {k}: {v:.1f}/s" for k, v in emb["reference_throughput_by_batch"].items()),
        f"Route c=1: p50 {r['route_c1']['p50_ms']:.2f} ms, p99 {r['route_c1']['p99_ms']:.2f} ms "
        f"({r['route_c1']['throughput']:.1f}/s); raw embedder alternating with it: p50 "
        f"{r['paired_embedder_single_p50_ms']:.2f} ms (Route - embedder: "
        f"{r['route_c1_p50_minus_embedder_ms']:.2f} ms)",
    ]
    for c in r["route_concurrent"]:
        lines.append(
            f"Route c={c['concurrency']}: {c['throughput']:.1f} calls/s, p50 {c['p50_ms']:.1f} ms, "
            f"p99 {c['p99_ms']:.1f} ms, errors {c['errors']}; alternating with it: raw embedder "
            f"{c['paired_embedder_throughput']:.1f} prompts/s, batched reference (batch "
            f"{emb['reference_best_batch']}) {c['paired_reference_throughput']:.1f} prompts/s"
        )
    if "soak" in r:
        s = r["soak"]
        lines.append(
            f"soak: {s['calls']} calls at c=32, {s['throughput']:.1f}/s, errors {s['errors']}, "
            f"RSS {r['rss_before_soak_mb']:.1f} -> {r['rss_after_mb']:.1f} MB "
            f"({100 * (r['rss_after_mb'] / r['rss_before_soak_mb'] - 1):+.2f}%)"
        )
    lines.append(
        "start-up to SERVING (fresh process, 3 runs): "
        + ", ".join(f"{s['seconds_to_serving']:.2f} s" for s in r["startup"])
        + f"; RSS then {r['startup'][0]['rss_at_serving_mb']:.1f} MB"
    )
    lines.append(f"server RSS: before {r['rss_before_mb']:.1f} MB, after {r['rss_after_mb']:.1f} MB")
    lines.append("ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in r["ratios"].items()))
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
