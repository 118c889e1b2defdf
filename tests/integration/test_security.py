"""Access control: TLS, mutual TLS and the bearer token, each with its failing cases."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from router.serving.client import channel
from router.v1 import router_pb2, router_pb2_grpc
from tests.helpers import certificate, running_server, write_pem

PROMPT = "How many moons does Mars have?"
TOKEN = "s3cret-token-value-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA with a server and a client certificate, and a rogue CA with its own client."""
    root = tmp_path_factory.mktemp("pki")
    ca = certificate("test-ca", ca=True)
    rogue = certificate("rogue-ca", ca=True)
    pairs = {
        "ca": ca,
        "server": certificate("localhost", ca, ca=False),
        "client": certificate("client", ca, ca=False),
        "rogue_ca": rogue,
        "rogue_client": certificate("client", rogue, ca=False),
    }
    paths: dict[str, Path] = {}
    for stem, (cert, key) in pairs.items():
        paths[f"{stem}.crt"], paths[f"{stem}.key"] = write_pem(cert, key, root, stem)
    return paths


def _route(chan: grpc.Channel) -> grpc.StatusCode:
    try:
        router_pb2_grpc.RouterStub(chan).Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_tls(small_bundle: Path, pki: dict[str, Path]) -> None:
    with running_server(bundle=small_bundle, tls_cert=pki["server.crt"], tls_key=pki["server.key"]) as srv:
        address = f"localhost:{srv.server.port}"
        with channel(address, ca=pki["ca.crt"]) as good:
            assert _route(good) == grpc.StatusCode.OK
        with channel(address, ca=pki["rogue_ca.crt"]) as wrong_ca:
            assert _route(wrong_ca) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(address) as plain:
            assert _route(plain) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(small_bundle: Path, pki: dict[str, Path]) -> None:
    settings = {"tls_cert": pki["server.crt"], "tls_key": pki["server.key"], "tls_client_ca": pki["ca.crt"]}
    with running_server(bundle=small_bundle, **settings) as srv:
        address = f"localhost:{srv.server.port}"
        with channel(address, ca=pki["ca.crt"], cert=pki["client.crt"], key=pki["client.key"]) as good:
            assert _route(good) == grpc.StatusCode.OK
        with channel(address, ca=pki["ca.crt"]) as no_client_cert:
            assert _route(no_client_cert) == grpc.StatusCode.UNAVAILABLE
        with channel(
            address, ca=pki["ca.crt"], cert=pki["rogue_client.crt"], key=pki["rogue_client.key"]
        ) as rogue:
            assert _route(rogue) == grpc.StatusCode.UNAVAILABLE


def test_bearer_token(small_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    caplog.set_level(logging.DEBUG)
    with running_server(bundle=small_bundle, auth_token_file=token_file) as srv:
        with grpc.insecure_channel(srv.address) as none:
            with pytest.raises(grpc.RpcError) as err:
                router_pb2_grpc.RouterStub(none).Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == "missing bearer token"
            # health stays reachable for probes; reflection does not (configurable)
            health = health_pb2_grpc.HealthStub(none).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(Exception, match=r"UNAUTHENTICATED|missing bearer token"):
                ProtoReflectionDescriptorDatabase(none).get_services()
        with channel(srv.address, token=TOKEN[:-1] + "x") as wrong:
            assert _route(wrong) == grpc.StatusCode.UNAUTHENTICATED
        with channel(srv.address, token=TOKEN) as right:
            assert _route(right) == grpc.StatusCode.OK
            stub = router_pb2_grpc.RouterStub(right)
            assert len(stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).models) == 29
    assert TOKEN not in caplog.text


def test_token_from_environment_and_exemptions(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_AUTH_TOKEN", TOKEN)
    with running_server(bundle=small_bundle, auth_exempt_health=False, auth_exempt_reflection=True) as srv:
        with grpc.insecure_channel(srv.address) as none:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(none).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "router.v1.Router" in ProtoReflectionDescriptorDatabase(none).get_services()
        with channel(srv.address, token=TOKEN) as right:
            assert _route(right) == grpc.StatusCode.OK
