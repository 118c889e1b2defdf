"""The `router` command. Serving commands (serve, route) always; more from installed command groups.

A command group is an entry point in the `router.commands` group: a function that adds its
subcommands to the parser and returns the exception types that are user errors. The training
stack registers train, convert, predict, eval and bench that way; where it is not installed (the
`cpu` / `gpu` serving install, the container image) its group does not load and its commands are
not listed, rather than failing with a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from router.core.errors import BundleError, InvalidRequest
from router.core.features import BLANK, blank

EXIT_USAGE = 2
COMMAND_GROUP = "router.commands"

log = logging.getLogger(__name__)

Register = Callable[[Any], tuple[type[Exception], ...]]


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeSettings field (the same names as the ROUTER_* variables)."""
    from router.serving.config import ServeSettings

    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=field.description)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from router.core.feedback_store import StoreError
    from router.serving.budgets import BudgetsError
    from router.serving.config import ServeSettings
    from router.serving.server import serve
    from router.serving.spend_store import SpendStoreError

    overrides = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    try:
        settings = ServeSettings(**overrides)
        settings.token()  # an empty or unreadable token is refused before anything starts
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"setting {'.'.join(map(str, first['loc'])) or ''}: {first['msg']}") from exc
    except (ValueError, OSError) as exc:
        raise CliError(f"auth token: {exc}") from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    if "auth_token" in overrides:
        log.warning(
            "--auth-token puts the token in the process list (ps, /proc); "
            "give it with ROUTER_AUTH_TOKEN or --auth-token-file instead"
        )
    if not settings.bundle.exists():
        raise CliError(f"bundle {settings.bundle} does not exist (train one with `router train`)")
    try:
        asyncio.run(serve(settings))
    except BundleError as exc:
        raise CliError(f"bundle {settings.bundle} refused: {exc}") from exc
    except BudgetsError as exc:
        raise CliError(f"budgets refused: {exc}") from exc
    except StoreError as exc:
        raise CliError(f"feedback store refused: {exc}") from exc
    except SpendStoreError as exc:
        raise CliError(f"spend store refused: {exc}") from exc
    except OSError as exc:
        raise CliError(str(exc)) from exc
    return 0


def _route(args: argparse.Namespace) -> int:
    result = _route_local(args) if args.bundle else _route_remote(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model:          {result['model']}")
    print(f"reason:         {result['reason']}")
    print(f"cost_weight:    {result['cost_weight']:g}")
    print(f"bundle_version: {result['bundle_version']}")
    print(f"{'':2}{'model':<36} {'quality':>8} {'cost_usd':>11} {'utility':>9}")
    for e in sorted(result["estimates"], key=lambda e: -e["utility"]):
        mark = "*" if e["model"] == result["model"] else " " if e["eligible"] else "x"
        print(f"{mark:2}{e['model']:<36} {e['quality']:8.3f} {e['cost_usd']:11.3g} {e['utility']:9.4f}")
    return 0


def _route_local(args: argparse.Namespace) -> dict[str, Any]:
    """The engine in this process: the same path the server's batch worker runs."""
    from router.core.engine import open_engine

    if args.tenant:
        raise CliError("--tenant needs --server: budgets are held by the server")
    try:
        _, engine = open_engine(Path(args.bundle), provider="cpu")
    except BundleError as exc:
        raise CliError(f"bundle {args.bundle} refused: {exc}") from exc
    if blank(args.prompt):
        raise CliError(f"prompt: {BLANK}")
    try:
        prefs = engine.preferences(
            cost_weight=args.cost_weight,
            preset=args.preset,
            allowed_models=tuple(args.allowed_models or ()),
            max_cost_usd=args.max_cost_usd,
            max_latency_ms=args.max_latency_ms,
        )
    except InvalidRequest as exc:
        raise CliError(str(exc)) from exc
    routed = engine.route([args.prompt], [prefs])
    d = routed.decisions[0]
    return {
        "model": d.model,
        "reason": d.reason,
        "cost_weight": d.cost_weight,
        "bundle_version": engine.version,
        "input_tokens": int(routed.estimates.input_tokens[0]),
        "estimates": [
            {
                "model": s.estimate.model,
                "quality": s.estimate.quality,
                "cost_usd": s.estimate.cost_usd,
                "utility": s.utility,
                "eligible": s.eligible,
                **({} if s.estimate.latency_ms is None else {"latency_ms": s.estimate.latency_ms}),
            }
            for s in d.scored
        ],
    }


def _route_remote(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from router.serving.client import connect
    from router.v1 import router_pb2

    request = router_pb2.RouteRequest(prompt=args.prompt, allowed_models=args.allowed_models or [])
    if args.cost_weight is not None:
        request.cost_weight = args.cost_weight
    if args.max_cost_usd is not None:
        request.max_cost_usd = args.max_cost_usd
    if args.max_latency_ms is not None:
        request.max_latency_ms = args.max_latency_ms
    if args.tenant:
        request.tenant = args.tenant
    if args.preset:
        request.preset = args.preset
    try:
        with connect(
            args.server, token_file=args.token_file, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key
        ) as stub:
            response = stub.Route(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise CliError(f"{args.server}: {exc.code().name}: {exc.details()}") from exc  # type: ignore[attr-defined]
    out = MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for e in out["estimates"]:
        e.setdefault("eligible", False)
    return out


def _serving_commands(sub: Any) -> tuple[type[Exception], ...]:
    p = sub.add_parser("serve", help="serve a bundle over gRPC, with Prometheus metrics")
    _settings_flags(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("route", help="route one prompt, through a running server or straight from a bundle")
    p.add_argument("prompt")
    p.add_argument("--cost-weight", type=float, default=None, help="w in [0, 1]; default: the bundle's")
    p.add_argument(
        "--preset", default="", help="a named operating point of the bundle, instead of --cost-weight"
    )
    p.add_argument("--allowed-models", nargs="+", default=None)
    p.add_argument("--max-cost-usd", type=float, default=None)
    p.add_argument("--max-latency-ms", type=float, default=None, help="ceiling on the predicted latency")
    p.add_argument("--tenant", default="", help="the tenant to route for (budgets; server only)")
    p.add_argument("--bundle", default=None, help="route in-process from this bundle instead of a server")
    p.add_argument("--server", default="localhost:50051", help="server address (default localhost:50051)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")
    p.add_argument("--token-file", default=None, help="file holding the bearer token")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify the server: enables TLS")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", default=None, help="client key (PEM), for mutual TLS")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=_route)
    return (CliError, BundleError, FileNotFoundError)


def _installed_groups() -> list[Register]:
    """The command groups whose dependencies are installed."""
    groups = []
    for entry in entry_points(group=COMMAND_GROUP):
        try:
            groups.append(entry.load())
        except ImportError as exc:  # that group's extra is not installed here
            log.debug("command group %s not available: %s", entry.name, exc)
    return groups


def build_parser() -> tuple[argparse.ArgumentParser, tuple[type[Exception], ...]]:
    """The parser, and the exception types that are the user's to fix (one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="router", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    user_errors = _serving_commands(sub)
    for register in _installed_groups():
        user_errors += register(sub)
    return parser, user_errors


def main(argv: list[str] | None = None) -> int:
    parser, user_errors = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except user_errors as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`router route ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
