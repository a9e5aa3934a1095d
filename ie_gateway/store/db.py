"""The index's database: SQLite (the embedded default) or PostgreSQL (several nodes share it).

The store writes its SQL once, in the subset both speak (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``); this module hides what differs: connections, how a write transaction takes
its lock, column types in the schema, row locks for claims and the locks that keep a
scheduled task on one node at a time.

SQLite runs in WAL mode with synchronous=NORMAL: a commit is not fsynced, and need not be,
because an instance file is made durable before its row is written and start-up indexes any
file that has no row. A transaction that decides what is sent (a job's transitions, the
output UIDs, outbox rows queued or delivered) asks for ``tx(durable=True)``: synchronous=FULL
for that commit, so a power cut cannot undo it after its effect left the node (a result
re-sent under new UIDs, a delivered row sent again). Each thread gets its own connection; writers serialise on SQLite's lock
(BEGIN IMMEDIATE, busy timeout). An SQLite index belongs to one node.

PostgreSQL is chosen by a ``postgresql://`` URL (``storage.index``); the password never sits
in the YAML: libpq reads ``PGPASSWORD`` or a ``PGPASSFILE``. Each thread gets its own
connection; claims lock rows with ``FOR UPDATE SKIP LOCKED``, singletons take advisory locks.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ie_gateway.errors import StoreError


class Cursor(Protocol):
    """What the store reads from an executed statement (sqlite3's and psycopg's cursors)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """A transaction in progress: statements in the store's SQL."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...


class Database(ABC):
    """One index database, shared by the threads of a process."""

    #: whether several nodes may share it (claims and leases then matter across processes)
    shared: bool
    #: appended to a SELECT that claims rows: skip rows another node has locked
    skip_locked: str
    #: column types of the schema
    types: ClassVar[dict[str, str]]

    def __init__(self) -> None:
        self._local = threading.local()

    @abstractmethod
    def tx(self, durable: bool = False) -> AbstractContextManager[Tx]:
        """A write transaction, committed when the block ends, rolled back if it raises;
        ``durable``: on disk when the block ends, whatever the database's default."""

    @abstractmethod
    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read (its own short transaction)."""

    @abstractmethod
    def singleton(self, name: str) -> AbstractContextManager[bool]:
        """Whether this process holds the named lock for the block (False: another node runs it)."""

    def now(self) -> float:
        """The time leases are judged by: the database server's clock where several nodes share
        it (their own clocks may differ by seconds), this machine's otherwise."""
        return time.time()

    @abstractmethod
    def migration_lock(self, tx: Tx) -> None:
        """Serialise schema migrations of nodes starting at once (inside ``tx``)."""

    @abstractmethod
    def table_names(self) -> set[str]:
        """Tables that exist in the database now."""

    @abstractmethod
    def columns(self, table: str) -> set[str]:
        """Column names of ``table``."""

    def close(self) -> None:
        """Close this thread's connection (both backends keep one per thread in ``_local``)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @property
    @abstractmethod
    def where(self) -> str:
        """The database in words for logs and `status`, without a password."""


def open_database(index: str, root: Path) -> Database:
    """The database ``storage.index`` names: ``sqlite`` (a file under ``root``) or a
    ``postgresql://`` URL."""
    if index == "sqlite":
        return SQLite(root / "index.sqlite3")
    if index.startswith(("postgresql://", "postgres://")):
        return Postgres(index)
    raise StoreError(f"storage.index must be 'sqlite' or a postgresql:// URL, not {index!r}")


