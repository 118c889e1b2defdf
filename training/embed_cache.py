"""Embeddings cached on disk, keyed by the embedder's hash and the prompt text.

Retraining, evaluating or predicting on the same prompts with the same embedder never re-embeds:
one SQLite file per embedder hash maps sha256(prompt) to its float32 vector.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router.core.embedder import Embedder

log = logging.getLogger(__name__)


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    def __init__(self, cache_dir: Path, embedder: Embedder) -> None:
        self.embedder = embedder
        directory = cache_dir / "embeddings"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{embedder.sha256[:32]}.sqlite"

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path)
        con.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        return con

    def embed(self, texts: Sequence[str], chunk: int = 2048) -> np.ndarray:
        """Vectors for texts, in order; only the prompts not seen before go through the encoder."""
        keys = [_key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        con = self._connect()
        try:
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), 500):
                part = unique[start : start + 500]
                marks = ",".join("?" * len(part))
                for key, vec in con.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", part):
                    found[key] = np.frombuffer(vec, dtype=np.float32)
            first_of: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                if key not in found:
                    first_of.setdefault(key, i)
            todo = list(first_of.values())
            if todo:
                log.info("embedding %d new prompts (%d cached)", len(todo), len(unique) - len(todo))
                started = time.perf_counter()
                for start in range(0, len(todo), chunk):
                    batch = todo[start : start + chunk]
                    vecs = self.embedder.embed([texts[i] for i in batch])
                    rows = [(keys[i], v.tobytes()) for i, v in zip(batch, vecs, strict=True)]
                    con.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)", rows)
                    con.commit()
                    for (key, _), vec in zip(rows, vecs, strict=True):
                        found[key] = vec
                    log.info("embedded %d / %d", min(start + chunk, len(todo)), len(todo))
                log.info("embedded %d prompts in %.1f s", len(todo), time.perf_counter() - started)
        finally:
            con.close()
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
