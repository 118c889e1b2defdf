"""The real server on loopback, called through the generated client."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from router.v1 import router_pb2
from tests.helpers import router_stub

PROMPT = "A ball is thrown upward at 12 m/s. How long until it returns to the thrower's hand?"


@pytest.fixture(scope="module")
def stub(server):
    with router_stub(server.address) as s:
        yield s


def test_route_returns_a_candidate_with_estimates_for_every_model(stub) -> None:
    models = [m.model for m in stub.ListModels(router_pb2.ListModelsRequest()).models]
    response = stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10)
    assert response.model in models
    assert [e.model for e in response.estimates] == models
    for e in response.estimates:
        assert 0.0 <= e.quality <= 1.0
        assert e.cost_usd > 0.0
    assert response.bundle_version.startswith("mmlu_pro-")
    assert response.reason
    assert response.input_tokens > 10


def test_cost_weight_moves_the_choice_from_quality_to_cost(stub) -> None:
    quality_first = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0), timeout=10)
    cost_first = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, cost_weight=1.0), timeout=10)
    best = max(quality_first.estimates, key=lambda e: e.quality)
    cheapest = min(cost_first.estimates, key=lambda e: e.cost_usd)
    assert quality_first.model == best.model
    assert cost_first.model == cheapest.model
    assert quality_first.cost_weight == 0.0 and cost_first.cost_weight == 1.0


def test_allowed_models_and_ceiling_are_honoured(stub) -> None:
    allowed = ["Yi-6B", "gemma-7b", "Meta-Llama-3_1-70B-Instruct"]
    response = stub.Route(
        router_pb2.RouteRequest(prompt=PROMPT, cost_weight=0.0, allowed_models=allowed), timeout=10
    )
    assert response.model in allowed
    assert {e.model for e in response.estimates if e.eligible} <= set(allowed)
    broke = stub.Route(
        router_pb2.RouteRequest(prompt=PROMPT, allowed_models=allowed, max_cost_usd=0.0), timeout=10
    )
    cheapest = min((e for e in broke.estimates if e.model in allowed), key=lambda e: e.cost_usd)
    assert broke.model == cheapest.model
    assert "cheapest allowed" in broke.reason


def test_presets_are_listed_and_accepted(stub) -> None:
    info = stub.Info(router_pb2.InfoRequest())
    presets = {p.name: p.cost_weight for p in info.presets}
    assert {"quality", "cost-10", "cost-30", "cost-50"} <= set(presets)
    response = stub.Route(router_pb2.RouteRequest(prompt=PROMPT, preset="cost-10"), timeout=10)
    assert response.cost_weight == pytest.approx(presets["cost-10"])
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.embedding_dim == 384


def test_list_models_reports_prices(stub) -> None:
    response = stub.ListModels(router_pb2.ListModelsRequest())
    assert len(response.models) == 29
    gemini = next(m for m in response.models if m.model == "gemini-1.5-pro-002")
    assert gemini.input_usd_per_mtok > 0 and gemini.output_usd_per_mtok > 0


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "  \n\t "}, "prompt"),
        ({"prompt": "\x00\x00\u200b"}, "prompt"),
        ({"prompt": PROMPT, "cost_weight": 1.5}, "cost_weight"),
        ({"prompt": PROMPT, "cost_weight": -0.1}, "cost_weight"),
        ({"prompt": PROMPT, "cost_weight": float("nan")}, "cost_weight"),
        ({"prompt": PROMPT, "cost_weight": float("inf")}, "cost_weight"),
        ({"prompt": PROMPT, "allowed_models": ["gpt-99"]}, "allowed_models"),
        ({"prompt": PROMPT, "allowed_models": ["Yi-6B", "Yi-6B"]}, "allowed_models"),
        ({"prompt": PROMPT, "max_cost_usd": -1.0}, "max_cost_usd"),
        ({"prompt": PROMPT, "max_cost_usd": float("nan")}, "max_cost_usd"),
        ({"prompt": PROMPT, "preset": "cheapest-please"}, "preset"),
        ({"prompt": PROMPT, "preset": "cost-10", "cost_weight": 0.5}, "preset"),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(stub, request_fields: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Route(router_pb2.RouteRequest(**request_fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")


def test_a_request_that_is_not_valid_protobuf_gets_invalid_argument(server, stub) -> None:
    """A prompt that is not UTF-8 cannot be parsed: gRPC alone would answer UNKNOWN."""
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(
            "/router.v1.Router/Route",
            request_serializer=lambda b: b,
            response_deserializer=router_pb2.RouteResponse.FromString,
        )
        for body in (b"\x0a\x03\xed\xa0\x80", b"\x0a\x02\xff\xfe"):  # a lone surrogate; not UTF-8
            with pytest.raises(grpc.RpcError) as err:
                raw(body, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("request: is not a valid message")
        # and the server goes on answering
    assert stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10).model


def test_health_reports_serving(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "router.v1.Router"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_api(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"router.v1.Router", "grpc.health.v1.Health"} <= services
        proto = db.FindFileContainingSymbol("router.v1.Router")
        assert proto.package == "router.v1"
        methods = {m.name for m in proto.service[0].method}
        assert {"Route", "ListModels", "Info"} <= methods


def test_metrics_count_calls_by_code(server, stub) -> None:
    import urllib.request

    with pytest.raises(grpc.RpcError):
        stub.Route(router_pb2.RouteRequest(prompt=""), timeout=10)
    stub.Route(router_pb2.RouteRequest(prompt=PROMPT), timeout=10)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert 'router_requests_total{code="INVALID_ARGUMENT",method="/router.v1.Router/Route"}' in text
    assert 'router_requests_total{code="OK",method="/router.v1.Router/Route"}' in text
    for stage in ("queue", "embed", "heads", "policy"):
        assert f'router_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert "router_bundle_info{" in text and "router_predicted_spend_usd_total{" in text
    assert PROMPT not in text
