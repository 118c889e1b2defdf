"""gRPC health probe for the container HEALTHCHECK: exit 0 when the router answers SERVING, else 1.

Docker has no native gRPC health check, and grpc_health_probe is a binary that no package registry
ships, so the image uses this instead. It needs only what the serving image already has (grpcio and
grpcio-health-checking), and reads the same ROUTER_* variables as `router serve`, so one set of
environment variables configures both.

Plaintext unless ROUTER_TLS_CERT is set; then the server certificate is verified against
ROUTER_HEALTH_CA (default: ROUTER_TLS_CERT itself, right for a self-signed certificate) under the
name ROUTER_HEALTH_TLS_NAME (default: localhost). With mutual TLS (ROUTER_TLS_CLIENT_CA) the probe
presents ROUTER_HEALTH_CLIENT_CERT / ROUTER_HEALTH_CLIENT_KEY. A bearer token is not needed: the
server lets health checks through without one unless ROUTER_AUTH_EXEMPT_HEALTH=false.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def _credentials(env: dict[str, str]) -> tuple[grpc.ChannelCredentials, str] | None:
    cert = env.get("ROUTER_TLS_CERT")
    if not cert:
        return None
    ca = Path(env.get("ROUTER_HEALTH_CA") or cert).read_bytes()
    client_cert = env.get("ROUTER_HEALTH_CLIENT_CERT")
    client_key = env.get("ROUTER_HEALTH_CLIENT_KEY")
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )
    return creds, env.get("ROUTER_HEALTH_TLS_NAME", "localhost")


def check(address: str, service: str, timeout_s: float, env: dict[str, str]) -> str:
    """The status name the server reports for `service`; raises grpc.RpcError when it cannot say."""
    tls = _credentials(env)
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        creds, name = tls
        channel = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)])
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    env = dict(os.environ)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=f"127.0.0.1:{env.get('ROUTER_PORT', '50051')}",
        help="host:port of the gRPC server (default: 127.0.0.1:$ROUTER_PORT, else :50051)",
    )
    # The service's own name, not "": it is the one that means "bundle loaded and warm".
    parser.add_argument("--service", default="router.v1.Router", help='health service name ("" = server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout, env)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except OSError as exc:  # an unreadable certificate file
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
