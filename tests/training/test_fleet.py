"""The fleet commands on real bundles and real mmlu_pro rows, through the `router` CLI.

A bundle trained without one model gets it back from anchors' outcomes (`anchors`, `add-model`);
models are removed and repriced. Each writes a new, verified bundle version; other models'
estimates do not move; bad inputs are refused with a message and nothing is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router.cli import main
from router.core.engine import open_engine
from router.core.policy import choose
from router.core.pricing import PER_TOKEN
from tests.conftest import HELD_OUT, N_ANCHORS
from training.fleet import _checked_columns
from training.metrics import W_GRID
from training.reference import Reference
from training.tables import load_table
from training.validation import PRESET_COST_FRACTIONS


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> list[str]:
    return list(load_table(data_dir / "mmlu_pro").split("test").prompts["prompt"][:40])


def test_anchors_come_from_train_and_are_deterministic(
    without: Path, data_dir: Path, anchor_files: tuple[Path, Path], tmp_path: Path
) -> None:
    first = pd.read_parquet(anchor_files[0])
    assert list(first.columns) == ["prompt_id", "prompt"] and len(first) == N_ANCHORS
    train = load_table(data_dir / "mmlu_pro").split("train").prompts
    assert set(first["prompt_id"]) <= set(train["prompt_id"]) and first["prompt_id"].is_unique
    table = str(data_dir / "mmlu_pro")
    for seed, same in (("0", True), ("1", False)):
        out = tmp_path / f"again-{seed}.parquet"
        assert main(["anchors", "--bundle", str(without), "--data", table, "--n", str(N_ANCHORS),
                     "--seed", seed, "--out", str(out)]) == 0  # fmt: skip
        assert (list(pd.read_parquet(out)["prompt_id"]) == list(first["prompt_id"])) is same


def test_add_model_keeps_every_other_estimate_and_estimates_the_new_one(
    without: Path, added: Path, texts: list[str]
) -> None:
    source, before = open_engine(without, provider="cpu")
    bundle, after = open_engine(added, provider="cpu")
    assert after.models == (*before.models, HELD_OUT)
    old, new = before.estimate(texts), after.estimate(texts)
    assert np.array_equal(old.quality, new.quality[:, :-1])
    assert np.array_equal(old.cost_usd, new.cost_usd[:, :-1])
    q, cost = new.quality[:, -1], new.cost_usd[:, -1]
    assert ((q >= 0) & (q <= 1)).all() and q.std() > 0
    assert (cost > 0).all()
    # the new column is computed per prompt too: alone or in a batch, the same bits
    alone = np.vstack([after.estimate([t]).quality for t in texts])
    assert np.array_equal(alone, new.quality)
    m = bundle.manifest
    assert m.bundle_version != source.manifest.bundle_version
    spec = m.models[-1]
    assert spec.name == HELD_OUT and spec.input_usd_per_mtok == 1.25 and spec.output_usd_per_mtok == 5.0
    assert spec.origin.startswith("added from") and spec.output_tokens_known
    (change,) = m.changes
    assert change.op == "add-model" and change.models == [HELD_OUT]
    assert change.from_version == source.manifest.bundle_version
    assert change.details["scored_prompts"] >= 20
    assert set(m.policy.presets) == set(source.manifest.policy.presets)
    assert "carried over a fleet change" in m.policy.presets["cost-30"].description


def test_remove_model_keeps_every_other_estimate(added: Path, texts: list[str], tmp_path: Path) -> None:
    _, before = open_engine(added, provider="cpu")
    gone = before.models[3]
    out = tmp_path / "removed"
    assert main(["remove-model", "--bundle", str(added), "--model", gone, "--out", str(out)]) == 0
    bundle, after = open_engine(out, provider="cpu")
    keep = [j for j, m in enumerate(before.models) if m != gone]
    assert after.models == tuple(before.models[j] for j in keep)
    old, new = before.estimate(texts), after.estimate(texts)
    assert np.array_equal(old.quality[:, keep], new.quality)
    assert np.array_equal(old.cost_usd[:, keep], new.cost_usd)
    assert [c.op for c in bundle.manifest.changes] == ["add-model", "remove-model"]


def test_a_model_added_to_a_bundle_that_has_an_added_model_is_still_checked(
    without: Path, added: Path, data_dir: Path, anchor_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """The earlier added model has outcomes on its own anchors only: the holdback check leaves it
    out instead of finding no anchor with every model's outcomes, and its anchors do not count as
    the bundle's training data."""
    _, engine = open_engine(added, provider="cpu")
    back = engine.models[0]
    removed = tmp_path / "removed"
    assert main(["remove-model", "--bundle", str(added), "--model", back, "--out", str(removed)]) == 0
    source, _ = open_engine(without, provider="cpu")
    train = load_table(data_dir / "mmlu_pro").split("train").prompts
    seen = train[Reference.of_bundle(source).rows_of(list(train["prompt"])) >= 0]
    # HELD_OUT's anchors and prompts the bundle was trained on, most of which lack HELD_OUT's outcomes
    prompts, _ = anchor_files
    both = pd.concat([pd.read_parquet(prompts), seen[["prompt_id", "prompt"]].iloc[:40]])
    both = both.drop_duplicates("prompt_id")
    again = tmp_path / "again.parquet"
    both.to_parquet(again, index=False)
    outcomes = pd.read_parquet(data_dir / "mmlu_pro" / "outcomes.parquet")
    mine = outcomes[(outcomes["model"] == back) & outcomes["prompt_id"].isin(both["prompt_id"])]
    mine.to_parquet(tmp_path / "outcomes.parquet", index=False)
    out = tmp_path / "readded"
    assert main(["add-model", "--bundle", str(removed), "--model", back, "--prompts", str(again),
                 "--outcomes", str(tmp_path / "outcomes.parquet"), "--input-usd-per-mtok", "1",
                 "--output-usd-per-mtok", "4", "--out", str(out)]) == 0  # fmt: skip
    bundle, _ = open_engine(out, provider="cpu")
    first, _, last = bundle.manifest.changes
    check = last.details["holdback_check"]
    assert check["models_left_out"] == [HELD_OUT] and check["anchors_checked"] >= 20
    assert "aiq_without" in check
    trained = Reference.of_bundle(source).rows_of(list(both["prompt"])) >= 0
    # some of HELD_OUT's anchors are outside the training data, so counting its rows would differ
    assert first.details["in_training_data"] < N_ANCHORS
    assert last.details["in_training_data"] == int(trained.sum()) < len(both)


