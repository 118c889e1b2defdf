"""The durable feedback store: every decision when it is made, every outcome reported for one.

`router serve --feedback-store URL`: `sqlite:///PATH` (the embedded default: WAL, one server) or
`postgresql://USER@HOST:PORT/DB` (several replicas sharing one store; psycopg 3 with a connection
pool). Two tables:

- decisions: id, time, tenant, bundle version, chosen model, applied w, exploration propensity,
  every model's estimates, and the prompt's head features (the embedding and the extras, float32):
  what the router needs to learn from the decision without the text, which is kept only with
  `--store-prompts`;
- outcomes: (decision id, model) unique, score, token counts and cost where reported, a sequence
  number that replicas follow to pick up each other's outcomes.

Writes of decisions are batched by the caller (router/serving/feedback.py); an outcome is
committed before the call that reported it is answered.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse

import numpy as np

# How long a store call may wait for a connection, a lock or the server, in seconds. Past it the
# call fails (Feedback answers UNAVAILABLE) rather than hang with a partitioned or locked server,
# holding up the commit thread and the shutdown behind it.
WAIT_S = 10.0


class StoreError(Exception):
    """The store could not be reached or refused a write."""


class StoreRejected(StoreError):
    """The store refused the data itself (trying again will not help), e.g. a prompt with a NUL
    character, which PostgreSQL text cannot hold."""


@dataclass(frozen=True)
class DecisionRecord:
    id: str
    created_at: float
    tenant: str
    bundle_version: str
    model: str
    cost_weight: float
    propensity: float  # probability the decision had of choosing `model` (1 - explore + ... )
    models: tuple[str, ...]
    quality: np.ndarray  # per model
    cost_usd: np.ndarray
    output_tokens: np.ndarray
    input_tokens: int
    features: np.ndarray  # float32, the head features (embedding first)
    prompt: str | None


@dataclass(frozen=True)
class StoredDecision:
    id: str
    created_at: float
    model: str
    models: tuple[str, ...]
    tenant: str
    cost_usd: float  # the chosen model's predicted cost


@dataclass(frozen=True)
class Outcome:
    decision_id: str
    model: str
    score: float
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None
    received_at: float


@dataclass(frozen=True)
class LearnedOutcome:
    """An outcome with what the online memory needs of its decision."""

    seq: int
    decision_id: str
    model: str
    score: float
    output_tokens: float  # NaN where not reported
    features: np.ndarray


@dataclass(frozen=True)
class ExportRow:
    decision: DecisionRecord
    outcomes: list[Outcome]


def _floats(values: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


class SqlStore:
    """The queries, shared by both databases; subclasses give the connection and the dialect."""

    MARK = "?"
    SERIAL = "INTEGER PRIMARY KEY AUTOINCREMENT"
    BLOB = "BLOB"

    def schema(self) -> list[str]:
        real, blob = "DOUBLE PRECISION", self.BLOB
        decisions = [
            "id TEXT PRIMARY KEY", f"created_at {real} NOT NULL", "tenant TEXT NOT NULL",
            "bundle_version TEXT NOT NULL", "model TEXT NOT NULL", f"cost_weight {real} NOT NULL",
            f"propensity {real} NOT NULL", "models TEXT NOT NULL", f"quality {blob} NOT NULL",
            f"cost_usd {blob} NOT NULL", f"output_tokens {blob} NOT NULL", "input_tokens BIGINT NOT NULL",
            f"features {blob} NOT NULL", "prompt TEXT",
        ]  # fmt: skip
        outcomes = [
            f"seq {self.SERIAL}", "decision_id TEXT NOT NULL", "model TEXT NOT NULL",
            f"score {real} NOT NULL", "input_tokens BIGINT", "output_tokens BIGINT", f"cost_usd {real}",
            f"received_at {real} NOT NULL", "UNIQUE (decision_id, model)",
        ]  # fmt: skip
        return [
            f"CREATE TABLE IF NOT EXISTS decisions ({', '.join(decisions)})",
            "CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created_at)",
            f"CREATE TABLE IF NOT EXISTS outcomes ({', '.join(outcomes)})",
        ]

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Any]:  # pragma: no cover - each store has its own
        raise NotImplementedError
        yield

    def _q(self, sql: str) -> str:
        return sql.replace("?", self.MARK)

    def record(self, decisions: Sequence[DecisionRecord]) -> None:
        rows = [
            (d.id, d.created_at, d.tenant, d.bundle_version, d.model, d.cost_weight, d.propensity,
             json.dumps(list(d.models)), _floats(d.quality, "<f4"), _floats(d.cost_usd, "<f8"),
             _floats(d.output_tokens, "<f4"), d.input_tokens, _floats(d.features, "<f4"), d.prompt)
            for d in decisions
        ]  # fmt: skip
        with self.transaction() as cur:
            cur.executemany(
                self._q(f"INSERT INTO decisions VALUES ({', '.join('?' * 14)}) ON CONFLICT DO NOTHING"),
                rows,
            )

    def decisions(self, ids: Sequence[str]) -> dict[str, StoredDecision]:
        """The stored decisions among `ids`."""
        if not ids:
            return {}
        with self.transaction(write=False) as cur:
            marks = ", ".join("?" * len(ids))
            cur.execute(
                self._q(
                    "SELECT id, created_at, model, models, tenant, cost_usd FROM decisions "
                    f"WHERE id IN ({marks})"
                ),
                list(ids),
            )
            rows = cur.fetchall()
        found = {}
        for id_, created_at, model, models_json, tenant, costs in rows:
            models = tuple(json.loads(models_json))
            cost = np.frombuffer(bytes(costs), dtype="<f8")[models.index(model)]
            found[id_] = StoredDecision(id_, float(created_at), model, models, tenant, float(cost))
        return found

    def add_outcomes(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """In one transaction (one commit for many callers); per outcome, True if recorded, False if
        its (decision_id, model) already had one (nothing replaced)."""
        recorded = [False] * len(outcomes)
        # in key order: replicas committing overlapping outcomes (a client retrying on another
        # replica) then take the rows' locks in one order and never deadlock
        order = sorted(range(len(outcomes)), key=lambda i: (outcomes[i].decision_id, outcomes[i].model))
        with self.transaction() as cur:
            for i in order:
                o = outcomes[i]
                cur.execute(
                    self._q(
                        "INSERT INTO outcomes (decision_id, model, score, input_tokens, output_tokens, "
                        "cost_usd, received_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                    ),
                    (
                        o.decision_id,
                        o.model,
                        o.score,
                        o.input_tokens,
                        o.output_tokens,
                        o.cost_usd,
                        o.received_at,
                    ),
                )
                recorded[i] = cur.rowcount == 1
        return recorded

    def outcomes_since(self, seq: int, limit: int) -> list[LearnedOutcome]:
        return self._learned("o.seq > ? ORDER BY o.seq LIMIT ?", (seq, limit))

    def outcomes_at(self, seqs: Sequence[int]) -> list[LearnedOutcome]:
        """The outcomes among sequence numbers `seqs` that are there now (committed since a look)."""
        found: list[LearnedOutcome] = []
        for start in range(0, len(seqs), 1000):  # within every database's limit on parameters
            chunk = list(seqs[start : start + 1000])
            found += self._learned(f"o.seq IN ({', '.join('?' * len(chunk))}) ORDER BY o.seq", chunk)
        return found

    def _learned(self, where: str, params: Sequence[object]) -> list[LearnedOutcome]:
        with self.transaction(write=False) as cur:
            cur.execute(
                self._q(
                    "SELECT o.seq, o.decision_id, o.model, o.score, o.output_tokens, d.features "
                    f"FROM outcomes o JOIN decisions d ON d.id = o.decision_id WHERE {where}"
                ),
                tuple(params),
            )
            rows = cur.fetchall()
        return [
            LearnedOutcome(
                int(s), d, m, float(score), np.nan if tokens is None else float(tokens),
                _features(features),
            )
            for s, d, m, score, tokens, features in rows
        ]  # fmt: skip

    def purge(self, before: float) -> int:
        """Deletes decisions made before `before` (Unix time), and their outcomes, and any outcome
        whose decision is gone (one committed while a purge removed its decision, at the edge of
        the retention window: it could never be learnt from or exported)."""
        with self.transaction() as cur:
            cur.execute(
                self._q(
                    # NOT EXISTS, not NOT IN: PostgreSQL plans NOT IN over a large table as a
                    # nested loop, and the purge then ran past its statement timeout every hour
                    "DELETE FROM outcomes WHERE decision_id IN "
                    "(SELECT id FROM decisions WHERE created_at < ?) "
                    "OR NOT EXISTS (SELECT 1 FROM decisions d WHERE d.id = outcomes.decision_id)"
                ),
                (before,),
            )
            cur.execute(self._q("DELETE FROM decisions WHERE created_at < ?"), (before,))
            return int(cur.rowcount)

    def export(self) -> Iterator[ExportRow]:
        """Every decision that has outcomes, with them."""
        with self.transaction(write=False) as cur:
            cur.execute(
                "SELECT d.id, d.created_at, d.tenant, d.bundle_version, d.model, d.cost_weight, "
                "d.propensity, d.models, d.quality, d.cost_usd, d.output_tokens, d.input_tokens, "
                "d.features, d.prompt, "
                "o.model, o.score, o.input_tokens, o.output_tokens, o.cost_usd, o.received_at "
                "FROM decisions d JOIN outcomes o ON o.decision_id = d.id ORDER BY d.id, o.model"
            )
            rows = cur.fetchall()
        current: ExportRow | None = None
        for r in rows:
            if current is None or current.decision.id != r[0]:
                if current is not None:
                    yield current
                decision = DecisionRecord(
                    r[0], float(r[1]), r[2], r[3], r[4], float(r[5]), float(r[6]), tuple(json.loads(r[7])),
                    np.frombuffer(bytes(r[8]), "<f4"), np.frombuffer(bytes(r[9]), "<f8"),
                    np.frombuffer(bytes(r[10]), "<f4"), int(r[11]), np.frombuffer(bytes(r[12]), "<f4"), r[13],
                )  # fmt: skip
                current = ExportRow(decision, [])
            current.outcomes.append(Outcome(r[0], r[14], float(r[15]), r[16], r[17], r[18], float(r[19])))
        if current is not None:
            yield current

    def close(self) -> None:  # pragma: no cover - each store has its own
        raise NotImplementedError


class SqliteStore(SqlStore):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=WAIT_S)
        self._db.execute("PRAGMA journal_mode=WAL")
        # An outcome is acknowledged only after its transaction commits; FULL makes that commit
        # survive a power loss too, not only a killed process (outcomes are few, this is cheap).
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in self.schema():
            self._db.execute(statement)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Any]:
        """A read (`write=False`) takes no write lock: in WAL mode it then never waits for, nor holds
        up, a writer (an export beside a live server)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield cur
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                kind = (
                    StoreRejected
                    if isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError)
                    else StoreError
                )
                raise kind(f"sqlite {self.path}: {exc}") from exc
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


