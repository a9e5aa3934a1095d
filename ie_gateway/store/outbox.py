"""The outbox: one row per (result file, destination), retried until delivered or dead-lettered.

Rows are inserted once per SOP Instance UID and destination, so writing a job's results again
after a crash never queues a second copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ie_gateway.store.index import Index


@dataclass(frozen=True)
class OutboxRow:
    """One pending delivery."""

    id: int
    job_id: int
    destination: str
    path: str
    sop_uid: str
    sop_class: str
    attempts: int
    created_at: float


PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"


class Outbox:
    """Queue operations over the index's `outbox` and `attempts` tables."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def enqueue(self, job_id: int, destination: str, path: str, sop_uid: str, sop_class: str) -> None:
        now = time.time()
        with self.index.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO outbox (job_id, destination, path, sop_uid, sop_class, next_at, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, destination, path, sop_uid, sop_class, now, now),
            )

    def due(self, now: float | None = None) -> dict[str, list[OutboxRow]]:
        """Pending rows whose next attempt is due, grouped by destination, oldest first."""
        rows = self.index.query(
            "SELECT id, job_id, destination, path, sop_uid, sop_class, attempts, created_at FROM outbox "
            "WHERE state = ? AND next_at <= ? ORDER BY id",
            (PENDING, now if now is not None else time.time()),
        )
        grouped: dict[str, list[OutboxRow]] = {}
        for r in rows:
            grouped.setdefault(r[2], []).append(OutboxRow(*r))
        return grouped

    def record(
        self,
        row: OutboxRow,
        status: int | None,
        error: str | None,
        *,
        delivered: bool,
        next_at: float | None = None,
        dead: bool = False,
    ) -> None:
        """Log an attempt; mark delivered, reschedule at ``next_at``, or dead-letter."""
        now = time.time()
        state = DELIVERED if delivered else FAILED if dead else PENDING
        with self.index.tx() as db:
            db.execute(
                "INSERT INTO attempts (outbox_id, at, status, error) VALUES (?, ?, ?, ?)", (row.id, now, status, error)
            )
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, next_at = ?, last_status = ?, "
                "last_error = ? WHERE id = ?",
                (state, next_at if next_at is not None else now, status, error, row.id),
            )

    def job_summary(self, job_id: int) -> dict[str, int]:
        """Counts of the job's rows by state."""
        rows = self.index.query("SELECT state, COUNT(*) FROM outbox WHERE job_id = ? GROUP BY state", (job_id,))
        return {r[0]: int(r[1]) for r in rows}

    def failures(self, job_id: int) -> list[tuple[str, int | None, str | None]]:
        """(destination, last status, last error) of the job's dead-lettered rows."""
        rows = self.index.query(
            "SELECT destination, last_status, last_error FROM outbox WHERE job_id = ? AND state = ?", (job_id, FAILED)
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def retry(self, job_id: int) -> int:
        """Put a job's dead-lettered rows back in the queue, due now; return how many."""
        now = time.time()
        with self.index.tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state = ?, attempts = 0, next_at = ?, created_at = ? WHERE job_id = ? AND state = ?",
                (PENDING, now, now, job_id, FAILED),
            )
            return int(cur.rowcount)

    def cancel(self, job_id: int) -> int:
        """Drop a job's undelivered rows (it is being routed again); return how many."""
        with self.index.tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state = ? WHERE job_id = ? AND state IN (?, ?)", (CANCELLED, job_id, PENDING, FAILED)
            )
            return int(cur.rowcount)
