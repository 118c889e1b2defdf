"""The training stack's `router` commands: train, convert, predict, eval, bench.

Registered through the `router.commands` entry point. Loading this module fails with ImportError
where the `train` extra is not installed, and `router` then simply does not list these commands.
Everything heavy is imported inside the command that needs it, so that `router --help` and
`router serve` stay fast where the extra is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from training.errors import FleetError, OutputError, TableError
from training.outputs import BUNDLE_MARKER, TABLE_MARKER, check_dir, check_file, make_parent, writable_dir

# What these commands import; checked up front, without importing it (torch alone takes seconds).
REQUIRED = ("torch", "transformers", "lightgbm", "onnx", "onnxmltools", "pandas", "pyarrow", "matplotlib")
_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"the train extra is not installed (missing: {', '.join(_missing)})")


def count(text: str) -> int:
    """A count argument: 0 or less would silently mean 'no limit' or nothing at all."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from training.pipeline import TrainConfig, train_bundle

    config = TrainConfig(
        precision=args.precision, seed=args.seed, max_prompts=args.max_prompts, feedback=args.feedback
    )
    check_dir(Path(args.out), BUNDLE_MARKER, inputs=[Path(args.data)])  # before minutes of training
    manifest = train_bundle(Path(args.data), Path(args.out), config)
    figures = manifest.training.validation_metrics
    print(f"bundle {manifest.bundle_version} written to {args.out}")
    print(f"validation: AIQ {figures.aiq:.4f}, gap closed {figures.gap_closed:.3f}")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in manifest.training.durations_s.items()))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from training.adapters import load_lm_eval, load_routerbench, load_sprout, write_canonical

    name = args.name or Path(args.out).name
    if args.metric and args.format != "lm-eval":
        raise TableError("--metric applies to --format lm-eval only")
    if args.format == "sprout":
        table = load_sprout(args.source, Path(args.prices), name=name)
    elif args.format == "routerbench":
        table = load_routerbench(Path(args.source), Path(args.prices), name=name)
    else:
        table = load_lm_eval(Path(args.source), Path(args.prices), name=name, metric=args.metric)
    write_canonical(table, check_dir(Path(args.out), TABLE_MARKER, inputs=[Path(args.source)]))
    print(
        f"wrote {len(table.prompts)} prompts, {len(table.outcomes)} outcomes, "
        f"{len(table.models)} models to {args.out}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from training.predict import predict_to_parquet

    out = check_file(Path(args.out), inputs=[Path(args.bundle), Path(args.data)])
    n = predict_to_parquet(Path(args.bundle), Path(args.data), args.split, make_parent(out))
    print(f"wrote {n} predictions to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.report import evaluate_bundle

    report = writable_dir(Path(args.report))
    figures = evaluate_bundle(Path(args.bundle), Path(args.data), args.split, report)
    r, k = figures["router"], figures["knn"]
    print(
        f"{figures['table']} ({args.split}, {r['prompts']} prompts): gap closed {r['gap_closed']:.3f} "
        f"(kNN {k['gap_closed']:.3f}), AIQ {r['aiq']:.4f} (kNN {k['aiq']:.4f}, zero {r['aiq_zero']:.4f}, "
        f"oracle {r['aiq_oracle']:.4f})"
    )
    print(f"report: {Path(args.report) / 'report.md'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from training.bench import format_report, run_bench, write_json

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


def _anchors(args: argparse.Namespace) -> int:
    from training.fleet import choose_anchors

    out = check_file(Path(args.out), inputs=[Path(args.bundle), Path(args.data)])
    anchors = choose_anchors(Path(args.bundle), Path(args.data), args.n, seed=args.seed)
    anchors.to_parquet(make_parent(out), index=False)
    print(f"wrote {len(anchors)} anchor prompts to {out}")
    return 0


def _new_version(args: argparse.Namespace) -> None:
    """A fleet change writes a new version beside its bundle, never over it: a server watching
    the old one keeps it until the hot swap points elsewhere."""
    inputs = [Path(p) for p in (args.bundle, *(getattr(args, k, None) for k in FLEET_INPUTS)) if p]
    check_dir(Path(args.out), BUNDLE_MARKER, inputs=inputs)


# the files a fleet command reads besides its bundle: never inside the bundle it replaces
FLEET_INPUTS = ("prompts", "outcomes", "prices")


def _changed(manifest: Any, out: str) -> int:
    change = manifest.changes[-1]
    print(f"bundle {manifest.bundle_version} written to {out} ({change.op} {', '.join(change.models)})")
    presets = ", ".join(f"{k} w={v.cost_weight:g}" for k, v in sorted(manifest.policy.presets.items()))
    print(f"c_ref {manifest.policy.c_ref_usd:.3g} USD; presets {presets}")
    return 0


def _add_model(args: argparse.Namespace) -> int:
    from training.fleet import add_model, read_scored

    _new_version(args)
    scored = read_scored(Path(args.prompts), Path(args.outcomes), args.model)
    manifest = add_model(
        Path(args.bundle),
        Path(args.out),
        args.model,
        scored,
        args.input_usd_per_mtok,
        args.output_usd_per_mtok,
        ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms,
    )
    if not manifest.models[-1].output_tokens_known:
        print(
            f"note: too few of {args.model}'s outcomes record output_tokens to estimate its output"
            " length: its predicted cost is input tokens only, a lower bound",
            file=sys.stderr,
        )
    return _changed(manifest, args.out)


def _remove_model(args: argparse.Namespace) -> int:
    from training.fleet import remove_model

    _new_version(args)
    return _changed(remove_model(Path(args.bundle), Path(args.out), args.model), args.out)


def _reprice(args: argparse.Namespace) -> int:
    from training.fleet import reprice

    _new_version(args)
    return _changed(reprice(Path(args.bundle), Path(args.out), Path(args.prices)), args.out)


def _feedback_export(args: argparse.Namespace) -> int:
    from training.feedback_data import export_feedback

    prompts, outcomes = export_feedback(args.store, Path(args.out))
    print(f"wrote {prompts} prompts and {outcomes} outcomes from {args.store} to {args.out}")
    return 0


def register(sub: Any) -> tuple[type[Exception], ...]:
    """Adds the training commands to the `router` parser; returns the user-error types."""
    p = sub.add_parser("train", help="train a bundle on the train split of a routing table")
    p.add_argument("--data", required=True, help="routing table directory (canonical layout)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--precision", default="int8", choices=["int8", "fp32"], help="embedder precision")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the validation carving (and of --max-prompts sampling)"
    )
    p.add_argument("--max-prompts", type=count, default=None, help="train on a sample of this many prompts")
    p.add_argument(
        "--feedback", default=None, help="a feedback store URL whose outcomes join the training rows"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "convert", help="convert SPROUT, RouterBench or lm-evaluation-harness data to the canonical layout"
    )
    p.add_argument("--format", required=True, choices=["sprout", "routerbench", "lm-eval"])
    p.add_argument(
        "--source",
        required=True,
        help="SPROUT: folder of parquet files, save_to_disk directory or hub id; RouterBench: .pkl or "
        ".csv; lm-eval: the --output_path directory, one folder per model",
    )
    p.add_argument(
        "--metric", default=None, help="lm-eval: the per-sample metric to score by (default: the task's own)"
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

    p = sub.add_parser("feedback", help="logged decisions and outcomes (router serve --feedback-store)")
    feedback_sub = p.add_subparsers(dest="feedback_command", required=True)
    q = feedback_sub.add_parser("export", help="write the logged outcomes as a canonical routing table")
    q.add_argument("--store", required=True, help="sqlite:///PATH or postgresql://...")
    q.add_argument("--out", required=True, help="directory of the table")
    q.set_defaults(func=_feedback_export)

    p = sub.add_parser("anchors", help="choose the prompts a new model should be scored on (add-model)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="routing table whose train split the anchors come from")
    p.add_argument("--n", type=int, required=True, help="how many anchors (200 is a good default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="parquet file with prompt_id, prompt")
    p.set_defaults(func=_anchors)

    p = sub.add_parser("add-model", help="a new bundle version with a model added from its scored anchors")
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", required=True, help="the new model's name")
    p.add_argument("--prompts", required=True, help="parquet: prompt_id, prompt (e.g. from `router anchors`)")
    p.add_argument(
        "--outcomes", required=True, help="parquet: prompt_id, model, score [, output_tokens] of the model"
    )
    p.add_argument("--input-usd-per-mtok", type=float, default=None, help="list price, USD per million")
    p.add_argument("--output-usd-per-mtok", type=float, default=None, help="list price, USD per million")
    p.add_argument("--ttft-ms", type=float, default=None, help="time to first token, ms (latency ceilings)")
    p.add_argument("--tpot-ms", type=float, default=None, help="time per output token, ms")
    p.add_argument("--out", required=True, help="directory of the new bundle version")
    p.set_defaults(func=_add_model)

    p = sub.add_parser("remove-model", help="a new bundle version without a model")
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_remove_model)

    p = sub.add_parser("reprice", help="a new bundle version with new list prices or latencies")
    p.add_argument("--bundle", required=True)
    p.add_argument(
        "--prices",
        required=True,
        help="CSV: model and any of input_usd_per_mtok, output_usd_per_mtok, ttft_ms, tpot_ms",
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=_reprice)
    return (TableError, FleetError, OutputError)