class SQLite(Database):
    """The embedded index: one file beside the spool."""

    shared = False
    skip_locked = ""
    types: ClassVar[dict[str, str]] = {"id": "INTEGER PRIMARY KEY", "real": "REAL", "bigint": "INTEGER"}

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self, durable: bool = False) -> Iterator[Tx]:
        db = self._conn()
        try:
            if durable:
                db.execute("PRAGMA synchronous=FULL")  # only between transactions
            db.execute("BEGIN IMMEDIATE")  # the write lock at once: no upgrade deadlocks
        except sqlite3.Error as exc:
            raise StoreError(f"index unavailable: {exc}") from exc
        try:
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            raise StoreError(f"index write failed: {exc}") from exc
        except BaseException:
            _rollback(db)
            raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"index unavailable: {exc}") from exc

    @contextmanager
    def singleton(self, name: str) -> Iterator[bool]:
        # one node, but maybe several processes (a CLI command beside the service): a file lock
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=False):
            yield False
            return
        try:
            with open(self.path.with_name(f"{self.path.name}.{name}.lock"), "w") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                yield True
        finally:
            lock.release()

    def migration_lock(self, tx: Tx) -> None:
        pass  # BEGIN IMMEDIATE already holds the only write lock

    def table_names(self) -> set[str]:
        return {r[0] for r in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.query(f"PRAGMA table_info({table})")}

    @property
    def where(self) -> str:
        return f"sqlite {self.path}"


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back what is still open: a COMMIT that failed on a full disk has rolled back already."""
    if db.in_transaction:
        db.execute("ROLLBACK")


class Postgres(Database):
    """A PostgreSQL index that receivers and workers on several machines share."""

    shared = True
    skip_locked = " FOR UPDATE SKIP LOCKED"
    types: ClassVar[dict[str, str]] = {
        "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "real": "DOUBLE PRECISION",
        "bigint": "BIGINT",
    }

    def __init__(self, url: str) -> None:
        super().__init__()
        import psycopg  # only a node on PostgreSQL needs the driver loaded

        self._psycopg = psycopg
        self.url = url

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            except self._psycopg.Error as exc:
                raise StoreError(f"index unavailable: {_first_line(exc)}") from exc
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self, durable: bool = False) -> Iterator[Tx]:
        conn = self._conn()  # a commit is durable here already (synchronous_commit on)
        try:
            with conn.transaction():
                yield _PgTx(conn)
        except self._psycopg.OperationalError as exc:
            self.close()  # a broken connection is opened afresh next time
            raise StoreError(f"index unavailable: {_first_line(exc)}") from exc
        except self._psycopg.Error as exc:
            raise StoreError(f"index write failed: {_first_line(exc)}") from exc

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(self._conn().execute(_pg(sql), tuple(args)).fetchall())
        except self._psycopg.OperationalError as exc:
            self.close()
            raise StoreError(f"index unavailable: {_first_line(exc)}") from exc
        except self._psycopg.Error as exc:
            raise StoreError(f"index read failed: {_first_line(exc)}") from exc

    @contextmanager
    def singleton(self, name: str) -> Iterator[bool]:
        # a session lock on a connection of its own, so the task's own statements are free to
        # commit; a node that dies loses its connection and with it the lock
        key = _lock_key(name)
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as exc:
            raise StoreError(f"index unavailable: {_first_line(exc)}") from exc
        with conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            held = bool(row and row[0])
            try:
                yield held
            finally:
                if held and not conn.closed:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def now(self) -> float:
        return float(self.query("SELECT EXTRACT(EPOCH FROM clock_timestamp())")[0][0])

    def migration_lock(self, tx: Tx) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key("schema-migration"),))

    def table_names(self) -> set[str]:
        rows = self.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return {r[0] for r in rows}

    def columns(self, table: str) -> set[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (table,),
        )
        return {r[0] for r in rows}

    @property
    def where(self) -> str:
        info = self._psycopg.conninfo.conninfo_to_dict(self.url)
        return f"postgresql {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class _PgTx:
    """A psycopg connection in a transaction, taking the store's ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        cursor: Cursor = self._conn.execute(_pg(sql), tuple(args))
        return cursor


def _pg(sql: str) -> str:
    """The store's SQL in psycopg's parameter style (the store's SQL has no literal ``?`` or ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a task name."""
    return int.from_bytes(hashlib.sha256(f"ie_gateway:{name}".encode()).digest()[:8], "big", signed=True)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def node_name() -> str:
    """This process as `status` names the holder of a job: host and process id."""
    return f"{os.uname().nodename}:{os.getpid()}"
