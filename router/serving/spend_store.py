"""Where per-tenant spend outlives the process: one row per tenant and window, and each spend
controller's state.

`--spend-store` names an SQLite file (WAL; the embedded default, one replica) or a PostgreSQL
server (`postgresql://...`, replicas sharing their tenants' caps). The engine thread writes each
batch's spend in one transaction right after the batch's decisions, before their answers leave:
a spend the router has acted on survives a restart and a killed process (SQLite with
synchronous=NORMAL: the WAL is in the operating system's cache; only a power loss of the host can
lose the last transactions). With SQLite each replica has its own file and its caps hold per
replica; with PostgreSQL a batch that decides for a capped tenant first locks the tenant's row for
the current window and reads what every replica has spent, and its write releases the lock, so a
cap holds across the replicas (docs/OPERATIONS.md).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as NoAnswer
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from router.core.feedback_store import NO_HANG, StoreError, redacted, shown, sqlite_path
from router.core.spend_control import ControllerState

Key = tuple[str, int]  # (tenant, window start in Unix seconds)

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


# Serving writes run on the engine thread, which every call's batch waits for: a store that is
# locked or unreachable fails the budgeted calls after this, rather than stalling all traffic.
WRITE_WAIT_S = 0.5

UPSERT_SPEND = (
    "INSERT INTO spend VALUES ({m}, {m}, {m}, {m}) ON CONFLICT (tenant, window_start) DO UPDATE "
    "SET spent_usd = spend.spent_usd + excluded.spent_usd, calls = spend.calls + excluded.calls"
)
UPSERT_CONTROLLER = (
    "INSERT INTO controller (tenant, cost_weight, average_usd, reported_usd, predicted_usd) "
    "VALUES ({m}, {m}, {m}, {m}, {m}) ON CONFLICT (tenant) DO UPDATE SET "
    "cost_weight = excluded.cost_weight, average_usd = excluded.average_usd, "
    "reported_usd = excluded.reported_usd, predicted_usd = excluded.predicted_usd"
)


class SpendStoreError(Exception):
    """The spend store cannot be opened, read or written. `contended`: a row another replica
    holds stayed locked past the wait; the store itself works."""

    def __init__(self, message: str, contended: bool = False) -> None:
        super().__init__(message)
        self.contended = contended


class SpendStore(Protocol):
    def spend(self) -> dict[Key, float]: ...

    def controllers(self) -> dict[str, ControllerState]: ...

    def hold(self, keys: Iterable[Key]) -> dict[Key, float]:
        """Locks these windows' rows until the next add() or release(), and returns what every
        replica has spent in them; {} where the store is not shared."""
        ...

    def release(self) -> None: ...

    def add(self, spend: Mapping[Key, tuple[float, int]], controllers: Mapping[str, ControllerState]) -> None:
        """Adds (USD, calls) to each (tenant, window) and sets the controllers' state, in one
        transaction (the held one, if any, which it ends)."""
        ...

    def prune(self, before: int) -> int:
        """Deletes the spend of windows that started before `before` (Unix time); how many rows."""
        ...

    def close(self) -> None: ...


# Rows are written in key order: with a shared store, two replicas' writes then lock them in
# one order and never wait on each other in a cycle.
def _rows(spend: Mapping[Key, tuple[float, int]]) -> list[tuple[str, int, float, int]]:
    return sorted((t, w, usd, n) for (t, w), (usd, n) in spend.items())


def _states(
    controllers: Mapping[str, ControllerState],
) -> list[tuple[str, float, float | None, float, float]]:
    return [
        (t, c.cost_weight, c.average_usd, c.reported_usd, c.predicted_usd)
        for t, c in sorted(controllers.items())
    ]


def _controller_states(rows: Iterable[tuple[Any, ...]]) -> dict[str, ControllerState]:
    return {
        t: ControllerState(float(w), None if a is None else float(a), float(r), float(p))
        for t, w, a, r, p in rows
    }


CONTROLLER_SELECT = "SELECT tenant, cost_weight, average_usd, reported_usd, predicted_usd FROM controller"


class SqliteSpendStore:
    def __init__(self, path: Path) -> None:
        try:
            self._open(Path(path))
        except (sqlite3.Error, OSError) as exc:
            raise SpendStoreError(f"{path}: {exc}") from exc

    def _open(self, path: Path) -> None:
        self.path = path
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
        self._db.execute(f"PRAGMA busy_timeout = {int(WRITE_WAIT_S * 1000)}")

    @contextmanager
    def _guarded(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise SpendStoreError(f"{self.path}: {exc}") from exc

    def spend(self) -> dict[Key, float]:
        with self._guarded() as db:
            rows = db.execute("SELECT tenant, window_start, spent_usd FROM spend").fetchall()
        return {(t, int(w)): float(s) for t, w, s in rows}

    def controllers(self) -> dict[str, ControllerState]:
        with self._guarded() as db:
            return _controller_states(db.execute(CONTROLLER_SELECT).fetchall())

    def hold(self, keys: Iterable[Key]) -> dict[Key, float]:
        return {}  # one replica per file: what it has in memory is all there is

    def release(self) -> None:
        pass

    def add(self, spend: Mapping[Key, tuple[float, int]], controllers: Mapping[str, ControllerState]) -> None:
        if not spend and not controllers:
            return
        with self._guarded() as db:
            db.execute("BEGIN")
            try:
                db.executemany(UPSERT_SPEND.format(m="?"), _rows(spend))
                db.executemany(UPSERT_CONTROLLER.format(m="?"), _states(controllers))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def prune(self, before: int) -> int:
        with self._guarded() as db:
            return db.execute("DELETE FROM spend WHERE window_start < ?", (before,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Start-up is not on the serving path: it waits for other replicas' locks and a large table.
START_UP_WAIT = "SET LOCAL statement_timeout = 30000; SET LOCAL lock_timeout = 30000"


# lock_not_available: lock_timeout ran out on a row another session holds
LOCK_NOT_AVAILABLE = "55P03"
# how long a serving-path call waits for the database: statement_timeout and lock_timeout are the
# server's, and a server that stops answering (paused, or a pooler queueing) honours neither
ANSWER_WAIT_S = 3 * WRITE_WAIT_S
START_UP_ANSWER_S = 40.0


def with_session_options(url: str, ours: str) -> str:
    """The URL's own `options` (a search_path, say) followed by ours: a connection's keyword
    replaces the URL's, and a later `-c` wins over an earlier one, so ours hold and theirs stay."""
    from psycopg.conninfo import conninfo_to_dict

    theirs = str(conninfo_to_dict(url).get("options") or "")
    return f"{theirs} {ours}".strip()