def test_the_holdback_check_leaves_out_added_models_first_and_never_rests_on_them_alone() -> None:
    known = np.zeros((100, 4), dtype=bool)
    trained = np.array([True, True, True, False])
    known[:41, :3] = True  # the trained models' outcomes, on the anchors the bundle was trained on
    known[39:, 3] = True  # the added model's, on its own anchors: more of them, few shared
    assert _checked_columns(known, trained) == [0, 1, 2]
    # anchors outside the training data: only the added model's outcomes, so nothing to check
    outside = np.zeros((100, 4), dtype=bool)
    outside[:, 3] = True
    assert _checked_columns(outside, trained) == []


def test_a_model_added_without_output_token_counts_is_priced_on_input_and_says_so(
    without: Path, anchor_files: tuple[Path, Path], texts: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    prompts, outcomes = anchor_files
    bare = tmp_path / "no_tokens.parquet"
    pd.read_parquet(outcomes).drop(columns=["output_tokens"]).to_parquet(bare, index=False)
    out = tmp_path / "no_tokens"
    assert main(["add-model", "--bundle", str(without), "--model", HELD_OUT, "--prompts", str(prompts),
                 "--outcomes", str(bare), "--input-usd-per-mtok", "2", "--output-usd-per-mtok", "8",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "input tokens only" in capsys.readouterr().err
    bundle, engine = open_engine(out, provider="cpu")
    assert not bundle.manifest.models[-1].output_tokens_known
    estimates = engine.estimate(texts)
    assert np.allclose(estimates.cost_usd[:, -1], PER_TOKEN * estimates.input_tokens * 2.0)


def test_a_repriced_bundle_costs_tokens_times_the_new_prices(
    without: Path, texts: list[str], tmp_path: Path
) -> None:
    _, before = open_engine(without, provider="cpu")
    cheaper, dearer = before.models[0], before.models[1]
    prices = tmp_path / "prices.csv"
    prices.write_text(
        f"model,input_usd_per_mtok,output_usd_per_mtok\n{cheaper},0.01,0.02\n{dearer},30,60\n",
        encoding="utf-8",
    )
    out = tmp_path / "repriced"
    assert main(["reprice", "--bundle", str(without), "--prices", str(prices), "--out", str(out)]) == 0
    bundle, after = open_engine(out, provider="cpu")
    old, new = before.estimate(texts), after.estimate(texts)
    assert np.array_equal(old.quality, new.quality)
    for j, (p_in, p_out) in ((0, (0.01, 0.02)), (1, (30.0, 60.0))):
        expected = PER_TOKEN * (new.input_tokens * p_in + new.output_tokens[:, j] * p_out)
        assert np.allclose(new.cost_usd[:, j], expected, rtol=1e-12)
    assert np.array_equal(old.cost_usd[:, 2:], new.cost_usd[:, 2:])
    specs = {m.name: m for m in bundle.manifest.models}
    assert specs[dearer].price_source.startswith("repriced") and specs[before.models[2]].price_source
    assert bundle.manifest.policy.c_ref_usd != open_engine(without, provider="cpu")[1].policy.c_ref_usd


def test_a_reprice_that_changes_no_price_keeps_the_policy_and_a_real_one_keeps_its_scale(
    without: Path, tmp_path: Path
) -> None:
    """Recalibrated from scratch on predicted costs (the trainer had observed ones), repricing a
    model to its own price moved cost-10 from w = 0.03 to 0.11 and c_ref with it."""
    source = open_engine(without, provider="cpu")[0].manifest
    first = source.models[0]
    same, half = tmp_path / "same.csv", tmp_path / "half.csv"
    row = f"{first.name},{first.input_usd_per_mtok!r},{first.output_usd_per_mtok!r}"
    same.write_text(f"model,input_usd_per_mtok,output_usd_per_mtok\n{row}\n", encoding="utf-8")
    cheaper = f"{first.name},{first.input_usd_per_mtok / 2!r},{first.output_usd_per_mtok / 2!r}"
    half.write_text(f"model,input_usd_per_mtok,output_usd_per_mtok\n{cheaper}\n", encoding="utf-8")
    policies = {}
    for prices in (same, half):
        out = tmp_path / prices.stem
        assert main(["reprice", "--bundle", str(without), "--prices", str(prices), "--out", str(out)]) == 0
        policies[prices.stem] = open_engine(out, provider="cpu")[0].manifest.policy
    assert policies["same"] == source.policy
    moved = policies["half"]
    assert 0.5 < moved.c_ref_usd / source.policy.c_ref_usd < 1.0  # one model cheaper: a little lower
    w = [moved.presets[name].cost_weight for name in ("cost-10", "cost-30", "cost-50")]
    assert w[0] >= w[1] >= w[2] > 0 and moved.presets != source.policy.presets
    free = tmp_path / "free.csv"  # self-hosted: the best model costs nothing, no share to keep
    free.write_text("model,input_usd_per_mtok,output_usd_per_mtok\n"
                    + "".join(f"{m.name},0,0\n" for m in source.models), encoding="utf-8")  # fmt: skip
    assert (
        main(["reprice", "--bundle", str(without), "--prices", str(free), "--out", str(tmp_path / "f")]) == 0
    )
    assert open_engine(tmp_path / "f", provider="cpu")[0].manifest.policy.c_ref_usd == source.policy.c_ref_usd
    one = tmp_path / "one.csv"  # and from that free bundle, one model priced again
    one.write_text(f"model,input_usd_per_mtok,output_usd_per_mtok\n{first.name},1,2\n", encoding="utf-8")
    assert (
        main(["reprice", "--bundle", str(tmp_path / "f"), "--prices", str(one), "--out", str(tmp_path / "g")])
        == 0
    )


def test_presets_a_flat_priced_fleet_could_not_reach_come_back_when_prices_do(
    without: Path, tmp_path: Path
) -> None:
    """At one price for all, every cost preset saturates at w = 1 with a cost share of about 1;
    carried over as the share to keep, that share turned every cost preset into `quality` (w = 0)
    once the real prices were back, and kept it so through every later change."""
    source = open_engine(without, provider="cpu")[0].manifest
    header = "model,input_usd_per_mtok,output_usd_per_mtok\n"
    flat, real = tmp_path / "flat.csv", tmp_path / "real.csv"
    flat.write_text(header + "".join(f"{m.name},1,1\n" for m in source.models), encoding="utf-8")
    real.write_text(
        header
        + "".join(f"{m.name},{m.input_usd_per_mtok!r},{m.output_usd_per_mtok!r}\n" for m in source.models),
        encoding="utf-8",
    )
    for prices, bundle, out in ((flat, without, "flat"), (real, tmp_path / "flat", "back")):
        args = ["reprice", "--bundle", str(bundle), "--prices", str(prices), "--out", str(tmp_path / out)]
        assert main(args) == 0
    flat_policy = open_engine(tmp_path / "flat", provider="cpu")[0].manifest.policy
    bundle, engine = open_engine(tmp_path / "back", provider="cpu")
    back = bundle.manifest.policy
    w = [back.presets[name].cost_weight for name in ("cost-10", "cost-30", "cost-50")]
    assert w[0] >= w[1] >= w[2] and w[0] > 0, w
    # a preset the flat fleet saturated is recalibrated to its nominal share of the best model's cost
    est = engine.estimate_features(Reference.of_bundle(bundle).calibration)
    rows = np.arange(len(est.quality))
    best = est.cost_usd[:, int(np.argmax(est.quality.mean(axis=0)))].mean()
    saturated = [n for n, f in PRESET_COST_FRACTIONS.items() if flat_policy.presets[n].cost_weight == 1.0]
    assert saturated, flat_policy.presets
    for name in saturated:
        spend = [
            est.cost_usd[rows, choose(est.quality, est.cost_usd, float(x), back.c_ref_usd)].mean()
            for x in W_GRID
        ]
        nominal = next(
            (float(x) for x, c in zip(W_GRID, spend, strict=True) if c <= PRESET_COST_FRACTIONS[name] * best),
            1.0,
        )
        assert back.presets[name].cost_weight == pytest.approx(nominal, rel=1e-6), name


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("unknown_prompt", "is not in"),
        ("score_above_one", "score must be a number in 0..1"),
        ("existing_model", "already in bundle"),
        ("too_few", "at least 20 are needed"),
        ("price_missing", "output_usd_per_mtok of .* is missing"),
        ("price_not_a_number", "input_usd_per_mtok of .* must be a number from 0 to"),
        ("empty_prompt_id", "prompt_id is empty in row 2"),
        ("blank_model", "--model must be 1-200 printable characters"),
        ("tokens_not_a_number", "output_tokens must be a number of tokens .* found 'many'"),
        ("tokens_absurd", "output_tokens must be a number of tokens .* found 1e\\+300"),
    ],
)
def test_add_model_refuses_bad_input_and_writes_nothing(
    without: Path,
    anchor_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: str,
    message: str,
) -> None:
    prompts, outcomes_path = anchor_files
    outcomes = pd.read_parquet(outcomes_path)
    model = HELD_OUT
    prices = ["--input-usd-per-mtok", "1.25", "--output-usd-per-mtok", "5"]
    if change == "unknown_prompt":
        outcomes.loc[0, "prompt_id"] = "no-such-prompt"
    elif change == "score_above_one":
        outcomes.loc[3, "score"] = 1.5
    elif change == "existing_model":
        model = open_engine(without, provider="cpu")[1].models[0]
        outcomes["model"] = model
    elif change == "too_few":
        outcomes = outcomes.head(19)
    elif change == "price_missing":
        prices = prices[:2]
    elif change == "price_not_a_number":
        prices[1] = "nan"
    elif change == "empty_prompt_id":
        outcomes.loc[2, "prompt_id"] = None
        outcomes.loc[3, "prompt_id"] = "no-such-prompt"  # beside it: ids of two types to sort
    elif change == "blank_model":
        model = "  "
        outcomes["model"] = model
    elif change == "tokens_not_a_number":
        tokens = [str(int(t)) for t in outcomes["output_tokens"].fillna(100)]
        outcomes["output_tokens"] = [*tokens[:4], "many", *tokens[5:]]  # a column of text
    elif change == "tokens_absurd":
        outcomes["output_tokens"] = outcomes["output_tokens"].astype(float)
        outcomes.loc[4, "output_tokens"] = 1e300
    bad = tmp_path / "bad.parquet"
    outcomes.to_parquet(bad, index=False)
    out = tmp_path / "never"
    err = _refused(
        ["add-model", "--bundle", str(without), "--model", model, "--prompts", str(prompts),
         "--outcomes", str(bad), *prices, "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert re.search(message, err), err
    assert not out.exists() and not out.with_name(out.name + ".staging").exists()


def test_remove_and_reprice_refuse_what_is_not_in_the_bundle(
    without: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    err = _refused(["remove-model", "--bundle", str(without), "--model", "gpt-9", "--out", str(out)], capsys)
    assert "'gpt-9' is not in bundle" in err
    prices = tmp_path / "prices.csv"
    prices.write_text("model,input_usd_per_mtok,output_usd_per_mtok\ngpt-9,1,2\n", encoding="utf-8")
    err = _refused(["reprice", "--bundle", str(without), "--prices", str(prices), "--out", str(out)], capsys)
    assert "'gpt-9' is not in bundle" in err
    model = open_engine(without, provider="cpu")[1].models[0]
    for cells, message in [
        (f"{model},-1,2", "must be a number from 0 to"),
        (f"{model},inf,2", "must be a number from 0 to"),
        (f"{model},true,2", "got True"),
        (f"{model},N/A,2", "input_usd_per_mtok"),
        (f"{model},1,NaN", "output_usd_per_mtok"),
        (f"{model},NULL,2", "input_usd_per_mtok"),
        (f"{model},,", "every cell is empty"),
        ("nosuch,1,2\n,2,2", "model is empty in row 1"),
        ("", "lists no model"),
    ]:
        prices.write_text(f"model,input_usd_per_mtok,output_usd_per_mtok\n{cells}\n", encoding="utf-8")
        command = ["reprice", "--bundle", str(without), "--prices", str(prices), "--out", str(out)]
        err = _refused(command, capsys)
        assert message in err, (cells, err)
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_a_new_version_never_replaces_its_input_or_a_directory_that_is_not_a_bundle(
    without: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = open_engine(without, provider="cpu")[1].models[0]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me", encoding="utf-8")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too", encoding="utf-8")
    link = tmp_path / "current"  # as a server is pointed at, for hot swaps
    link.symlink_to(shutil.copytree(without, tmp_path / "v1"))
    for out, message in [
        (link, "is a symbolic link"),  # replaced in place, it failed after all the work, leaving a copy
        (notes, "holds no manifest.json: refusing to replace it"),
        (without, "holds this command's input"),
        (without.parent, "holds this command's input"),
        (a_file, "is a file"),
        (a_file / "inside", "a-file is a file, not a directory"),
    ]:
        command = ["remove-model", "--bundle", str(without), "--model", model, "--out", str(out)]
        err = _refused(command, capsys)
        assert message in err, (out, err)
    assert (notes / "todo.txt").read_text(encoding="utf-8") == "keep me"
    assert a_file.read_text(encoding="utf-8") == "keep me too"
    assert open_engine(without, provider="cpu")[1].models[0] == model  # the input is intact
    err = _refused(["anchors", "--bundle", str(without), "--data", str(tmp_path), "--n", "5",
                    "--out", str(notes)], capsys)  # fmt: skip
    assert "is a directory" in err
    heads = next(without.glob("*.onnx"))  # a file output over an input's file: it replaced it
    before = heads.read_bytes()
    err = _refused(["anchors", "--bundle", str(without), "--data", str(tmp_path), "--n", "5",
                    "--out", str(heads)], capsys)  # fmt: skip
    assert "is or holds this command's input" in err and heads.read_bytes() == before
    assert link.is_symlink() and not list(tmp_path.glob(".current.*"))


def test_a_new_version_removes_nothing_it_did_not_make_and_a_refusal_creates_nothing(
    without: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`OUT.staging` and `OUT.replaced` were cleared without a look (an input bundle of that name
    went too); an input file inside the bundle --out replaced was deleted with it; and a refused
    command had already made --out's missing parent directories."""
    model = open_engine(without, provider="cpu")[1].models[0]
    prices = tmp_path / "prices.csv"
    prices.write_text(f"model,input_usd_per_mtok,output_usd_per_mtok\n{model},1,2\n", encoding="utf-8")
    notes = tmp_path / "v2.staging"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me", encoding="utf-8")
    (tmp_path / "v2.replaced").mkdir()
    out = tmp_path / "v2"
    assert main(["reprice", "--bundle", str(without), "--prices", str(prices), "--out", str(out)]) == 0
    assert main(["reprice", "--bundle", str(without), "--prices", str(prices), "--out", str(out)]) == 0
    assert (notes / "todo.txt").read_text(encoding="utf-8") == "keep me"
    assert (tmp_path / "v2.replaced").is_dir() and not list(tmp_path.glob(".v2.*"))
    named_like_staging = shutil.copytree(without, tmp_path / "keep.staging")
    keep = tmp_path / "keep"
    assert (
        main(["reprice", "--bundle", str(named_like_staging), "--prices", str(prices), "--out", str(keep)])
        == 0
    )
    assert (
        open_engine(named_like_staging, provider="cpu")[1].models
        and open_engine(keep, provider="cpu")[1].models
    )
    inside = out / "prices.csv"
    shutil.copy(prices, inside)
    err = _refused(["reprice", "--bundle", str(without), "--prices", str(inside), "--out", str(out)], capsys)
    assert "is or holds this command's input" in err and inside.exists()
    deep = tmp_path / "nd" / "deeper" / "v3"
    err = _refused(["reprice", "--bundle", str(without), "--prices", str(tmp_path / "none.csv"),
                    "--out", str(deep)], capsys)  # fmt: skip
    assert "none.csv" in err and not (tmp_path / "nd").exists()
    err = _refused(["anchors", "--bundle", str(without), "--data", str(tmp_path), "--n", "0",
                    "--out", str(tmp_path / "ad" / "sub" / "a.parquet")], capsys)  # fmt: skip
    assert not (tmp_path / "ad").exists()


def test_the_manifest_records_the_fleet_history(added: Path) -> None:
    raw = json.loads((added / "manifest.json").read_text())
    assert raw["changes"][0]["op"] == "add-model"
    assert {"reference/outcomes.json", "reference/calibration.json"} <= set(raw["files"])
