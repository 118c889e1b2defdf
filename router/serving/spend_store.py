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

from router.core.spend_control import ControllerState

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spend (tenant TEXT NOT NULL, window_start INTEGER NOT NULL, "
    "spent_usd REAL NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (tenant, window_start))",
    "CREATE TABLE IF NOT EXISTS controller (tenant TEXT PRIMARY KEY, cost_weight REAL NOT NULL)",
)
# Added to `controller` after its first release; a file written before gets them on open.
CONTROLLER_COLUMNS = {
    "average_usd": "REAL",
    "reported_usd": "REAL NOT NULL DEFAULT 0",
    "predicted_usd": "REAL NOT NULL DEFAULT 0",
}


WRITE_WAIT_S = 0.5


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
        present = {row[1] for row in self._db.execute("PRAGMA table_info(controller)")}
        for column, kind in CONTROLLER_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE controller ADD COLUMN {column} {kind}")
        # Serving writes run on the engine thread, which every call's batch waits for: a store
        # another process holds locked fails the budgeted calls after this, rather than stalling
        # all traffic for sqlite's default 5 s per batch.
        self._db.execute(f"PRAGMA busy_timeout = {int(WRITE_WAIT_S * 1000)}")

    def spend(self) -> dict[tuple[str, int], float]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, window_start, spent_usd FROM spend").fetchall()
        return {(t, int(w)): float(s) for t, w, s in rows}

    def controllers(self) -> dict[str, ControllerState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, cost_weight, average_usd, reported_usd, predicted_usd FROM controller"
            ).fetchall()
        return {
            t: ControllerState(float(w), None if a is None else float(a), float(r), float(p))
            for t, w, a, r, p in rows
        }

    def add(
        self, spend: Mapping[tuple[str, int], tuple[float, int]], controllers: Mapping[str, ControllerState]
    ) -> None:
        """Adds (USD, calls) to each (tenant, window) and sets the controllers' state, in one transaction."""
        if not spend and not controllers:
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
                    "INSERT INTO controller (tenant, cost_weight, average_usd, reported_usd, predicted_usd) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant) DO UPDATE SET "
                    "cost_weight = excluded.cost_weight, average_usd = excluded.average_usd, "
                    "reported_usd = excluded.reported_usd, predicted_usd = excluded.predicted_usd",
                    [
                        (t, c.cost_weight, c.average_usd, c.reported_usd, c.predicted_usd)
                        for t, c in controllers.items()
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune(self, before: int) -> int:
        """Deletes the spend of windows that started before `before` (Unix time); how many rows."""
        with self._lock:
            return self._db.execute("DELETE FROM spend WHERE window_start < ?", (before,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
