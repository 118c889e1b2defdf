"""lm-evaluation-harness sample logs (`lm_eval ... --output_path OUT --log_samples`), as the Open LLM
Leaderboard v2 publishes its per-sample details and as any team gets them from its own runs.

Follows the harness's layout from v0.4.3 on: `OUT/<model>/samples_<task>_<date>.jsonl` (one JSON
object per line) beside `OUT/<model>/results_<date>.json`, where `<date>` has no underscore, so the
task is what lies between `samples_` and the last `_`. Each line holds `doc_id`, `doc`, `target`,
`arguments`, `resps`, `filtered_resps`, `doc_hash`, `prompt_hash`, `target_hash` and one key per
metric (`acc`, `acc_norm`, `exact_match`, ...). `arguments` comes in the two shapes harness
versions write: a list of requests `[[context, continuation_or_gen_kwargs], ...]` (v0.4.0-0.4.2),
or `{"gen_args_0": {"arg_0": context, "arg_1": ...}, ...}` (v0.4.3 on). A file holding one JSON
array instead of lines (v0.4.0-0.4.2) is read too.

What the canonical table gets, per (task, doc_id), aligned across the model folders and checked
against `doc_hash`:
- the prompt: the rendered context the model saw (its first request's); `source` = the task;
- the score: the `--metric` given, else the first entry of the task's `metric_list` in the results
  file, else the harness's default for the task's output type (acc, or exact_match for generation);
  booleans count as 0/1, and values must lie in 0..1;
- tokens: counted with the embedder's WordPiece tokenizer (the providers' tokenizers are not
  available offline): the input always, the output from the generated text (`resps`) where the
  task generates; where it scores log-likelihoods the output count is null and costs nothing;
- the split: fixed by a hash of the prompt id (80/20); the model name: its folder's name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.adapters.common import hash_split, priced, read_prices, require_prices
from training.tables import RoutingTable, TableError

SAMPLES = re.compile(r"^samples_(?P<task>.+)_(?P<date>[^_]+)\.jsonl?$")
DEFAULT_METRICS = {"multiple_choice": "acc", "generate_until": "exact_match", "loglikelihood": "acc"}


@dataclass
class Sample:
    task: str
    doc_id: str
    doc_hash: str | None
    prompt: str
    score: float
    output_text: str | None  # the generation, where the task generates
    where: str


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every sample in a samples file, either layout."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        yield from enumerate(records, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def _context(arguments: Any, where: str) -> tuple[str, Any]:
    """(the rendered context, the second argument of the first request), either shape."""
    if isinstance(arguments, dict) and arguments:
        first = arguments.get("gen_args_0") or next(iter(arguments.values()))
        if isinstance(first, dict) and "arg_0" in first:
            return str(first["arg_0"]), first.get("arg_1")
    if isinstance(arguments, list) and arguments and isinstance(arguments[0], list | tuple) and arguments[0]:
        request = arguments[0]
        return str(request[0]), request[1] if len(request) > 1 else None
    raise TableError(f"{where}: 'arguments' is neither a list of requests nor gen_args_* objects")


def _generation(record: dict[str, Any], second_argument: Any) -> str | None:
    """The generated text for generate_until tasks; None for log-likelihood tasks."""
    generates = isinstance(second_argument, dict) or (
        isinstance(second_argument, str) and second_argument.lstrip().startswith("{")
    )
    resps = record.get("resps")
    if not generates or not isinstance(resps, list) or not resps:
        return None
    first = resps[0]
    return first[0] if isinstance(first, list) and first and isinstance(first[0], str) else None


def _primary_metrics(model_dir: Path) -> dict[str, str]:
    """Task -> the first metric of its metric_list, from the newest results file that has it."""
    found: dict[str, str] = {}
    for results in sorted(model_dir.glob("results_*.json")):
        try:
            configs = json.loads(results.read_text(encoding="utf-8")).get("configs", {})
        except (json.JSONDecodeError, OSError) as exc:
            raise TableError(f"{results}: not readable JSON ({exc})") from exc
        for task, config in configs.items():
            metrics = config.get("metric_list") or []
            if metrics and isinstance(metrics[0], dict) and "metric" in metrics[0]:
                found[task] = str(metrics[0]["metric"])
            elif config.get("output_type") in DEFAULT_METRICS:
                found.setdefault(task, DEFAULT_METRICS[config["output_type"]])
    return found


def _score(record: dict[str, Any], metric: str, where: str) -> float:
    if metric not in record:
        present = [k for k in record if k in ("acc", "acc_norm", "exact_match") or k.endswith("_acc")]
        raise TableError(f"{where}: no metric {metric!r} (this line has: {', '.join(present) or 'none'})")
    value = record[metric]
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise TableError(f"{where}: {metric} must be a number in 0..1, found {value!r}")
    return float(value)


def _model_samples(model_dir: Path, metric: str | None) -> list[Sample]:
    files: dict[str, tuple[str, Path]] = {}
    for path in sorted(model_dir.iterdir()):
        match = SAMPLES.match(path.name)
        if match:  # a rerun of a task: the newest file wins
            task, date = match.group("task"), match.group("date")
            if task not in files or date > files[task][0]:
                files[task] = (date, path)
    if not files:
        raise TableError(
            f"{model_dir}: no samples_<task>_<date>.jsonl files (run lm_eval with --log_samples)"
        )
    primary = _primary_metrics(model_dir)
    samples = []
    for task, (_, path) in sorted(files.items()):
        seen: set[str] = set()
        for number, record in _records(path):
            where = f"{path}:{number}"
            if not isinstance(record, dict):
                raise TableError(f"{where}: a sample must be a JSON object")
            for key in ("doc_id", "arguments"):
                if key not in record:
                    raise TableError(f"{where}: missing {key!r}")
            doc_id = str(record["doc_id"])
            if doc_id in seen:  # one line per (doc, filter): the first filter's
                continue
            seen.add(doc_id)
            prompt, second = _context(record["arguments"], where)
            chosen = metric or primary.get(task) or ("exact_match" if "exact_match" in record else "acc")
            samples.append(
                Sample(
                    task,
                    doc_id,
                    record.get("doc_hash"),
                    prompt,
                    _score(record, chosen, where),
                    _generation(record, second),
                    where,
                )
            )
    return samples


def load_lm_eval(
    source: Path, prices_file: Path, name: str = "lm_eval", metric: str | None = None
) -> RoutingTable:
    """From a harness output directory holding one folder per model."""
    from tokenizers import Tokenizer

    from training.embedder_export import base_model_dir

    source = Path(source)
    if not source.is_dir():
        raise TableError(f"{source}: not a directory (expected one folder per model)")
    model_dirs = sorted(d for d in source.iterdir() if d.is_dir())
    if not model_dirs:
        raise TableError(f"{source}: no model folders")
    prompts: dict[str, tuple[str, str, str | None, str]] = {}  # id -> (prompt, task, doc_hash, where)
    rows = []
    for model_dir in model_dirs:
        for s in _model_samples(model_dir, metric):
            pid = f"{s.task}/{s.doc_id}"
            if pid in prompts:
                _, _, known_hash, first_where = prompts[pid]
                if known_hash and s.doc_hash and known_hash != s.doc_hash:
                    raise TableError(
                        f"{s.where}: doc_hash of {s.task} doc {s.doc_id} differs from {first_where}: "
                        "the models were not evaluated on the same documents"
                    )
            else:
                prompts[pid] = (s.prompt, s.task, s.doc_hash, s.where)
            rows.append((pid, model_dir.name, s.score, s.output_text))
    tokenizer = Tokenizer.from_file(str(base_model_dir() / "tokenizer.json"))

    def count(texts: list[str]) -> np.ndarray:
        return np.array([len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)])

    ids = list(prompts)
    prompt_frame = pd.DataFrame(
        {
            "prompt_id": ids,
            "prompt": [prompts[i][0] for i in ids],
            "source": [prompts[i][1] for i in ids],
            "split": hash_split(pd.Series(ids)),
        }
    )
    input_tokens = dict(zip(ids, count(list(prompt_frame["prompt"])), strict=True))
    generated = [r[3] for r in rows]
    counted = iter(count([g for g in generated if g is not None]))
    output_tokens = [None if g is None else int(next(counted)) for g in generated]
    outcomes = pd.DataFrame(
        {
            "prompt_id": [r[0] for r in rows],
            "model": [r[1] for r in rows],
            "score": [r[2] for r in rows],
            "input_tokens": [input_tokens[r[0]] for r in rows],
            "output_tokens": pd.array(output_tokens, dtype="Int64"),
        }
    )
    models = [d.name for d in model_dirs]
    prices = require_prices(models, read_prices(prices_file), str(source))
    return RoutingTable(
        name, prompt_frame, priced(outcomes, prices, unknown_output_costs_nothing=True), prices
    )
