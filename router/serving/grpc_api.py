"""The gRPC servicer: protobuf in, domain call, protobuf out. Nothing else lives here."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import grpc

from router import __version__
from router.serving.feedback import FeedbackQuery
from router.serving.requests import RouteQuery, RouteResult
from router.serving.service import RouterService
from router.v1 import router_pb2, router_pb2_grpc


def to_query(request: router_pb2.RouteRequest) -> RouteQuery:
    return RouteQuery(
        prompt=request.prompt,
        cost_weight=request.cost_weight if request.HasField("cost_weight") else None,
        allowed_models=tuple(request.allowed_models),
        max_cost_usd=request.max_cost_usd if request.HasField("max_cost_usd") else None,
        preset=request.preset,
        tenant=request.tenant,
        max_latency_ms=request.max_latency_ms if request.HasField("max_latency_ms") else None,
    )


def to_response(result: RouteResult) -> router_pb2.RouteResponse:
    d = result.decision
    return router_pb2.RouteResponse(
        model=d.model,
        estimates=[
            router_pb2.ModelEstimate(
                model=s.estimate.model,
                quality=s.estimate.quality,
                cost_usd=s.estimate.cost_usd,
                utility=s.utility,
                eligible=s.eligible,
                latency_ms=s.estimate.latency_ms,
            )
            for s in d.scored
        ],
        bundle_version=result.bundle_version,
        reason=d.reason,
        cost_weight=d.cost_weight,
        input_tokens=result.input_tokens,
        decision_id=result.decision_id,
    )


def to_feedback(request: router_pb2.FeedbackRequest) -> FeedbackQuery:
    def optional(name: str) -> Any:
        return getattr(request, name) if request.HasField(name) else None

    return FeedbackQuery(
        decision_id=request.decision_id,
        model=request.model,
        score=optional("score"),
        input_tokens=optional("input_tokens"),
        output_tokens=optional("output_tokens"),
        cost_usd=optional("cost_usd"),
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, service: RouterService) -> None:
        self._service = service

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        result = await self._service.route(to_query(request), timeout_s=context.time_remaining())
        return to_response(result)

    async def Feedback(
        self, request: router_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.FeedbackResponse:
        recorded, message = await self._service.report(to_feedback(request))
        return router_pb2.FeedbackResponse(recorded=recorded, message=message)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        version, models = self._service.models()
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelInfo(
                    model=m.name,
                    input_usd_per_mtok=m.input_usd_per_mtok,
                    output_usd_per_mtok=m.output_usd_per_mtok,
                    ttft_ms=m.ttft_ms,
                    tpot_ms=m.tpot_ms,
                )
                for m in models
            ],
            bundle_version=version,
        )

    async def Info(
        self, request: router_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InfoResponse:
        info = self._service.info()
        return router_pb2.InfoResponse(
            bundle_version=info.bundle_version,
            bundle_created_at=info.bundle_created_at,
            embedder_sha256=info.embedder_sha256,
            embedding_dim=info.embedding_dim,
            default_cost_weight=info.default_cost_weight,
            c_ref_usd=info.c_ref_usd,
            presets=[
                router_pb2.Preset(name=name, cost_weight=p.cost_weight, description=p.description)
                for name, p in sorted(info.presets.items())
            ],
            execution_provider=info.execution_provider,
            server_version=__version__,
            max_prompt_chars=info.limits.max_prompt_chars,
            max_batch_size=info.limits.max_batch_size,
            max_in_flight=info.limits.max_in_flight,
            bundle_loaded_at=datetime.fromtimestamp(info.bundle_loaded_at, tz=timezone.utc).isoformat(
                timespec="seconds"
            ),
        )
