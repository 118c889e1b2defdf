"""The published formats, reproduced exactly from real mmlu_pro rows, converted through `router convert`,
then trained on and routed from; and malformed files refused with the file, line or column named.

Schemas (training/adapters/*.py docstrings): SPROUT's parquet files and `save_to_disk` datasets
(metadata columns, per-model structs with null scores), RouterBench's pickle and CSV (list prompts,
multi-turn), and lm-evaluation-harness sample logs in both `arguments` shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from router.cli import main
from router.v1 import router_pb2
from tests.helpers import router_stub, running_server
from training.adapters import load_lm_eval, load_routerbench
from training.adapters.routerbench import TURN_SEPARATOR
from training.pipeline import TrainConfig, train_bundle
from training.tables import TableError, load_table

MODELS = ["gemini-1.5-flash-002", "Meta-Llama-3_1-8B-Instruct", "Yi-6B"]
LONG_RAG_PROMPT = (
    "Context: " + "The archive holds letters, ledgers and maps. " * 2000 + "\nQuestion: what is held?"
)


@pytest.fixture(scope="module")
def real_rows(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    src = data_dir / "mmlu_pro"
    prompts = pd.read_parquet(src / "prompts.parquet")
    prompts = pd.concat(
        [prompts[prompts.split == "train"].head(150), prompts[prompts.split == "test"].head(30)]
    )
    outcomes = pd.read_parquet(src / "outcomes.parquet")
    outcomes = outcomes[outcomes.prompt_id.isin(prompts.prompt_id) & outcomes.model.isin(MODELS)]
    models = pd.read_csv(src / "models.csv")
    return prompts.reset_index(drop=True), outcomes.reset_index(drop=True), models[models.model.isin(MODELS)]


@pytest.fixture
def prices(real_rows, tmp_path: Path) -> Path:
    path = tmp_path / "prices.csv"
    real_rows[2].to_csv(path, index=False)
    return path


def _convert(fmt: str, source: Path, prices: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "convert",
            "--format",
            fmt,
            "--source",
            str(source),
            "--prices",
            str(prices),
            "--out",
            str(out),
            *extra,
        ]
    )


def _trains_and_routes(table_dir: Path, tmp_path: Path) -> None:
    """The converted table trains a bundle, which a real server serves."""
    bundle = tmp_path / "bundle"
    train_bundle(table_dir, bundle, TrainConfig())
    models = set(load_table(table_dir).models)
    with running_server(bundle=bundle) as srv, router_stub(srv.address) as stub:
        response = stub.Route(
            router_pb2.RouteRequest(prompt="What is the derivative of x squared?"), timeout=30
        )
    assert response.model in models and {e.model for e in response.estimates} == models


# -- SPROUT ------------------------------------------------------------------------------------------


def _sprout_frame(prompts: pd.DataFrame, outcomes: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """SPROUT's columns: six metadata columns, then one struct per model (null where unobserved)."""
    frame = pd.DataFrame(
        {
            "key": [f"sprout-{p}" for p in prompts.prompt_id],
            "dataset": prompts.source.to_numpy(),
            "dataset_level": "level-1",
            "dataset_idx": np.arange(len(prompts)),
            "prompt": prompts.prompt.to_numpy(),
            "golden_answer": "A",
        }
    )
    for model in models:
        rows = outcomes[outcomes.model == model].set_index("prompt_id")
        frame[model] = [
            {
                "score": float(rows.loc[pid, "score"]),
                "num_input_tokens": int(rows.loc[pid, "input_tokens"]),
                "num_output_tokens": int(rows.loc[pid, "output_tokens"]),
                "response": "The answer is (A).",
            }
            if pid in rows.index
            else None
            for pid in prompts.prompt_id
        ]
    return frame


