"""The `router` command: serve, route, and (with the `train` extra) train, predict, eval, bench.

Training-side subcommands import the training stack lazily, so `router serve` and `router route`
need only the serving dependencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeSettings field (the same names as the ROUTER_* variables)."""
    from router.config import ServeSettings

    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=field.description)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from router.bundle import BundleError
    from router.config import ServeSettings
    from router.server import serve

    overrides = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"setting {'.'.join(map(str, first['loc'])) or ''}: {first['msg']}") from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    if not settings.bundle.exists():
        raise CliError(f"bundle {settings.bundle} does not exist (train one with `router train`)")
    try:
        asyncio.run(serve(settings))
    except BundleError as exc:
        raise CliError(f"bundle {settings.bundle} refused: {exc}") from exc
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
    from router.bundle import BundleError
    from router.errors import InvalidRequest
    from router.estimator import open_bundle
    from router.policy import Estimate, decide
    from router.service import Limits, RouteQuery, validate

    try:
        estimator = open_bundle(Path(args.bundle), provider="cpu")
    except BundleError as exc:
        raise CliError(f"bundle {args.bundle} refused: {exc}") from exc
    query = RouteQuery(
        args.prompt, args.cost_weight, tuple(args.allowed_models or ()), args.max_cost_usd, args.preset
    )
    limits = Limits(10**9, 10**6, 1, 1, 0.0)
    try:
        prefs = validate(query, estimator, limits)
    except InvalidRequest as exc:
        raise CliError(str(exc)) from exc
    est = estimator.estimate_texts([args.prompt])
    estimates = [
        Estimate(m, float(est.quality[0, j]), float(est.cost_usd[0, j])) for j, m in enumerate(est.models)
    ]
    d = decide(estimates, prefs, estimator.bundle.manifest.policy.c_ref_usd)
    return {
        "model": d.model,
        "reason": d.reason,
        "cost_weight": d.cost_weight,
        "bundle_version": estimator.bundle.version,
        "input_tokens": int(est.input_tokens[0]),
        "estimates": [
            {
                "model": s.estimate.model,
                "quality": s.estimate.quality,
                "cost_usd": s.estimate.cost_usd,
                "utility": s.utility,
                "eligible": s.eligible,
            }
            for s in d.scored
        ],
    }


def _route_remote(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from router.client import connect
    from router.v1 import router_pb2

    request = router_pb2.RouteRequest(prompt=args.prompt, allowed_models=args.allowed_models or [])
    if args.cost_weight is not None:
        request.cost_weight = args.cost_weight
    if args.max_cost_usd is not None:
        request.max_cost_usd = args.max_cost_usd
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


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import TrainConfig, train_bundle

    config = TrainConfig(precision=args.precision, seed=args.seed, max_prompts=args.max_prompts)
    manifest = train_bundle(Path(args.data), Path(args.out), config)
    metrics = manifest.training["validation_metrics"]
    print(f"bundle {manifest.bundle_version} written to {args.out}")
    print(f"validation: AIQ {metrics['aiq']:.4f}, gap closed {metrics['gap_closed']:.3f}")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in manifest.training["durations_s"].items()))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from training.adapters import load_routerbench, load_sprout, write_canonical

    name = args.name or Path(args.out).name
    if args.format == "sprout":
        table = load_sprout(args.source, Path(args.prices), name=name)
    else:
        table = load_routerbench(Path(args.source), Path(args.prices), name=name)
    write_canonical(table, Path(args.out))
    print(
        f"wrote {len(table.prompts)} prompts, {len(table.outcomes)} outcomes, "
        f"{len(table.models)} models to {args.out}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from training.predict import predict_to_parquet

    n = predict_to_parquet(Path(args.bundle), Path(args.data), args.split, Path(args.out))
    print(f"wrote {n} predictions to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.report import evaluate_bundle

    figures = evaluate_bundle(Path(args.bundle), Path(args.data), args.split, Path(args.report))
    r, k = figures["router"], figures["knn"]
    print(
        f"{figures['table']} ({args.split}, {r['prompts']} prompts): gap closed {r['gap_closed']:.3f} "
        f"(kNN {k['gap_closed']:.3f}), AIQ {r['aiq']:.4f} (kNN {k['aiq']:.4f}, zero {r['aiq_zero']:.4f}, "
        f"oracle {r['aiq_oracle']:.4f})"
    )
    print(f"report: {Path(args.report) / 'report.md'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from router.bench import format_report, run_bench, write_json

    result = run_bench(
        args.server,
        args.metrics_url,
        Path(args.bundle),
        Path(args.data),
        n_prompts=args.prompts,
        concurrency=tuple(args.concurrency),
        calls_per_level=args.calls,
        threads=args.threads,
        soak=args.soak,
    )
    print(format_report(result))
    if args.json:
        write_json(result, Path(args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--bundle", default=None, help="route in-process from this bundle instead of a server")
    p.add_argument("--server", default="localhost:50051", help="server address (default localhost:50051)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")
    p.add_argument("--token-file", default=None, help="file holding the bearer token")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify the server: enables TLS")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", default=None, help="client key (PEM), for mutual TLS")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=_route)

    p = sub.add_parser("train", help="train a bundle on the train split of a routing table")
    p.add_argument("--data", required=True, help="routing table directory (canonical layout)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--precision", default="int8", choices=["int8", "fp32"], help="embedder precision")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the validation carving (and of --max-prompts sampling)"
    )
    p.add_argument("--max-prompts", type=int, default=None, help="train on a sample of this many prompts")
    p.set_defaults(func=_train)

    p = sub.add_parser("convert", help="convert SPROUT or RouterBench data to the canonical table layout")
    p.add_argument("--format", required=True, choices=["sprout", "routerbench"])
    p.add_argument(
        "--source", required=True, help="SPROUT: hub id or local dataset path; RouterBench: .pkl or .csv"
    )
    p.add_argument("--prices", required=True, help="CSV: model,input_usd_per_mtok,output_usd_per_mtok")
    p.add_argument("--out", required=True, help="directory to write the canonical table into")
    p.add_argument("--name", default=None, help="table name (default: the output directory's name)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("predict", help="write a bundle's estimates for every (prompt, model) of a split")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--out", required=True, help="parquet file")
    p.set_defaults(func=_predict)

    p = sub.add_parser("eval", help="evaluate a bundle against the kNN reference, zero router and oracle")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--report", required=True, help="output directory for metrics.json, curve.png, report.md")
    p.set_defaults(func=_eval)

    p = sub.add_parser("bench", help="benchmark a running server against the raw embedder (prints figures)")
    p.add_argument("--server", default="localhost:50051")
    p.add_argument("--metrics-url", default="http://localhost:9090/metrics", help="the server's /metrics")
    p.add_argument(
        "--bundle", required=True, help="the bundle the server serves (its embedder is timed alone)"
    )
    p.add_argument("--data", required=True, help="routing table whose test prompts are sent")
    p.add_argument("--prompts", type=int, default=256, help="distinct prompts used")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--calls", type=int, default=512, help="calls per concurrency level")
    p.add_argument("--threads", type=int, default=0, help="embedder threads, as the server's --threads")
    p.add_argument("--soak", type=int, default=0, help="then this many calls at c=32, reporting RSS growth")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"router: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from router.bundle import BundleError

        known: tuple[type[BaseException], ...] = (BundleError, FileNotFoundError)
        try:
            from training.tables import TableError

            known += (TableError,)
        except ImportError:
            pass
        if isinstance(exc, known):
            print(f"router: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