class PostgresSpendStore:
    """Shared by replicas. One connection, used by a thread of its own on behalf of the engine
    thread, which waits for each answer at most ANSWER_WAIT_S; a transaction opened by hold()
    stays open, holding the rows' locks, until add() or release()."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        wait_ms = int(WRITE_WAIT_S * 1000)
        self._lock = threading.Lock()
        self._held: Any = None  # the connection of the open transaction
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._unanswered: Future[Any] | None = None  # a call given up on, still with the database
        # a hold went to the store's thread since the last release: only then is there one to do
        # (the ledger releases after every batch, and a hung database must not make a queue grow)
        self._may_hold = False
        # a daemon: a database that never answers must not keep the process from exiting
        threading.Thread(target=self._work, name="spend-store", daemon=True).start()
        try:
            kwargs = {  # in the try: a URL psycopg cannot parse is refused like one it cannot reach
                **NO_HANG,
                "tcp_user_timeout": 2 * wait_ms,
                # a lock another replica holds, or a slow server, fails the budgeted calls quickly;
                # the lock's limit comes first, so that a contended row is told apart from a slow server
                "options": with_session_options(
                    url, f"-c statement_timeout={2 * wait_ms} -c lock_timeout={wait_ms}"
                ),
            }
            # One plain connection first: the pool would only say that it timed out, where this
            # names the cause (refused, unknown host, wrong password, no such database).
            psycopg.connect(url, connect_timeout=10).close()
            self._pool = ConnectionPool(
                url, min_size=1, max_size=1, open=True, timeout=WRITE_WAIT_S, kwargs=kwargs
            )
            self._pool.wait(timeout=10.0)
            self._call(self._create_tables, START_UP_ANSWER_S)
        except SpendStoreError:
            raise
        except Exception as exc:  # psycopg raises its own types for an unreachable server
            raise SpendStoreError(redacted(url, exc)) from exc

    def _create_tables(self) -> None:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(START_UP_WAIT)
                # replicas starting together would otherwise race to create the same tables
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('router spend store schema'))")
                for statement in SCHEMA:
                    conn.execute(_postgres(statement))
                for column, kind in CONTROLLER_COLUMNS.items():
                    conn.execute(
                        f"ALTER TABLE controller ADD COLUMN IF NOT EXISTS {column} {_postgres(kind)}"
                    )
        except Exception as exc:
            raise SpendStoreError(redacted(self.url, exc)) from exc

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            run, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(run())
                except BaseException as exc:
                    future.set_exception(exc)

    def _call(self, run: Callable[[], Any], wait: float = ANSWER_WAIT_S, holds: bool = False) -> Any:
        """`run` on the store's thread; SpendStoreError if no answer comes within `wait`, and at
        once while an earlier call is still waiting for one."""
        if self._unanswered is not None and not self._unanswered.done():
            raise SpendStoreError(f"{shown(self.url)}: the database has not answered an earlier statement")
        future: Future[Any] = Future()
        self._jobs.put((run, future))
        self._may_hold |= holds
        try:
            return future.result(timeout=wait)
        except NoAnswer:
            self._unanswered = future
            raise SpendStoreError(f"{shown(self.url)}: no answer within {wait:g} s") from None

    @contextmanager
    def _transaction(self, keep: bool = False) -> Iterator[Any]:
        """The held transaction's connection, or a new one; committed at the end unless `keep`."""
        with self._lock:
            conn = self._held
            try:
                if conn is None:
                    conn = self._pool.getconn()
                yield conn
                if not keep:
                    conn.commit()
            except Exception as exc:
                self._held = None
                if conn is not None:
                    self._return(conn, rollback=True)
                if isinstance(exc, SpendStoreError) or not type(exc).__module__.startswith("psycopg"):
                    raise
                contended = getattr(exc, "sqlstate", None) == LOCK_NOT_AVAILABLE
                raise SpendStoreError(redacted(self.url, exc), contended) from exc
            if keep:
                self._held = conn
            else:
                self._held = None
                self._return(conn)

    def _return(self, conn: Any, rollback: bool = False) -> None:
        try:
            if rollback:
                conn.rollback()
        except Exception:  # a broken connection: the pool replaces it
            pass
        self._pool.putconn(conn)

    # read at start-up only, with start-up's patience
    def spend(self) -> dict[Key, float]:
        return self._call(self._spend, START_UP_ANSWER_S)  # type: ignore[no-any-return]

    def controllers(self) -> dict[str, ControllerState]:
        return self._call(self._controllers, START_UP_ANSWER_S)  # type: ignore[no-any-return]

    def hold(self, keys: Iterable[Key]) -> dict[Key, float]:
        wanted = sorted(set(keys))
        return self._call(lambda: self._hold(wanted), holds=True) if wanted else {}

    def release(self) -> None:
        # not waited for: the next call queues behind it, and a batch's end must not stall
        if self._may_hold:
            self._may_hold = False
            self._jobs.put((self._release, Future()))

    def add(self, spend: Mapping[Key, tuple[float, int]], controllers: Mapping[str, ControllerState]) -> None:
        self._call(lambda: self._add(dict(spend), dict(controllers)))

    def prune(self, before: int) -> int:
        return self._call(lambda: self._prune(before))  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            self._call(self._close, ANSWER_WAIT_S)
        finally:
            self._jobs.put(None)

    def _spend(self) -> dict[Key, float]:
        with self._transaction() as conn:
            conn.execute(START_UP_WAIT)
            rows = conn.execute("SELECT tenant, window_start, spent_usd FROM spend").fetchall()
        return {(t, int(w)): float(s) for t, w, s in rows}

    def _controllers(self) -> dict[str, ControllerState]:
        with self._transaction() as conn:
            conn.execute(START_UP_WAIT)
            return _controller_states(conn.execute(CONTROLLER_SELECT).fetchall())

    def _hold(self, wanted: list[Key]) -> dict[Key, float]:
        with self._transaction(keep=True) as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO spend VALUES (%s, %s, 0, 0) ON CONFLICT (tenant, window_start) DO NOTHING",
                    wanted,
                )
            # Locked in one order (the sort comes before the lock), so that two replicas holding
            # the same tenants never wait on each other in a cycle.
            rows = conn.execute(
                "SELECT tenant, window_start, spent_usd FROM spend WHERE (tenant, window_start) IN "
                "(SELECT * FROM unnest(%s::text[], %s::bigint[])) ORDER BY tenant, window_start FOR UPDATE",
                ([t for t, _ in wanted], [w for _, w in wanted]),
            ).fetchall()
        return {(t, int(w)): float(s) for t, w, s in rows}

    def _release(self) -> None:
        with self._lock:
            conn, self._held = self._held, None
            if conn is not None:
                self._return(conn, rollback=True)

    def _add(
        self, spend: Mapping[Key, tuple[float, int]], controllers: Mapping[str, ControllerState]
    ) -> None:
        if not spend and not controllers:
            self._release()
            return
        with self._transaction() as conn, conn.cursor() as cur:
            cur.executemany(UPSERT_SPEND.format(m="%s"), _rows(spend))
            cur.executemany(UPSERT_CONTROLLER.format(m="%s"), _states(controllers))

    def _prune(self, before: int) -> int:
        with self._transaction() as conn:
            return int(conn.execute("DELETE FROM spend WHERE window_start < %s", (before,)).rowcount)

    def _close(self) -> None:
        self._release()
        self._pool.close()


def _postgres(ddl: str) -> str:
    """SQLite's column types as PostgreSQL's: 8-byte floats and integers."""
    return ddl.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")


def open_spend_store(location: str) -> SpendStore:
    """`postgresql://...` (shared by replicas), or an SQLite file: `sqlite:///PATH` or a plain path."""
    if not location.strip():
        raise SpendStoreError("the spend store is empty: give a file, sqlite:///PATH or postgresql://...")
    scheme = urlparse(location).scheme
    if scheme in ("postgresql", "postgres"):
        return PostgresSpendStore(location)
    if scheme == "sqlite":
        try:
            path = sqlite_path(location)
        except StoreError as exc:
            raise SpendStoreError(str(exc)) from exc
        assert path is not None
        return SqliteSpendStore(path)
    if "://" in location:
        raise SpendStoreError(
            f"{shown(location)}: the spend store must be a file, sqlite:///PATH or postgresql://..."
        )
    return SqliteSpendStore(Path(location))
