"""Leave one model out, add it back from anchors: how much of a full retrain `add-model` recovers.

    python -m training.leave_one_out --data ../shared/data/mmlu_pro --out reports/lomo/mmlu_pro

For each held-out model (the three the full bundle chooses most often at the cost-30 preset on the
test prompts, and the model with the best mean training score): train without it, choose N anchors
of `train` with `router anchors`' rule, add the model back from its outcomes there with
`add-model`'s code, and measure on `test`, always among the full model set (oracle and zero router
included; the bundle without the model simply never chooses it):

    recovered share = (AIQ added - AIQ without) / (AIQ full - AIQ without)

averaged over held-out models whose full-retrain gain is at least MIN_GAIN. Writes metrics.json,
report.md and gap.png (gap closed against N) into --out. Every bundle goes through the real
pipeline and is scored through the engine on the same test features.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from router.core.engine import Engine, open_engine
from router.core.features import PromptFeatures
from router.core.policy import choose
from training.errors import TableError
from training.fleet import Scored, add_model, choose_anchors
from training.metrics import evaluate
from training.pipeline import TrainConfig, train_bundle
from training.tables import RoutingTable, complete_rows, load_table

log = logging.getLogger(__name__)

ANCHOR_COUNTS = (50, 100, 200, 400)
MIN_GAIN = 0.002
HELD_OUT_CHOSEN = 3


@dataclass(frozen=True)
class TestSet:
    table: RoutingTable  # the test split
    features: PromptFeatures  # of its complete prompts
    score: np.ndarray  # complete prompts x the table's models
    cost: np.ndarray


def test_set(table: RoutingTable, engine: Engine) -> TestSet:
    test = table.split("test")
    complete = complete_rows(test)
    features = engine.featurize(list(test.prompts["prompt"][complete]))
    return TestSet(test, features, test.matrix("score")[complete], test.matrix("cost_usd")[complete])


def scores_of(engine: Engine, data: TestSet, models: list[str]) -> dict[str, float]:
    """AIQ and gap closed of the engine's decisions among `models` (a model it lacks is never chosen)."""
    est = engine.estimate_features(data.features)
    q = np.full((len(data.score), len(models)), -1e9)
    c = np.zeros_like(q)
    for j, m in enumerate(models):
        if m in est.models:
            k = est.models.index(m)
            q[:, j], c[:, j] = est.quality[:, k], est.cost_usd[:, k]
    figures = evaluate(models, data.score, data.cost, q, c, engine.policy.c_ref_usd).figures
    return {"aiq": figures["aiq"], "gap_closed": figures["gap_closed"]}


def held_out_models(table: RoutingTable, engine: Engine, data: TestSet) -> list[str]:
    est = engine.estimate_features(data.features)
    w = engine.policy.presets["cost-30"].cost_weight
    counts = np.bincount(
        choose(est.quality, est.cost_usd, w, engine.policy.c_ref_usd), minlength=len(est.models)
    )
    chosen = [est.models[j] for j in np.argsort(-counts, kind="stable")[:HELD_OUT_CHOSEN] if counts[j] > 0]
    train = table.split("train")
    strongest = train.models[int(np.nanargmax(np.nanmean(train.matrix("score"), axis=0)))]
    return list(dict.fromkeys([*chosen, strongest]))


def anchor_outcomes(table: RoutingTable, anchors: pd.DataFrame, model: str) -> Scored:
    """The model's recorded outcomes on the anchors (those it has one for), as add-model reads them."""
    rows = table.outcomes[
        (table.outcomes["model"] == model) & table.outcomes["prompt_id"].isin(anchors["prompt_id"])
    ]
    text = dict(zip(anchors["prompt_id"], anchors["prompt"], strict=True))
    return Scored(
        [text[p] for p in rows["prompt_id"]],
        rows["score"].to_numpy(dtype=float),
        rows["output_tokens"].to_numpy(dtype=float, na_value=np.nan),
    )


