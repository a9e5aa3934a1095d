"""The index's schema as numbered migrations, applied in order when a node starts.

``schema_version`` records each one applied. An index made before migrations were numbered
(its tables exist, ``schema_version`` does not) is version 1 and upgrades in place. Nodes that
start at once on a shared PostgreSQL index take turns (an advisory lock), so each migration
runs once. A migration is never edited once released: a change is a new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ie_gateway.errors import StoreError
from ie_gateway.store.db import Database, SQLite, Tx

log = structlog.get_logger(__name__)

BASELINE = """
CREATE TABLE IF NOT EXISTS series (
    id {id},
    series_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    header TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    first_at {real} NOT NULL,
    last_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id {id},
    series_id {bigint} NOT NULL REFERENCES series(id),
    state TEXT NOT NULL,
    reason TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    late_instances INTEGER NOT NULL DEFAULT 0,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    last_instance_at {real} NOT NULL,
    completed_at {real},
    routes TEXT,
    model TEXT,
    model_version TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_id {bigint} NOT NULL REFERENCES series(id),
    job_id {bigint} NOT NULL REFERENCES jobs(id),
    path TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    size {bigint} NOT NULL,
    received_at {real} NOT NULL,
    missing INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_id);
CREATE TABLE IF NOT EXISTS transitions (
    job_id {bigint} NOT NULL REFERENCES jobs(id),
    at {real} NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    who TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id {id},
    job_id {bigint} NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at {real} NOT NULL,
    created_at {real} NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    UNIQUE (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_at);
CREATE TABLE IF NOT EXISTS attempts (
    outbox_id {bigint} NOT NULL REFERENCES outbox(id),
    at {real} NOT NULL,
    status INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS agreement (
    ct_job {bigint} NOT NULL,
    approval_job {bigint} NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    structure TEXT NOT NULL,
    at {real} NOT NULL,
    tolerance_mm {real} NOT NULL,
    dice {real} NOT NULL,
    hd95_mm {real},
    msd_mm {real},
    surface_dice {real} NOT NULL,
    volume_ai_cc {real} NOT NULL,
    volume_approved_cc {real} NOT NULL,
    volume_diff_pct {real},
    PRIMARY KEY (ct_job, model, model_version, structure)
);
CREATE INDEX IF NOT EXISTS agreement_trend ON agreement(model, model_version, structure, at)
"""


def _baseline(db: Database, tx: Tx) -> None:
    _script(tx, BASELINE.format(**db.types))
    if "who" not in db.columns("transitions"):  # an index made before admins' actions were recorded by name
        tx.execute("ALTER TABLE transitions ADD COLUMN who TEXT")


def _leases(db: Database, tx: Tx) -> None:
    """Several workers: a job and a delivery are held by one node at a time, under a lease it
    renews; transitions get an id (their order) that both databases keep."""
    real = db.types["real"]
    for table in ("jobs", "outbox"):
        tx.execute(f"ALTER TABLE {table} ADD COLUMN claimed_by TEXT")
        tx.execute(f"ALTER TABLE {table} ADD COLUMN lease_until {real}")
    if isinstance(db, SQLite):  # SQLite cannot add a key column: copy, keeping the rowid order
        tx.execute(
            "CREATE TABLE transitions_v2 (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id), "
            "at REAL NOT NULL, from_state TEXT, to_state TEXT NOT NULL, reason TEXT, who TEXT)"
        )
        tx.execute(
            "INSERT INTO transitions_v2 (id, job_id, at, from_state, to_state, reason, who) "
            "SELECT rowid, job_id, at, from_state, to_state, reason, who FROM transitions ORDER BY rowid"
        )
        tx.execute("DROP TABLE transitions")
        tx.execute("ALTER TABLE transitions_v2 RENAME TO transitions")
    else:
        tx.execute(f"ALTER TABLE transitions ADD COLUMN id {db.types['id']}")
    tx.execute("CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id, id)")
    tx.execute("CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id)")
    tx.execute("CREATE INDEX IF NOT EXISTS instances_job ON instances(job_id)")


def _stage_attempts(db: Database, tx: Tx) -> None:
    """Crash loops cut: how often each stage of a job was started, and how often it died with
    the process (started, never ended); ``running`` marks an attempt in progress."""
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS stage_attempts (job_id {db.types['bigint']} NOT NULL REFERENCES jobs(id), "
        "stage TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0, "
        "running INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job_id, stage))"
    )


def _priority(db: Database, tx: Tx) -> None:
    """Today's patient first: a job's priority rank (0 high, 1 normal, 2 low), set when it is
    routed, orders the claims."""
    tx.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 1")


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[Database, Tx], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "series, jobs, instances, transitions, outbox, attempts, agreement", _baseline),
    Migration(2, "job and delivery leases for several workers; transition ids", _leases),
    Migration(3, "attempts and crashes per job and stage", _stage_attempts),
    Migration(4, "job priority (high, normal, low) for the claim order", _priority),
)
LATEST = MIGRATIONS[-1].version


def migrate(db: Database) -> int:
    """Bring the schema to the latest version; return the version it was at."""
    with db.tx() as tx:
        db.migration_lock(tx)
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at {db.types['real']} NOT NULL, what TEXT NOT NULL)"
        )
        row = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current == 0 and "jobs" in db.table_names():
            current = _adopt_unversioned(db, tx)
        if current > LATEST:
            raise StoreError(
                f"the index is at schema version {current}, newer than this node's {LATEST}: "
                "a newer ie-gateway has used it; upgrade this node"
            )
        for m in MIGRATIONS:
            if m.version > current:
                m.apply(db, tx)
                tx.execute(
                    "INSERT INTO schema_version (version, applied_at, what) VALUES (?, ?, ?)",
                    (m.version, time.time(), m.what),
                )
                log.info("index migrated", version=m.version, what=m.what, database=db.where)
    return current


def _adopt_unversioned(db: Database, tx: Tx) -> int:
    """An index from before numbered migrations: the baseline, completed, is version 1."""
    _baseline(db, tx)
    tx.execute(
        "INSERT INTO schema_version (version, applied_at, what) VALUES (1, ?, ?)",
        (time.time(), "adopted an index made before numbered migrations"),
    )
    return 1


def _script(tx: Tx, sql: str) -> None:
    for statement in sql.split(";"):
        if statement.strip():
            tx.execute(statement)
