"""The `router` command as a user runs it: train, predict, eval, route, serve, convert."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import edit_manifest

ROUTER = [sys.executable, "-m", "router.cli"]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ROUTER, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


@pytest.fixture(scope="module")
def small_table(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real dcrouter rows: 600 train and 200 test prompts, in the canonical layout."""
    src = data_dir / "dcrouter"
    prompts = pd.read_parquet(src / "prompts.parquet")
    prompts = pd.concat(
        [
            prompts[prompts.split == "train"].sample(600, random_state=0),
            prompts[prompts.split == "test"].sample(200, random_state=0),
        ]
    )
    outcomes = pd.read_parquet(src / "outcomes.parquet")
    out = tmp_path_factory.mktemp("tables") / "dcrouter_small"
    out.mkdir()
    prompts.to_parquet(out / "prompts.parquet")
    outcomes[outcomes.prompt_id.isin(prompts.prompt_id)].to_parquet(out / "outcomes.parquet")
    shutil.copy(src / "models.csv", out / "models.csv")
    return out


@pytest.fixture(scope="module")
def trained(small_table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("cli") / "bundle"
    result = run("train", "--data", str(small_table), "--out", str(bundle))
    assert result.returncode == 0, result.stderr
    assert "written to" in result.stdout and "stage seconds" in result.stdout
    return bundle


def test_train_writes_a_bundle_for_the_table(trained: Path) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["bundle_version"].startswith("dcrouter_small-")
    assert len(manifest["models"]) == 9
    # dcrouter publishes no output token counts: costs are input-only, and the manifest says so
    assert not any(m["output_tokens_known"] for m in manifest["models"])


def test_predict_writes_every_prompt_model_pair(trained: Path, small_table: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.parquet"
    result = run(
        "predict", "--bundle", str(trained), "--data", str(small_table), "--split", "test", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["prompt_id", "model", "quality", "cost_usd"]
    assert len(frame) == 200 * 9
    assert frame["quality"].between(0, 1).all() and (frame["cost_usd"] > 0).all()
    # dcrouter cost is input tokens x price: the estimate should be close to the table's
    outcomes = pd.read_parquet(small_table / "outcomes.parquet")
    merged = frame.merge(outcomes, on=["prompt_id", "model"], suffixes=("", "_true"))
    rel = (merged.cost_usd - merged.cost_usd_true).abs().sum() / merged.cost_usd_true.sum()
    assert rel < 0.15


def test_eval_reports_router_beside_knn(trained: Path, small_table: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = run(
        "eval",
        "--bundle",
        str(trained),
        "--data",
        str(small_table),
        "--split",
        "test",
        "--report",
        str(report),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads((report / "metrics.json").read_text())
    for who in ("router", "knn"):
        f = figures[who]
        assert f["aiq_zero"] < f["aiq_oracle"]
        assert {
            "gap_closed",
            "quality_at_10pct_cost",
            "quality_at_30pct_cost",
            "cost_to_match_best",
            "quality_at_w0",
            "calibration",
            "random",
            "single_models",
        } <= set(f)
    assert figures["knn"]["k"] in (4, 8, 16, 32, 64, 128, 256)
    assert (report / "curve.png").stat().st_size > 10_000
    text = (report / "report.md").read_text()
    assert "gap closed" in text and "kNN reference" in text


def test_route_from_a_bundle(small_bundle: Path) -> None:
    result = run(
        "route",
        "What is the derivative of x^3?",
        "--bundle",
        str(small_bundle),
        "--json",
        "--cost-weight",
        "0",
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    best = max(decision["estimates"], key=lambda e: e["quality"])
    assert decision["model"] == best["model"]


def test_route_through_a_running_server(server) -> None:
    result = run("route", "Name three noble gases.", "--server", server.address, "--preset", "cost-10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model:") and "bundle_version: mmlu_pro-" in result.stdout


def test_user_errors_are_one_line_and_exit_2(small_bundle: Path, tmp_path: Path) -> None:
    cases = [
        (("route", "  ", "--bundle", str(small_bundle)), "prompt: must not be empty"),
        (("route", "hi", "--bundle", str(small_bundle), "--cost-weight", "3"), "cost_weight"),
        (("route", "hi", "--bundle", str(tmp_path)), "no manifest.json"),
        (("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")), "no such directory"),
        (("serve", "--bundle", str(tmp_path / "nope")), "does not exist"),
        (("serve", "--bundle", str(small_bundle), "--port", "70000"), "port"),
    ]
    for args, message in cases:
        result = run(*args, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_serve_refuses_a_feedback_or_spend_store_it_cannot_open_without_showing_its_password(
    small_bundle: Path, tmp_path: Path
) -> None:
    from training.bench import free_port

    nobody = f"postgresql://router:s3cret-pw@127.0.0.1:{free_port()}/feedback"
    cases = [
        ("mysql://router:s3cret-pw@db.example/feedback", "sqlite:///PATH or postgresql://"),
        (nobody, "refused"),  # libpq's own words: nothing listens on that port
        # libpq also takes the password from the query string
        (
            f"postgresql://router@127.0.0.1:{free_port()}/feedback?password=s3cret-pw&sslmode=disable",
            "refused",
        ),
    ]
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("tenants:\n  capped: {limit_usd: 1.0}\n", encoding="utf-8")
    stores = (
        ("feedback store", ["--feedback-store"]),
        ("spend store", ["--budgets", str(budgets), "--spend-store"]),
    )
    for (url, message), (store, flags) in itertools.product(cases, stores):
        result = run(
            "serve", "--bundle", str(small_bundle), "--port", "0", "--metrics-port", "0", *flags, url,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, (url, result.stderr)
        assert f"{store} refused" in result.stderr and message in result.stderr, result.stderr
        assert "s3cret-pw" not in result.stderr and "***" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def _faulty(small_bundle: Path, tmp_path: Path, fault: str) -> Path:
    from router.core.embedder import file_sha256

    bundle = tmp_path / fault
    shutil.copytree(small_bundle, bundle)
    heads = bundle / "heads.onnx"

    def change(manifest: dict) -> None:
        if fault == "corrupt_onnx":
            heads.write_bytes(b"\x08\x07garbage")
            manifest["files"]["heads.onnx"] = file_sha256(heads)
        elif fault == "checksum_mismatch":
            data = bytearray(heads.read_bytes())
            data[-10] ^= 0x10
            heads.write_bytes(bytes(data))
        elif fault == "path_escape":
            manifest["heads"]["file"] = "../heads.onnx"
            manifest["files"]["../heads.onnx"] = manifest["files"].pop("heads.onnx")
        elif fault == "unlisted_reference":  # the fleet commands read it: outside, unchecked
            manifest["reference"]["outcomes"] = "../v2/reference/outcomes.json"
        elif fault == "missing_file":
            (bundle / "embedder" / "embedder.onnx").unlink()
        elif fault == "edited_manifest":
            manifest["policy"]["default_cost_weight"] = 0.5
        elif fault == "narrow_output_tokens":
            _narrow_output_tokens(heads)
            manifest["files"]["heads.onnx"] = file_sha256(heads)

    edit_manifest(bundle, change, reseal=fault != "edited_manifest")
    return bundle


def _narrow_output_tokens(heads: Path) -> None:
    """The heads graph's output_tokens cut to its first model's column (quality left whole)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(heads)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["output_tokens_all" if o == "output_tokens" else o for o in node.output]
    graph.initializer.extend(
        numpy_helper.from_array(np.array([v], dtype=np.int64), name) for name, v in (("s0", 0), ("s1", 1))
    )
    graph.node.append(helper.make_node("Slice", ["output_tokens_all", "s0", "s1", "s1"], ["output_tokens"]))
    onnx.save(model, heads)  # ONNX Runtime infers the narrow width from the Slice


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("corrupt_onnx", "heads.onnx: not a loadable ONNX model"),
        # one column of output lengths stretched over every model: garbage costs, then IndexError
        ("narrow_output_tokens", "gives output_tokens for 1 models and quality for"),
        ("checksum_mismatch", "file 'heads.onnx': sha256 mismatch"),
        ("path_escape", "path '../heads.onnx' escapes the bundle directory"),
        ("unlisted_reference", "file '../v2/reference/outcomes.json' is used but has no sha256"),
        ("missing_file", "file 'embedder/embedder.onnx' is listed in the manifest but missing"),
        ("edited_manifest", "manifest_sha256 does not match the manifest's content"),
    ],
)
def test_serve_refuses_a_faulty_bundle_at_start_up(
    small_bundle: Path, tmp_path: Path, fault: str, message: str
) -> None:
    bundle = _faulty(small_bundle, tmp_path, fault)
    result = run("serve", "--bundle", str(bundle), "--port", "0", "--metrics-port", "0", timeout=120)
    assert result.returncode == 2
    assert "refused" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_serve_and_train_refuse_bad_settings_in_one_line(small_bundle: Path, tmp_path: Path) -> None:
    """Each of these gave a traceback (an empty token file, a port already taken) or silently
    trained on the whole table (--max-prompts 0)."""
    import socket

    empty = tmp_path / "token"
    empty.write_text("\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (["serve", "--bundle", str(small_bundle), "--port", "0", "--metrics-port", "0",
              "--auth-token-file", str(empty)], "auth token: the auth token is empty"),
            (["serve", "--bundle", str(small_bundle), "--host", "127.0.0.1", "--port", port,
              "--metrics-port", "0"], f"cannot listen on 127.0.0.1:{port}"),
            (["train", "--data", str(tmp_path), "--max-prompts", "0", "--out", str(tmp_path / "b")],
             "--max-prompts: must be at least 1, got 0"),
        ]  # fmt: skip
        for args, message in cases:
            result = run(*args, timeout=120)
            assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr


def test_a_token_given_as_a_flag_is_warned_about_and_never_printed(small_bundle: Path) -> None:
    """A flag's value is visible to every user of the machine in the process list."""
    import socket

    with socket.socket() as taken:  # the server stops at its port, after reading its settings
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run(
            "serve", "--bundle", str(small_bundle), "--host", "127.0.0.1", "--port", port,
            "--metrics-port", "0", "--auth-token", "s3cret-value", timeout=120,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--auth-token puts the token in the process list" in result.stderr
    assert "ROUTER_AUTH_TOKEN or --auth-token-file" in result.stderr
    assert "s3cret-value" not in result.stderr + result.stdout


def test_eval_with_no_complete_validation_prompt_writes_valid_json(
    trained: Path, small_table: Path, tmp_path: Path
) -> None:
    """The kNN reference chooses k on validation carved from train; with no prompt there that every
    model answered its AIQs were NaN, and metrics.json held a bare NaN (not JSON)."""
    from training.tables import carve_validation, load_table

    _, validation = carve_validation(load_table(small_table).split("train"))
    sparse = tmp_path / "sparse"
    shutil.copytree(small_table, sparse)
    outcomes = pd.read_parquet(sparse / "outcomes.parquet")
    gone = outcomes.prompt_id.isin(validation.prompts.prompt_id) & (outcomes.model == outcomes.model.iloc[0])
    outcomes[~gone].to_parquet(sparse / "outcomes.parquet")
    report = tmp_path / "report"
    result = run(
        "eval", "--bundle", str(trained), "--data", str(sparse), "--split", "test", "--report", str(report)
    )
    assert result.returncode == 0, result.stderr

    def no_nan(constant: str) -> None:
        raise AssertionError(f"metrics.json holds {constant}")

    figures = json.loads((report / "metrics.json").read_text(), parse_constant=no_nan)
    assert figures["knn"]["validation_aiq_by_k"] == {} and figures["knn"]["k"] == 32


def test_train_prices_unbilled_calls_trains_a_free_fleet_and_refuses_a_table_without_costs(
    small_table: Path, tmp_path: Path
) -> None:
    """Without cost_usd (tokens and prices known) or with every price 0, train failed with a
    pydantic traceback (c_ref NaN or 0); with neither costs nor tokens it now says what is missing."""
    outcomes = pd.read_parquet(small_table / "outcomes.parquet")
    models = pd.read_csv(small_table / "models.csv")
    prompts = pd.read_parquet(small_table / "prompts.parquet").head(120)
    outcomes = outcomes[outcomes.prompt_id.isin(prompts.prompt_id)]
    variants = {
        "unbilled": (outcomes.assign(cost_usd=None), models),
        "free": (
            outcomes.assign(cost_usd=0.0),
            models.assign(input_usd_per_mtok=0.0, output_usd_per_mtok=0.0),
        ),
        "scores_only": (outcomes[["prompt_id", "model", "score"]], models),
    }
    for name, (o, m) in variants.items():
        table = tmp_path / name
        table.mkdir()
        prompts.to_parquet(table / "prompts.parquet")
        o.to_parquet(table / "outcomes.parquet")
        m.to_csv(table / "models.csv", index=False)
    for name in ("unbilled", "free"):
        result = run("train", "--data", str(tmp_path / name), "--out", str(tmp_path / f"{name}-bundle"))
        assert result.returncode == 0, result.stderr
        routed = run("route", "What is the derivative of x**3?", "--bundle", str(tmp_path / f"{name}-bundle"))
        assert routed.returncode == 0, routed.stderr
    refused = run("train", "--data", str(tmp_path / "scores_only"), "--out", str(tmp_path / "none"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "no outcome records cost_usd, nor input_tokens" in refused.stderr
    assert not (tmp_path / "none").exists()


def test_leave_one_out_refuses_a_one_model_table_before_any_work(small_table: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    shutil.copytree(small_table, single)
    outcomes = pd.read_parquet(single / "outcomes.parquet")
    outcomes[outcomes.model == outcomes.model.iloc[0]].to_parquet(single / "outcomes.parquet")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.leave_one_out",
            "--data",
            str(single),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs two models at least" in result.stderr


def test_eval_measures_a_bundle_after_remove_model_among_its_own_models(
    trained: Path, small_table: Path, tmp_path: Path
) -> None:
    """It was refused on the table it came from ('its models are not the bundle's')."""
    import json

    gone = json.loads((trained / "manifest.json").read_text())["models"][0]["name"]
    smaller = tmp_path / "smaller"
    result = run("remove-model", "--bundle", str(trained), "--model", gone, "--out", str(smaller))
    assert result.returncode == 0, result.stderr
    report = tmp_path / "report"
    result = run("eval", "--bundle", str(smaller), "--data", str(small_table), "--report", str(report))
    assert result.returncode == 0, result.stderr
    figures = json.loads((report / "metrics.json").read_text())
    assert figures["models_left_out"] == [gone] and figures["router"]["models"] == figures["knn"]["models"]
    assert (
        gone not in json.dumps(figures["router"]["single_models"])
        and "left out" in (report / "report.md").read_text()
    )
    own = run("eval", "--bundle", str(trained), "--data", str(small_table), "--report", str(tmp_path / "r2"))
    assert own.returncode == 0  # the bundle's own table still evaluates as before


def test_train_prompts_without_outcomes_change_nothing(small_table: Path, tmp_path: Path) -> None:
    """Train prompts no model answered joined the fitted rows and the neighbour memory: a variant
    with 50 of them routed worse (test gap 0.138 against 0.077 in the run that found it)."""
    import json

    prompts = pd.read_parquet(small_table / "prompts.parquet")
    outcomes = pd.read_parquet(small_table / "outcomes.parquet")
    base = prompts.head(200)
    unscored = prompts.iloc[200:250].assign(prompt_id=lambda p: "unscored-" + p["prompt_id"].astype(str))
    figures = []
    for name, table_prompts in (("base", base), ("with_unscored", pd.concat([base, unscored]))):
        table = tmp_path / name
        table.mkdir()
        table_prompts.to_parquet(table / "prompts.parquet")
        outcomes[outcomes.prompt_id.isin(base.prompt_id)].to_parquet(table / "outcomes.parquet")
        shutil.copy(small_table / "models.csv", table / "models.csv")
        result = run("train", "--data", str(table), "--out", str(tmp_path / f"{name}-bundle"))
        assert result.returncode == 0, result.stderr
        manifest = json.loads((tmp_path / f"{name}-bundle" / "manifest.json").read_text())
        figures.append((manifest["training"]["validation_metrics"], manifest["policy"]["presets"]))
    assert figures[0] == figures[1]