def run(data_dir: Path, out: Path, counts: tuple[int, ...] = ANCHOR_COUNTS) -> dict:
    table = load_table(data_dir)
    if len(table.models) < 2:
        raise TableError(f"{table.name}: leaving a model out needs two models at least, the table has one")
    out.mkdir(parents=True, exist_ok=True)
    bundles = out / "bundles"
    started = time.perf_counter()
    train_bundle(data_dir, bundles / "full")
    _, full = open_engine(bundles / "full", provider="cpu")
    data = test_set(table, full)
    models = list(table.models)
    result: dict = {"table": table.name, "test_prompts": len(data.score), "anchor_counts": list(counts)}
    result["full"] = scores_of(full, data, models)
    prices = table.prices.set_index("model")
    held = held_out_models(table, full, data)
    result["held_out"] = {}
    for model in held:
        without_dir = bundles / f"without-{model}"
        train_bundle(data_dir, without_dir, TrainConfig(exclude_models=(model,)))
        _, without = open_engine(without_dir, provider="cpu")
        entry: dict = {"without": scores_of(without, data, models), "added": {}}
        for n in counts:
            anchors = choose_anchors(without_dir, data_dir, n)
            scored = anchor_outcomes(table, anchors, model)
            t0 = time.perf_counter()
            add_model(
                without_dir,
                bundles / f"added-{model}-{n}",
                model,
                scored,
                float(prices.loc[model, "input_usd_per_mtok"]),
                float(prices.loc[model, "output_usd_per_mtok"]),
            )
            seconds = time.perf_counter() - t0
            _, added = open_engine(bundles / f"added-{model}-{n}", provider="cpu")
            entry["added"][str(n)] = scores_of(added, data, models) | {
                "scored_anchors": len(scored.texts),
                "add_model_seconds": round(seconds, 2),
            }
        gain = result["full"]["aiq"] - entry["without"]["aiq"]
        entry["full_gain_aiq"] = gain
        for a in entry["added"].values():
            a["recovered_share"] = (a["aiq"] - entry["without"]["aiq"]) / gain if gain else None
            a["aiq_over_without"] = a["aiq"] - entry["without"]["aiq"]
        result["held_out"][model] = entry
        log.info("%s: %s", model, json.dumps(entry))
    counted = [m for m, e in result["held_out"].items() if e["full_gain_aiq"] >= MIN_GAIN]
    result["counted_models"] = counted
    result["mean_recovered_share"] = {
        str(n): (
            float(np.mean([result["held_out"][m]["added"][str(n)]["recovered_share"] for m in counted]))
            if counted
            else None
        )
        for n in counts
    }
    result["worst_aiq_over_without"] = {
        str(n): min(e["added"][str(n)]["aiq_over_without"] for e in result["held_out"].values())
        for n in counts
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report(result), encoding="utf-8")
    plot(result, out / "gap.png")
    return result


def report(r: dict) -> str:
    counts = r["anchor_counts"]
    lines = [
        f"# Leave one model out: {r['table']} ({r['test_prompts']} test prompts)",
        "",
        f"Full retrain: gap closed {r['full']['gap_closed']:.3f} (AIQ {r['full']['aiq']:.4f}).",
        "",
        "| held-out model | without | "
        + " | ".join(f"added, N={n}" for n in counts)
        + " | full gain (AIQ) |",
        "|---|---|" + "---|" * len(counts) + "---|",
    ]
    for model, e in r["held_out"].items():
        cells = [
            f"{e['added'][str(n)]['gap_closed']:.3f} ({_share(e['added'][str(n)]['recovered_share'])})"
            for n in counts
        ]
        lines.append(
            f"| {model} | {e['without']['gap_closed']:.3f} | "
            + " | ".join(cells)
            + f" | {e['full_gain_aiq']:+.4f} |"
        )
    lines += [
        "",
        "Cells: gap closed on test (recovered share). Mean recovered share over models whose full-retrain "
        f"gain is at least {MIN_GAIN} AIQ ({', '.join(r['counted_models']) or 'none'}): "
        + ", ".join(f"N={n}: {_share(r['mean_recovered_share'][str(n)])}" for n in counts)
        + ". Worst AIQ of an added model against the bundle without it: "
        + ", ".join(f"N={n}: {r['worst_aiq_over_without'][str(n)]:+.4f}" for n in counts)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = r["anchor_counts"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (model, e) in enumerate(r["held_out"].items()):
        color = f"C{i}"
        ax.plot(
            counts,
            [e["added"][str(n)]["gap_closed"] for n in counts],
            "o-",
            color=color,
            label=f"{model} added",
        )
        ax.axhline(e["without"]["gap_closed"], color=color, linestyle=":", linewidth=1)
    ax.axhline(r["full"]["gap_closed"], color="black", linestyle="--", label="full retrain")
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("anchors N")
    ax.set_ylabel("gap closed (test)")
    ax.set_title(f"{r['table']}: added from N anchors (dotted: without the model)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="routing table directory")
    parser.add_argument(
        "--out", required=True, help="directory for bundles, metrics.json, report.md, gap.png"
    )
    parser.add_argument("--n", type=int, nargs="+", default=list(ANCHOR_COUNTS), help="anchor counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(Path(args.data), Path(args.out), tuple(args.n))
    except TableError as exc:
        parser.exit(2, f"leave_one_out: error: {exc}\n")
    print(report(result))


if __name__ == "__main__":
    main()
