"""Bundle swaps under traffic, refused bad bundles, graceful SIGTERM, overload and deadlines."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import HELD_OUT
from tests.helpers import (
    LONG_PROMPT,
    PROMPT,
    Traffic,
    edit_manifest,
    point_link,
    router_stub,
    running_server,
    serve_command,
    wait_for_version,
)


def _variant(bundle: Path, target: Path, version: str) -> Path:
    """A copy of a real bundle under another version name."""
    shutil.copytree(bundle, target)
    edit_manifest(target, lambda m: m.update(bundle_version=version))
    return target


def test_bundle_swap_under_traffic_loses_no_call(small_bundle: Path, tmp_path: Path) -> None:
    old = _variant(small_bundle, tmp_path / "v1", "swap-test-v1")
    new = _variant(small_bundle, tmp_path / "v2", "swap-test-v2")
    current = tmp_path / "current"
    point_link(current, old)
    with running_server(bundle=current, bundle_poll_s=0.2) as srv, router_stub(srv.address) as stub:
        wait_for_version(stub, "swap-test-v1")
        with Traffic(srv.address, clients=4) as traffic:
            time.sleep(1.0)
            point_link(current, new)
            wait_for_version(stub, "swap-test-v2")
            time.sleep(1.0)
        codes = {code for _, _, code, _ in traffic.results}
        versions = [v for _, _, _, v in sorted(traffic.results)]
        assert codes == {grpc.StatusCode.OK}, codes
        assert versions[0] == "swap-test-v1" and versions[-1] == "swap-test-v2"
        # once switched, it stays switched
        first_new = versions.index("swap-test-v2")
        assert set(versions[first_new:]) == {"swap-test-v2"}


def _flip_byte(bundle: Path) -> None:
    path = bundle / "heads.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_file(bundle: Path) -> None:
    (bundle / "embedder" / "tokenizer.json").unlink()


def _extra_model(bundle: Path) -> None:
    phantom = {
        "name": "phantom",
        "input_usd_per_mtok": 1.0,
        "output_usd_per_mtok": 1.0,
        "output_tokens_known": True,
    }
    edit_manifest(bundle, lambda m: m["models"].append(phantom))


def _metric(srv, name: str, labels: str) -> float:
    import urllib.request

    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_bad_bundles_are_refused_and_the_old_one_keeps_serving(small_bundle: Path, tmp_path: Path) -> None:
    good = _variant(small_bundle, tmp_path / "good", "faults-good")
    current = tmp_path / "current"
    point_link(current, good)
    with running_server(bundle=current, bundle_poll_s=0.1) as srv, router_stub(srv.address) as stub:
        wait_for_version(stub, "faults-good")
        for i, fault in enumerate((_flip_byte, _drop_file, _extra_model)):
            bad = _variant(small_bundle, tmp_path / f"bad{i}", f"faults-bad{i}")
            fault(bad)
            point_link(current, bad)
            deadline = time.monotonic() + 30
            while _metric(srv, "router_bundle_loads_total", 'result="failure"') < i + 1:
                assert time.monotonic() < deadline, f"fault {fault.__name__} was never looked at"
                time.sleep(0.1)
            response = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10)
            assert response.bundle_version == "faults-good", fault.__name__
        # a good bundle after the bad ones is still taken
        point_link(current, _variant(small_bundle, tmp_path / "good2", "faults-good2"))
        wait_for_version(stub, "faults-good2")


def test_a_bundle_refused_while_its_copy_was_incomplete_is_taken_once_it_is_complete(
    small_bundle: Path, tmp_path: Path
) -> None:
    """The link repointed before the last file of the new version arrived: refused, and (keyed on
    the manifest alone) never looked at again until someone touched the manifest or restarted."""
    current = tmp_path / "current"
    point_link(current, _variant(small_bundle, tmp_path / "v1", "copy-v1"))
    with running_server(bundle=current, bundle_poll_s=0.1) as srv, router_stub(srv.address) as stub:
        wait_for_version(stub, "copy-v1")
        late = _variant(small_bundle, tmp_path / "v2", "copy-v2")
        heads = (late / "heads.onnx").read_bytes()
        (late / "heads.onnx").unlink()
        point_link(current, late)
        deadline = time.monotonic() + 30
        while _metric(srv, "router_bundle_loads_total", 'result="failure"') < 1:
            assert time.monotonic() < deadline, "the incomplete bundle was never looked at"
            time.sleep(0.1)
        assert stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10).bundle_version == "copy-v1"
        (late / "heads.onnx").write_bytes(heads)  # the copy completes
        wait_for_version(stub, "copy-v2")


# grpc.aio logs and prints this when the transport cancels a call in the instant between its
# arrival and the start of its handler (as it does to calls racing the shutdown): no router code runs
# and the client gets CANCELLED. Any other traceback is the router's.
_GRPC_CANCEL_RACE = re.compile(
    r"Traceback \(most recent call last\):\n"
    r"  File \"[^\"]*server\.pyx\.pxi\", line \d+, in grpc\._cython\.cygrpc\._schedule_rpc_coro\n"
    r"asyncio\.exceptions\.CancelledError\n"
)


def _without_grpc_cancel_race(stderr: str) -> str:
    return _GRPC_CANCEL_RACE.sub("", stderr)


def test_sigterm_drains_accepted_calls_then_exits(small_bundle: Path) -> None:
    proc = subprocess.Popen(
        serve_command([sys.executable, "-m", "router.cli"], small_bundle, extra=("--grace-period-s", "20")),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        assert proc.stderr is not None
        for line in proc.stderr:
            found = re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", line)
            port = port or (found and int(found.group(1)))
            if "SERVING" in line:
                break
        assert port, "server did not report its port"
        with Traffic(f"127.0.0.1:{port}", clients=12, prompt=LONG_PROMPT) as traffic:
            deadline = time.monotonic() + 30
            while len(traffic.results) < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)  # an impatient second one joins the first shutdown
            assert proc.wait(timeout=30) == 0
        stderr_tail = proc.stderr.read()
        assert stderr_tail.count("shutting down") == 1 and stderr_tail.count("shut down after") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    before = [r for r in traffic.results if r[0] < sigterm_at]
    in_flight = [r for r in before if r[1] > sigterm_at]
    assert len(before) > 12
    # calls the server had accepted before SIGTERM all completed, including the ones it drained
    assert {code for _, _, code, _ in before if code != grpc.StatusCode.UNAVAILABLE} == {grpc.StatusCode.OK}
    assert sum(1 for r in in_flight if r[2] == grpc.StatusCode.OK) >= 1
    # what came after was refused: UNAVAILABLE from the router, or CANCELLED by gRPC for calls that
    # arrived in the instant the transport closed
    after = {code for start, _, code, _ in traffic.results if start >= sigterm_at}
    assert after <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert "Traceback" not in _without_grpc_cancel_race(stderr_tail)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_overload_sheds_excess_calls_at_once(small_bundle: Path) -> None:
    """200 callers at once against 8 slots: the excess is refused quickly, memory stays put."""
    import asyncio

    async def storm(address: str, callers: int) -> list[tuple[grpc.StatusCode, float]]:
        async with grpc.aio.insecure_channel(address) as chan:
            stub = router_pb2_grpc.RouterStub(chan)
            await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)

            async def call() -> tuple[grpc.StatusCode, float]:
                started = time.monotonic()
                try:
                    await stub.Route(router_pb2.RouteRequest(prompt=LONG_PROMPT), timeout=60)
                    return grpc.StatusCode.OK, time.monotonic() - started
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), time.monotonic() - started

            return await asyncio.gather(*(call() for _ in range(callers)))

    with running_server(bundle=small_bundle, max_in_flight=8) as srv:
        asyncio.run(storm(srv.address, 8))  # warm up
        rss_before = _rss_mb()
        outcomes = [o for _ in range(3) for o in asyncio.run(storm(srv.address, 200))]
        rss_after = _rss_mb()
        codes = [c for c, _ in outcomes]
        shed = sorted(dt for c, dt in outcomes if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.OK) >= 3 * 8
        assert len(shed) >= 3 * 150
        assert shed[len(shed) // 2] < 0.5  # refused at once, not after queueing behind the work
        assert rss_after - rss_before < 100, (rss_before, rss_after)
        with router_stub(srv.address) as stub:
            assert stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10).model


def test_expired_deadlines_free_their_slot(small_bundle: Path) -> None:
    with running_server(bundle=small_bundle, max_in_flight=2) as srv, router_stub(srv.address) as stub:
        for _ in range(10):
            with pytest.raises(grpc.RpcError) as err:
                stub.Route(router_pb2.RouteRequest(prompt=LONG_PROMPT), timeout=0.002)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while srv.server.service._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.server.service._in_flight == 0
        # with only 2 slots, 10 abandoned calls would block this one if slots leaked
        assert stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10).model


def test_a_server_swaps_to_a_bundle_with_an_added_model_under_traffic(
    without: Path, added: Path, tmp_path: Path
) -> None:
    """`router add-model` writes a new version; the running server takes it with zero failed calls."""
    from router.core.manifest import Manifest

    old_version = Manifest.read(without).bundle_version
    new_version = Manifest.read(added).bundle_version
    current = tmp_path / "current"
    point_link(current, without)
    with running_server(bundle=current, bundle_poll_s=0.2) as srv, router_stub(srv.address) as stub:
        wait_for_version(stub, old_version)
        with Traffic(srv.address, clients=4) as traffic:
            time.sleep(1.0)
            point_link(current, added)
            wait_for_version(stub, new_version)
            time.sleep(1.0)
        models = [m.model for m in stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).models]
        response = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10)
    assert {code for _, _, code, _ in traffic.results} == {grpc.StatusCode.OK}
    assert {v for _, _, _, v in traffic.results} == {old_version, new_version}
    assert models[-1] == HELD_OUT and len(response.estimates) == len(models)


def test_a_bundle_with_another_encoder_does_not_read_the_online_memory(
    small_bundle: Path, tmp_path: Path
) -> None:
    """The memory holds the first bundle's embeddings; a bundle of the same embedding size from
    another encoder used them as if comparable."""
    import asyncio

    from router.serving.bundle_store import BundleStore
    from router.serving.metrics import Metrics

    current = tmp_path / "current"
    current.symlink_to(_variant(small_bundle, tmp_path / "v1", "v1"))
    store = BundleStore(current, Metrics(), provider="cpu", threads=1)
    store.load_initial()
    assert store.active.engine.online is store.online

    def swap(target: Path) -> bool:
        current.unlink()
        current.symlink_to(target)
        return asyncio.run(store.reload_if_changed())

    other = _variant(small_bundle, tmp_path / "v2", "v2")
    edit_manifest(other, lambda m: m["embedder"].update(base_model="BAAI/bge-small-en-v1.5"))
    assert swap(other) and store.active.engine.version == "v2"
    assert store.active.engine.online is None
    assert swap(_variant(small_bundle, tmp_path / "v3", "v3")) and store.active.engine.online is store.online