# libpq: a connection whose server stops answering is dropped after about WAIT_S.
NO_HANG = {
    "connect_timeout": int(WAIT_S),
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": int(WAIT_S * 1000),
}


def _statement_timeout(conn: Any) -> None:
    conn.execute(f"SET statement_timeout = {int(WAIT_S * 1000)}")
    conn.commit()


class PostgresStore(SqlStore):
    MARK = "%s"
    SERIAL = "BIGSERIAL PRIMARY KEY"
    BLOB = "BYTEA"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        try:
            # One plain connection first: the pool would only say that it timed out, where this
            # names the cause (refused, unknown host, wrong password, no such database).
            psycopg.connect(url, connect_timeout=int(WAIT_S)).close()
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=4,
                open=True,
                timeout=WAIT_S,
                kwargs=NO_HANG,
                configure=_statement_timeout,
            )
            with self.transaction() as cur:
                for statement in self.schema():
                    cur.execute(statement)
        except Exception as exc:  # psycopg raises its own types for an unreachable server
            raise StoreError(redacted(url, exc)) from exc

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Any]:
        import psycopg

        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise StoreRejected(f"postgresql: {exc}") from exc
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(f"postgresql: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise StoreError(f"postgresql: {exc}") from exc
            raise

    def close(self) -> None:
        self._pool.close()


def _features(blob: Any) -> np.ndarray:
    """A decision's stored features; empty (so never learnt from) where the bytes are not float32s,
    for one unreadable row must not stop every replica's sync at it."""
    raw = bytes(blob)
    if len(raw) % 4:
        return np.empty(0, dtype=np.float32)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def shown(url: str) -> str:
    """`url` fit for a message or a log: without its password, in the user part or the query
    (libpq takes `?password=...` as well as `user:password@`)."""
    parsed = urlparse(url)
    query = parse_qsl(parsed.query, keep_blank_values=True)
    in_query = any(key == "password" for key, _ in query)
    if parsed.password is None and not in_query:
        return url  # as given (a round trip would rewrite sqlite:///PATH)
    if parsed.password is not None:
        host = parsed.netloc.rpartition("@")[2]
        parsed = parsed._replace(netloc=f"{parsed.username or ''}:***@{host}")
    if in_query:
        masked = [(key, "***" if key == "password" else value) for key, value in query]
        parsed = parsed._replace(query=urlencode(masked, safe="*"))
    return parsed.geturl()


def redacted(url: str, exc: BaseException) -> str:
    """`url` and what went wrong with it, fit for a message or a log: no password in either."""
    return f"{shown(url)}: {_without_password(str(exc), url)}"


def _without_password(message: str, url: str) -> str:
    parsed = urlparse(url)
    passwords = [parsed.password] + [v for k, v in parse_qsl(parsed.query) if k == "password"]
    for password in filter(None, passwords):
        message = message.replace(password, "***")
    return message


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL (sqlite://x.sqlite: relative); None for other schemes."""
    if urlparse(url).scheme != "sqlite":
        return None
    path = url[len("sqlite://") :]
    if not url.startswith("sqlite://") or not path.strip("/"):  # sqlite:/x would lose its first letter
        raise StoreError(f"{url}: give a file, as sqlite:///path/to/file.sqlite")
    return Path(path)


def open_store(url: str, *, create: bool = True) -> SqlStore:
    """A store from `sqlite:///PATH` or `postgresql://...`; StoreError if it cannot be opened.
    Readers of a store (export, training) pass create=False: a mistyped path is then an error,
    not a new empty store."""
    path = sqlite_path(url)
    if path is not None:
        if not create and not path.is_file():
            raise StoreError(f"{url}: no such file")
        try:
            return SqliteStore(path)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{url}: {exc}") from exc
    if urlparse(url).scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    raise StoreError(f"{shown(url)}: the feedback store must be sqlite:///PATH or postgresql://...")