def _sprout_parquet(real_rows, root: Path, models: list[str] = MODELS) -> Path:
    prompts, outcomes, _ = real_rows
    frame = _sprout_frame(prompts, outcomes, models)
    frame.loc[3, MODELS[0]] = None  # a missing cell
    frame.at[4, MODELS[1]] = {**frame.at[4, MODELS[1]], "score": None}  # a null score
    long = frame.iloc[[0]].assign(key="sprout-rag", prompt=LONG_RAG_PROMPT)
    frame = pd.concat([frame, long], ignore_index=True)
    struct = pa.struct(
        [
            ("score", pa.float64()),
            ("num_input_tokens", pa.int64()),
            ("num_output_tokens", pa.int64()),
            ("response", pa.string()),
        ]
    )
    metadata = [("key", pa.string()), ("dataset", pa.string()), ("dataset_level", pa.string())]
    metadata += [("dataset_idx", pa.int64()), ("prompt", pa.string()), ("golden_answer", pa.string())]
    schema = pa.schema([*metadata, *[(m, struct) for m in models]])
    data = root / "data"
    data.mkdir(parents=True)
    train = frame.index[(frame.index < 120) | (frame.index == len(frame) - 1)]
    parts = {"train": train[:100], "validation": train[100:], "test": frame.index[120:150]}
    for split, index in parts.items():
        table = pa.Table.from_pandas(frame.loc[index], schema=schema, preserve_index=False)
        pq.write_table(table, data / f"{split}-00000-of-00001.parquet")
    return root


def test_sprout_parquet_files_convert_as_published(real_rows, prices: Path, tmp_path: Path) -> None:
    prompts, outcomes, _ = real_rows
    source = _sprout_parquet(real_rows, tmp_path / "SPROUT")
    assert _convert("sprout", source, prices, tmp_path / "table") == 0
    table = load_table(tmp_path / "table")
    assert sorted(table.models) == sorted(MODELS), "metadata columns are not models"
    assert set(table.prompts.source) == set(prompts.source.head(150))
    assert {"dataset_level", "dataset_idx", "golden_answer"} <= set(table.prompts.columns)
    assert (table.prompts.split == "test").sum() == 30 and (table.prompts.split == "train").sum() == 121
    rag = table.prompts.set_index("prompt_id").loc["sprout-rag", "prompt"]
    assert rag == LONG_RAG_PROMPT, "long prompts are kept whole"
    # null cells and null scores are unobserved pairs; every other pair is the source's row
    observed = table.outcomes.set_index(["prompt_id", "model"])
    assert (f"sprout-{prompts.prompt_id[3]}", MODELS[0]) not in observed.index
    assert (f"sprout-{prompts.prompt_id[4]}", MODELS[1]) not in observed.index
    source_rows = outcomes[outcomes.prompt_id.isin(prompts.prompt_id.head(150))]
    assert len(table.outcomes) == len(source_rows) - 2 + len(MODELS)
    merged = table.outcomes.assign(pid=table.outcomes.prompt_id.str.removeprefix("sprout-")).merge(
        source_rows, left_on=["pid", "model"], right_on=["prompt_id", "model"], suffixes=("", "_src")
    )
    assert np.allclose(merged.score, merged.score_src)
    assert np.allclose(merged.cost_usd.astype(float), merged.cost_usd_src, rtol=1e-6)


def test_sprout_o3mini_variant_and_save_to_disk_both_convert_and_train(
    real_rows, prices: Path, tmp_path: Path
) -> None:
    import datasets

    prompts, outcomes, models = real_rows
    extra = "openai-o3-mini"
    o3 = outcomes[outcomes.model == MODELS[0]].assign(model=extra)
    frame = _sprout_frame(prompts, pd.concat([outcomes, o3]), [*MODELS, extra])
    splits = {"train": frame.iloc[:110], "validation": frame.iloc[110:150], "test": frame.iloc[150:]}
    disk = tmp_path / "sprout-o3mini"
    datasets.DatasetDict(
        {k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in splits.items()}
    ).save_to_disk(str(disk))
    pd.concat([models, models[models.model == MODELS[0]].assign(model=extra)]).to_csv(prices, index=False)
    assert _convert("sprout", disk, prices, tmp_path / "table") == 0
    table = load_table(tmp_path / "table")
    assert extra in table.models and len(table.models) == 4
    _trains_and_routes(tmp_path / "table", tmp_path)


