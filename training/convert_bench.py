"""How long `router convert --format sprout` takes on a table of SPROUT's size (a benchmark).

    python -m training.convert_bench --rows 45000 --models 13

Writes SPROUT-shaped parquet files (the published columns, 13 model structs with some null scores,
prompt lengths up to RAG contexts of ~87,000 characters) into a temporary directory, then times the
conversion through the `router convert` command as a user runs it (a fresh process, so the
figure includes starting Python and importing the training stack), and prints the figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# prompt text made of common words (its content does not matter to the conversion)
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "on", "with", "model", "answer", "data")
STRUCT = pa.struct(
    [
        ("score", pa.float64()),
        ("num_input_tokens", pa.int64()),
        ("num_output_tokens", pa.int64()),
        ("response", pa.string()),
    ]
)


def write_sprout_like(root: Path, rows: int, models: int, seed: int = 0) -> list[str]:
    """SPROUT-shaped parquet files under root/data; returns the model names."""
    rng = np.random.default_rng(seed)
    names = [f"model-{i:02d}" for i in range(models)]
    lengths = np.minimum(rng.lognormal(5.5, 1.2, rows).astype(int) + 20, 87_000)
    vocabulary = np.array(WORDS)
    prompts = [" ".join(vocabulary[rng.integers(0, len(WORDS), n // 5)]) for n in lengths]
    splits = rng.choice(["train", "validation", "test"], size=rows, p=[0.7, 0.1, 0.2])
    columns: dict[str, pa.Array] = {
        "key": pa.array([f"k{i}" for i in range(rows)]),
        "dataset": pa.array(rng.choice(["gsm8k", "mmlu", "rag", "math"], size=rows)),
        "dataset_level": pa.array(["none"] * rows),
        "dataset_idx": pa.array(np.arange(rows)),
        "prompt": pa.array(prompts),
        "golden_answer": pa.array(["A"] * rows),
    }
    for name in names:
        score = rng.random(rows).round()
        cells = [
            {"score": None if rng.random() < 0.02 else float(s), "num_input_tokens": int(n // 4),
             "num_output_tokens": int(o), "response": "answer"}
            for s, n, o in zip(score, lengths, rng.integers(1, 600, rows), strict=True)
        ]  # fmt: skip
        columns[name] = pa.array(cells, STRUCT)
    table = pa.table(columns)
    data = root / "data"
    data.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pq.write_table(table.filter(pa.array(splits == split)), data / f"{split}-00000-of-00001.parquet")
    prices = pd.DataFrame({"model": names, "input_usd_per_mtok": 0.5, "output_usd_per_mtok": 1.5})
    prices.to_csv(root / "prices.csv", index=False)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=45_000)
    parser.add_argument("--models", type=int, default=13)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_sprout_like(root / "sprout", args.rows, args.models)
        written = time.perf_counter() - started
        started = time.perf_counter()
        source = root / "sprout"
        command = ["convert", "--format", "sprout", "--source", str(source)]
        command += ["--prices", str(source / "prices.csv"), "--out", str(root / "table")]
        code = subprocess.run([sys.executable, "-m", "router.cli", *command], capture_output=True).returncode
        converted = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (root / "sprout" / "data").iterdir()) / 2**20
    print(f"{args.rows} rows x {args.models} models ({size:.0f} MB of parquet, written in {written:.1f} s)")
    print(f"router convert --format sprout: {converted:.1f} s (exit code {code})")


if __name__ == "__main__":
    main()
