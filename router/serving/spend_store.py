"""Where per-tenant spend outlives the process: an SQLite file (WAL), one row per tenant and window.

The engine thread writes each batch's spend in one transaction right after the batch's decisions,
before their answers leave: a spend the router has acted on survives a restart and a killed
process (synchronous=NORMAL: the WAL is in the operating system's cache; only a power loss of the
host can lose the last transactions). Each replica has its own file: caps and targets hold per
replica (docs/OPERATIONS.md).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spend (tenant TEXT NOT NULL, window_start INTEGER NOT NULL, "
    "spent_usd REAL NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (tenant, window_start))",
    "CREATE TABLE IF NOT EXISTS controller (tenant TEXT PRIMARY KEY, cost_weight REAL NOT NULL)",
)


class SpendStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            self._db.execute(statement)

    def spend(self) -> dict[tuple[str, int], float]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, window_start, spent_usd FROM spend").fetchall()
        return {(t, int(w)): float(s) for t, w, s in rows}

    def cost_weights(self) -> dict[str, float]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, cost_weight FROM controller").fetchall()
        return {t: float(w) for t, w in rows}

    def add(
        self, spend: Mapping[tuple[str, int], tuple[float, int]], cost_weights: Mapping[str, float]
    ) -> None:
        """Adds (USD, calls) to each (tenant, window) and sets the controllers' w, in one transaction."""
        if not spend and not cost_weights:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO spend VALUES (?, ?, ?, ?) ON CONFLICT (tenant, window_start) DO UPDATE "
                    "SET spent_usd = spent_usd + excluded.spent_usd, calls = calls + excluded.calls",
                    [(t, w, usd, n) for (t, w), (usd, n) in spend.items()],
                )
                self._db.executemany(
                    "INSERT INTO controller VALUES (?, ?) ON CONFLICT (tenant) DO UPDATE "
                    "SET cost_weight = excluded.cost_weight",
                    list(cost_weights.items()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