def test_sprout_malformed_files_are_named_and_nothing_is_written(
    real_rows, prices: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _sprout_parquet(real_rows, tmp_path / "SPROUT")
    test_file = source / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(test_file)
    fields = [f for f in table.schema.field(MODELS[2]).type if f.name != "num_output_tokens"]
    broken = pa.array(
        [{f.name: r[f.name] for f in fields} for r in table.column(MODELS[2]).to_pylist()], pa.struct(fields)
    )
    pq.write_table(table.set_column(table.schema.get_field_index(MODELS[2]), MODELS[2], broken), test_file)
    out = tmp_path / "never"
    assert _convert("sprout", source, prices, out) == 2
    err = capsys.readouterr().err
    assert f"model column '{MODELS[2]}' lacks struct field(s) num_output_tokens" in err and "test" in err
    assert not out.exists()


# -- RouterBench ---------------------------------------------------------------------------------------


def _routerbench_frame(prompts: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """RouterBench's columns; `prompt` holds a list of turns, the second prompt two of them."""
    turns = [[p] for p in prompts.prompt]
    turns[1] = ["Write a haiku about the sea.", "Now make it about the mountains."]
    wide = pd.DataFrame({"sample_id": prompts.prompt_id, "prompt": turns, "eval_name": prompts.source})
    for model in MODELS:
        rows = outcomes[outcomes.model == model].set_index("prompt_id")
        wide[model] = rows.loc[prompts.prompt_id, "score"].to_numpy()
    for model in MODELS:
        wide[f"{model}|model_response"] = [["…"]] * len(wide)
    for model in MODELS:
        rows = outcomes[outcomes.model == model].set_index("prompt_id")
        wide[f"{model}|total_cost"] = rows.loc[prompts.prompt_id, "cost_usd"].to_numpy()
    wide["oracle_model_to_route_to"] = MODELS[0]
    return wide


@pytest.mark.parametrize("suffix", [".pkl", ".csv"])
def test_routerbench_list_prompts_are_joined_not_stringified(
    real_rows, prices: Path, tmp_path: Path, suffix: str
) -> None:
    prompts, outcomes, _ = real_rows
    wide = _routerbench_frame(prompts, outcomes)
    path = tmp_path / f"routerbench_0shot{suffix}"
    if suffix == ".pkl":
        wide.to_pickle(path)
    else:  # a CSV export writes each list as its Python repr, as the published pickle stores it
        wide.assign(prompt=wide.prompt.map(repr)).to_csv(path, index=False)
    assert _convert("routerbench", path, prices, tmp_path / "table") == 0
    table = load_table(tmp_path / "table")
    by_id = table.prompts.set_index("prompt_id")
    assert by_id.loc[prompts.prompt_id[0], "prompt"] == prompts.prompt[0]
    assert not by_id.prompt.str.startswith("['").any()
    two = by_id.loc[prompts.prompt_id[1]]
    assert two.prompt == "Write a haiku about the sea." + TURN_SEPARATOR + "Now make it about the mountains."
    assert two.turns == 2 and set(by_id.turns) == {1, 2}
    assert set(table.prompts.source) == set(prompts.source)
    got = table.outcomes.set_index(["prompt_id", "model"]).sort_index()
    want = outcomes.set_index(["prompt_id", "model"]).sort_index()
    assert np.allclose(got.score, want.score) and np.allclose(got.cost_usd.astype(float), want.cost_usd)
    if suffix == ".pkl":
        _trains_and_routes(tmp_path / "table", tmp_path)


def test_routerbench_bad_tables_are_refused(real_rows, prices: Path, tmp_path: Path) -> None:
    prompts, outcomes, _ = real_rows
    wide = _routerbench_frame(prompts, outcomes)
    wide.drop(columns=["eval_name"]).to_pickle(tmp_path / "a.pkl")
    with pytest.raises(TableError, match="missing column 'eval_name'"):
        load_routerbench(tmp_path / "a.pkl", prices)
    bad = wide.copy()
    bad.loc[0, "Yi-6B"] = 7.0
    bad.to_pickle(tmp_path / "b.pkl")
    with pytest.raises(TableError, match=r"score must be a number in 0\.\.1"):
        load_routerbench(tmp_path / "b.pkl", prices)
    bad = wide.copy()
    bad.at[2, "prompt"] = []
    bad.to_pickle(tmp_path / "c.pkl")
    with pytest.raises(TableError, match=f"sample_id '{prompts.prompt_id[2]}': prompt is empty"):
        load_routerbench(tmp_path / "c.pkl", prices)
    listed = pd.read_csv(prices)  # a model priced twice doubled its outcomes
    pd.concat([listed, listed.iloc[[0]]]).to_csv(tmp_path / "twice.csv", index=False)
    wide.to_pickle(tmp_path / "good.pkl")
    with pytest.raises(TableError, match=f"model '{listed.model[0]}' is listed twice"):
        load_routerbench(tmp_path / "good.pkl", tmp_path / "twice.csv")
    # text a CSV export mixes into a column: 'True'/'False' are scores, anything else is refused
    # (both were read as missing: the rows vanished and the cost became null, silently)
    mixed = wide.astype({"Yi-6B": object, "Yi-6B|total_cost": object})
    mixed.loc[0, "Yi-6B"], mixed.loc[1, "Yi-6B"] = "True", "False"
    mixed.to_csv(tmp_path / "d.csv", index=False)
    table = load_routerbench(tmp_path / "d.csv", prices)
    got = table.outcomes.set_index(["prompt_id", "model"]).score
    assert got[(prompts.prompt_id[0], "Yi-6B")] == 1.0 and got[(prompts.prompt_id[1], "Yi-6B")] == 0.0
    for column, cell in (("Yi-6B", "oops"), ("Yi-6B|total_cost", "free?")):
        broken = wide.astype({column: object})
        broken.loc[3, column] = cell
        broken.to_csv(tmp_path / "e.csv", index=False)
        with pytest.raises(TableError, match=re.escape(f"{column}: '{cell}' is not a number")):
            load_routerbench(tmp_path / "e.csv", prices)


# -- lm-evaluation-harness ------------------------------------------------------------------------------

CHOICES = [" A", " B", " C", " D"]
ACC, EXACT = [{"metric": "acc"}], [{"metric": "exact_match"}]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _harness_output(real_rows, root: Path, *, old_shape_for: str = MODELS[1]) -> Path:
    """OUT/<model>/samples_<task>_<date>.jsonl and results_<date>.json, as lm_eval --log_samples
    writes them: a multiple-choice task (log-likelihoods) and a generation task; one model's files in
    the list-of-requests `arguments` shape, the others' in the gen_args_* shape."""
    prompts, outcomes, _ = real_rows
    date = "2026-11-02T10-11-12.345678"
    for model in MODELS:
        folder = root / model
        folder.mkdir(parents=True)
        rows = outcomes[outcomes.model == model].set_index("prompt_id")
        old = model == old_shape_for
        tasks = {"leaderboard_mmlu_pro": prompts.iloc[:120], "gsm8k_cot": prompts.iloc[120:]}
        for task, part in tasks.items():
            lines = []
            for doc_id, (pid, text) in enumerate(zip(part.prompt_id, part.prompt, strict=True)):
                if pid not in rows.index:
                    continue
                correct = float(rows.loc[pid, "score"])
                doc = {"question": text, "answer": "A"}
                if task == "gsm8k_cot":
                    gen_kwargs = {"until": ["Question:"], "do_sample": False}
                    requests = [[text, gen_kwargs]]
                    generated = " ".join(["step"] * int(rows.loc[pid, "output_tokens"])) + " The answer is 4."
                    resps, filtered = [[generated]], ["4"]
                    metrics = {"exact_match": correct}
                else:
                    requests = [[text, c] for c in CHOICES]
                    resps = [[["-1.5", "False"]] for _ in CHOICES]
                    filtered = [["-1.5", "False"] for _ in CHOICES]
                    metrics = {"acc": correct, "acc_norm": 1.0 - correct}
                arguments = (
                    requests
                    if old
                    else {f"gen_args_{i}": {"arg_0": r[0], "arg_1": r[1]} for i, r in enumerate(requests)}
                )
                lines.append(
                    {
                        "doc_id": doc_id, "doc": doc, "target": "A", "arguments": arguments, "resps": resps,
                        "filtered_resps": filtered, "filter": "none", "metrics": list(metrics),
                        "doc_hash": _sha(json.dumps(doc)), "prompt_hash": _sha(text),
                        "target_hash": _sha("A"),
                        **metrics,
                    }
                )  # fmt: skip
            (folder / f"samples_{task}_{date}.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        results = {
            "results": {},
            "configs": {
                "leaderboard_mmlu_pro": {
                    "output_type": "multiple_choice",
                    "metric_list": [{"metric": "acc"}],
                },
                "gsm8k_cot": {"output_type": "generate_until", "metric_list": [{"metric": "exact_match"}]},
            },
        }
        (folder / f"results_{date}.json").write_text(json.dumps(results))
    return root


def test_lm_eval_sample_logs_convert_in_both_argument_shapes_and_train(
    real_rows, prices: Path, tmp_path: Path
) -> None:
    prompts, outcomes, _ = real_rows
    source = _harness_output(real_rows, tmp_path / "harness")
    assert _convert("lm-eval", source, prices, tmp_path / "table") == 0
    table = load_table(tmp_path / "table")
    assert sorted(table.models) == sorted(MODELS)
    assert set(table.prompts.source) == {"leaderboard_mmlu_pro", "gsm8k_cot"}
    by_id = table.prompts.set_index("prompt_id")
    assert by_id.loc["leaderboard_mmlu_pro/0", "prompt"] == prompts.prompt[0], "the rendered context"
    rows = table.outcomes.set_index(["prompt_id", "model"])
    # the primary metric (acc, not acc_norm), from both argument shapes alike
    for model in MODELS:
        source_score = outcomes[
            (outcomes.model == model) & (outcomes.prompt_id == prompts.prompt_id[0])
        ].score
        assert rows.loc[("leaderboard_mmlu_pro/0", model), "score"] == float(source_score.iloc[0])
    generated = rows[rows.index.get_level_values(0).str.startswith("gsm8k_cot")]
    scored = rows[rows.index.get_level_values(0).str.startswith("leaderboard")]
    assert generated.output_tokens.notna().all() and (generated.output_tokens > 0).all()
    assert scored.output_tokens.isna().all(), "log-likelihood tasks generate nothing"
    assert (scored.cost_usd > 0).all() and (scored.input_tokens > 0).all()
    _trains_and_routes(tmp_path / "table", tmp_path)


def test_lm_eval_metric_can_be_chosen(real_rows, prices: Path, tmp_path: Path) -> None:
    source = _harness_output(real_rows, tmp_path / "harness")
    with pytest.raises(TableError, match=r"samples_gsm8k_cot_.*:1: no metric 'acc_norm'"):
        load_lm_eval(source, prices, metric="acc_norm")
    for generated in source.glob("*/samples_gsm8k_cot_*.jsonl"):
        generated.unlink()
    acc = load_lm_eval(source, prices).outcomes.set_index(["prompt_id", "model"]).sort_index()
    acc_norm = load_lm_eval(source, prices, metric="acc_norm").outcomes.set_index(["prompt_id", "model"])
    assert np.allclose(acc_norm.sort_index().score, 1.0 - acc.score)


def test_lm_eval_malformed_logs_are_named_and_nothing_is_written(
    real_rows, prices: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _harness_output(real_rows, tmp_path / "harness")
    samples = next((source / MODELS[2]).glob("samples_gsm8k_cot_*.jsonl"))
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join([*lines[:3], lines[3][:40], *lines[4:]]) + "\n")
    out = tmp_path / "never"
    assert _convert("lm-eval", source, prices, out) == 2
    assert f"{samples}:4: not valid JSON" in capsys.readouterr().err
    assert not out.exists()
    samples.write_text("\n".join(lines) + "\n")
    other = next((source / MODELS[0]).glob("samples_leaderboard_mmlu_pro_*.jsonl"))
    first = json.loads(other.read_text().splitlines()[0])
    first["doc_hash"] = _sha("another document")
    other.write_text("\n".join([json.dumps(first), *other.read_text().splitlines()[1:]]) + "\n")
    assert _convert("lm-eval", source, prices, out) == 2
    err = capsys.readouterr().err
    assert "doc_hash of leaderboard_mmlu_pro doc 0 differs" in err and not out.exists()
    shutil.rmtree(source / MODELS[0])
    (source / MODELS[0]).mkdir()
    assert _convert("lm-eval", source, prices, out) == 2
    assert "no samples_<task>_<date>.jsonl files" in capsys.readouterr().err
