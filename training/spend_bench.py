"""What holding a hard cap costs a call: Route calls of a capped tenant and of an uncapped one,
interleaved in one run on two replicas, with an SQLite spend store each (caps per replica) and,
given `--postgres`, with one PostgreSQL store the two share (caps held together: each batch with a
capped call locks the tenant's window row until its spend is written).

    python -m training.spend_bench --bundle bundles/default --data ../shared/data/mmlu_pro \\
        --postgres postgresql://USER@HOST:PORT/DB

The cap is never reached (1,000,000 USD), so every capped call takes the whole path. The ratio
of the capped tenant's latency to the uncapped one's, measured in the same run, is the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import grpc

from router.v1 import router_pb2, router_pb2_grpc
from training.bench import _percentile, load_prompts, serving

CAPPED = "bench-capped"


async def _drive(
    addresses: list[str], prompts: list[str], concurrency: int, calls: int
) -> tuple[dict[str, list[float]], int, float]:
    """`calls` calls from `concurrency` clients per replica, each client alternating the tenants."""
    latencies: dict[str, list[float]] = {CAPPED: [], "": []}
    errors = 0
    counter = iter(range(calls))
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [router_pb2_grpc.RouterStub(c) for c in channels]

    async def client(stub: router_pb2_grpc.RouterStub) -> None:
        nonlocal errors
        for i in counter:
            tenant = CAPPED if i % 2 else ""
            request = router_pb2.RouteRequest(prompt=prompts[i % len(prompts)], tenant=tenant)
            started = time.perf_counter()
            try:
                await stub.Route(request, timeout=60.0)
                latencies[tenant].append(time.perf_counter() - started)
            except grpc.aio.AioRpcError:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(stub) for stub in stubs for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return latencies, errors, elapsed


def measure(
    bundle: Path, prompts: list[str], stores: list[str], budgets: Path, concurrency: int, calls: int
) -> dict:
    with contextlib.ExitStack() as stack:
        addresses = [
            stack.enter_context(serving(bundle, "--budgets", str(budgets), "--spend-store", store))
            for store in stores
        ]
        asyncio.run(_drive(addresses, prompts, 2, 64))  # warm the replicas and their connections
        latencies, errors, elapsed = asyncio.run(_drive(addresses, prompts, concurrency, calls))
    capped, plain = latencies[CAPPED], latencies[""]
    return {
        "calls_per_s": (len(capped) + len(plain)) / elapsed,
        "errors": errors,
        "capped_p50_ms": _percentile(capped, 50),
        "capped_p99_ms": _percentile(capped, 99),
        "uncapped_p50_ms": _percentile(plain, 50),
        "uncapped_p99_ms": _percentile(plain, 99),
        "p50_ratio": _percentile(capped, 50) / _percentile(plain, 50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.spend_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True, help="table whose test prompts are sent")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL database the two replicas share")
    parser.add_argument("--concurrency", type=int, default=8, help="clients per replica")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    prompts = load_prompts(Path(args.data), 256)
    with tempfile.TemporaryDirectory(prefix="spend-bench-") as scratch:
        budgets = Path(scratch) / "budgets.yaml"
        budgets.write_text(f"tenants:\n  {CAPPED}: {{limit_usd: 1000000.0}}\n", encoding="utf-8")
        kinds = {"sqlite (one file per replica)": [f"{scratch}/a.sqlite", f"{scratch}/b.sqlite"]}
        if args.postgres:
            kinds["postgresql (shared)"] = [args.postgres, args.postgres]
        for kind, stores in kinds.items():
            r = measure(Path(args.bundle), prompts, stores, budgets, args.concurrency, args.calls)
            print(
                f"{kind}: 2 replicas x {args.concurrency} clients, {args.calls} calls: "
                f"{r['calls_per_s']:.1f} calls/s, errors {r['errors']}; "
                f"capped p50 {r['capped_p50_ms']:.1f} ms "
                f"(p99 {r['capped_p99_ms']:.1f}), uncapped p50 {r['uncapped_p50_ms']:.1f} ms "
                f"(p99 {r['uncapped_p99_ms']:.1f}); capped/uncapped p50 {r['p50_ratio']:.3f}"
            )


if __name__ == "__main__":
    main()
