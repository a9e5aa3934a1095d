"""The outbox: one row per (result file, destination), retried until delivered or dead-lettered.

Rows are keyed by SOP Instance UID and destination, so writing a job's results again (after a
crash, or by the worker that took over a job) never queues a second copy, and every attempt
sends the same instance. A node takes a destination's due rows under a lease before sending
them, so two nodes never send the same row at once; a node that dies mid-pass loses its lease
and the rows are sent again, with the same UIDs, by whoever drains the outbox next.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import structlog

from ie_gateway.errors import TransitionError
from ie_gateway.log import scrub
from ie_gateway.store.index import Index
from ie_gateway.store.records import DeliveredBatch, OutboxRow, output_sop_class
from ie_gateway.vocab import JobState, OutboxState, OutputKind

#: a pass sends the planning system's RT-STRUCTs before the SEGs queued ahead of them
_RTSTRUCT = output_sop_class(OutputKind.RTSTRUCT)

log = structlog.get_logger(__name__)

ROW_COLUMNS = "id, job_id, destination, path, sop_uid, sop_class, attempts, created_at, state, last_status, last_error"


def _row(r: Any) -> OutboxRow:
    return OutboxRow(
        id=int(r[0]),
        job_id=int(r[1]),
        destination=str(r[2]),
        path=str(r[3]),
        sop_uid=str(r[4]),
        sop_class=str(r[5]),
        attempts=int(r[6]),
        created_at=float(r[7]),
        state=OutboxState(r[8]),
        last_status=r[9],
        last_error=r[10],
    )


class Outbox:
    """Queue operations over the index's `outbox` and `attempts` tables."""

    def __init__(self, index: Index) -> None:
        self.index = index  # settling moves the job's state
        self.db = index.db

    def enqueue(self, job_id: int, destination: str, path: str, sop_uid: str, sop_class: str) -> bool:
        """Queue a file for a destination, once per SOP Instance UID; False if it was queued before."""
        now = time.time()
        with self.db.tx(durable=True) as db:
            cur = db.execute(
                "INSERT INTO outbox (job_id, destination, path, sop_uid, sop_class, next_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_uid, destination) DO NOTHING",
                (job_id, destination, path, sop_uid, sop_class, now, now),
            )
            return cur.rowcount > 0

    def due_destinations(self, now: float | None = None) -> list[str]:
        """Destinations with a pending row due now that no node is sending."""
        now = now if now is not None else self.db.now()
        rows = self.db.query(
            "SELECT DISTINCT destination FROM outbox WHERE state = ? AND next_at <= ? "
            "AND (lease_until IS NULL OR lease_until < ?) ORDER BY destination",
            (OutboxState.PENDING.value, now, now),
        )
        return [str(r[0]) for r in rows]

    def claim_due(
        self, destination: str, node: str, lease_s: float, *, per_row_s: float = 0.0, now: float | None = None
    ) -> list[OutboxRow]:
        """Take the destination's due rows that no live lease holds, RT-STRUCTs first, each kind
        oldest first, for ``lease_s`` plus ``per_row_s`` for each row taken."""
        now = now if now is not None else self.db.now()
        with self.db.tx() as db:
            rows = db.execute(
                f"SELECT {ROW_COLUMNS} FROM outbox WHERE destination = ? AND state = ? AND next_at <= ? "
                "AND (lease_until IS NULL OR lease_until < ?) "
                "ORDER BY CASE WHEN sop_class = ? THEN 0 ELSE 1 END, id" + self.db.skip_locked,
                (destination, OutboxState.PENDING.value, now, now, _RTSTRUCT),
            ).fetchall()
            until = now + lease_s + per_row_s * len(rows)
            for r in rows:
                db.execute("UPDATE outbox SET claimed_by = ?, lease_until = ? WHERE id = ?", (node, until, r[0]))
        return [_row(r) for r in rows]

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
        """Log an attempt; mark delivered, reschedule at ``next_at``, or dead-letter; the lease ends."""
        now = time.time()
        state = OutboxState.DELIVERED if delivered else OutboxState.FAILED if dead else OutboxState.PENDING
        with self.db.tx(durable=state is not OutboxState.PENDING) as db:
            db.execute(
                "INSERT INTO attempts (outbox_id, at, status, error) VALUES (?, ?, ?, ?)", (row.id, now, status, error)
            )
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, next_at = ?, last_status = ?, "
                "last_error = ?, claimed_by = NULL, lease_until = NULL WHERE id = ?",
                (state.value, next_at if next_at is not None else now, status, error, row.id),
            )

    def record_stored(self, row: OutboxRow, status: int, wait_until: float) -> None:
        """The peer took the file; its commitment is awaited until ``wait_until``. Logged as an
        attempt; the attempt is counted when the commitment is settled."""
        now = time.time()
        with self.db.tx() as db:
            db.execute(
                "INSERT INTO attempts (outbox_id, at, status, error) VALUES (?, ?, ?, ?)",
                (row.id, now, status, "stored; storage commitment requested"),
            )
            db.execute(
                "UPDATE outbox SET state = ?, next_at = ?, last_status = ?, last_error = NULL, "
                "claimed_by = NULL, lease_until = NULL WHERE id = ?",
                (OutboxState.COMMITTING.value, wait_until, status, row.id),
            )

    def committing(self, destination: str, sop_uids: list[str]) -> list[OutboxRow]:
        """The destination's rows awaiting commitment among ``sop_uids``."""
        if not sop_uids:
            return []
        marks = ", ".join("?" for _ in sop_uids)
        rows = self.db.query(
            f"SELECT {ROW_COLUMNS} FROM outbox WHERE destination = ? AND state = ? AND sop_uid IN ({marks})",
            (destination, OutboxState.COMMITTING.value, *sop_uids),
        )
        return [_row(r) for r in rows]

    def committing_rows(self, ids: set[int]) -> list[OutboxRow]:
        """Those of the rows ``ids`` that still await commitment."""
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        rows = self.db.query(
            f"SELECT {ROW_COLUMNS} FROM outbox WHERE state = ? AND id IN ({marks})",
            (OutboxState.COMMITTING.value, *sorted(ids)),
        )
        return [_row(r) for r in rows]

    def overdue_commitments(self, now: float | None = None) -> list[OutboxRow]:
        """Rows whose commitment report did not come in time."""
        now = now if now is not None else time.time()
        rows = self.db.query(
            f"SELECT {ROW_COLUMNS} FROM outbox WHERE state = ? AND next_at <= ? ORDER BY id",
            (OutboxState.COMMITTING.value, now),
        )
        return [_row(r) for r in rows]

    def job_rows(self, job_id: int) -> list[OutboxRow]:
        """Every delivery of a job, in the order queued."""
        return [
            _row(r) for r in self.db.query(f"SELECT {ROW_COLUMNS} FROM outbox WHERE job_id = ? ORDER BY id", (job_id,))
        ]

    def job_summary(self, job_id: int) -> dict[OutboxState, int]:
        """Counts of the job's rows by state."""
        rows = self.db.query("SELECT state, COUNT(*) FROM outbox WHERE job_id = ? GROUP BY state", (job_id,))
        return {OutboxState(r[0]): int(r[1]) for r in rows}

    def counts(self) -> dict[OutboxState, int]:
        """Counts of every row by state."""
        return {
            OutboxState(r[0]): int(r[1]) for r in self.db.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        }

    def attempt_count(self) -> int:
        """C-STORE attempts ever recorded."""
        return int(self.db.query("SELECT COUNT(*) FROM attempts")[0][0])

    def failures(self, job_id: int) -> list[OutboxRow]:
        """The job's dead-lettered rows (destination, last status and error)."""
        return [r for r in self.job_rows(job_id) if r.state is OutboxState.FAILED]

    def has_sop(self, sop_uid: str) -> bool:
        """Whether the node queued this SOP Instance (it is one of our results)."""
        return bool(self.db.query("SELECT 1 FROM outbox WHERE sop_uid = ? LIMIT 1", (sop_uid,)))

    def delivered_batches(self) -> list[DeliveredBatch]:
        """Per job and destination: files delivered and when the last one went."""
        rows = self.db.query(
            "SELECT o.job_id, o.destination, COUNT(DISTINCT o.id), MAX(a.at) FROM outbox o "
            "JOIN attempts a ON a.outbox_id = o.id WHERE o.state = ? GROUP BY o.job_id, o.destination",
            (OutboxState.DELIVERED.value,),
        )
        return [DeliveredBatch(int(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    def retry(self, job_id: int) -> int:
        """Put a job's dead-lettered rows back in the queue, due now; return how many."""
        now = time.time()
        with self.db.tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state = ?, attempts = 0, next_at = ?, created_at = ? WHERE job_id = ? AND state = ?",
                (OutboxState.PENDING.value, now, now, job_id, OutboxState.FAILED.value),
            )
            return int(cur.rowcount)

    def cancel(self, job_id: int) -> int:
        """Drop a job's undelivered rows (it is being routed again); return how many."""
        with self.db.tx() as db:
            cur = db.execute(
                "UPDATE outbox SET state = ? WHERE job_id = ? AND state IN (?, ?, ?)",
                (
                    OutboxState.CANCELLED.value,
                    job_id,
                    OutboxState.PENDING.value,
                    OutboxState.FAILED.value,
                    OutboxState.COMMITTING.value,
                ),
            )
            return int(cur.rowcount)

    def settle_sending(self) -> None:
        """Settle every job in ``sending`` whose rows are all final: a settle that found the
        index full or away at the end of a pass is made at the next interval instead."""
        rows = self.db.query(
            "SELECT j.id FROM jobs j WHERE j.state = ? AND NOT EXISTS "
            "(SELECT 1 FROM outbox o WHERE o.job_id = j.id AND o.state IN (?, ?)) ORDER BY j.id",
            (JobState.SENDING.value, OutboxState.PENDING.value, OutboxState.COMMITTING.value),
        )
        for (job_id,) in rows:  # only jobs with nothing left to send: one query per interval
            self.settle(int(job_id))

    def settle(self, job_id: int) -> None:
        """After a delivery pass, or once the write stage has queued every file: a job whose every row is delivered is done; one with a
        dead-lettered row has failed, with the peer's status as the reason."""
        job = self.index.job(job_id)
        if job.state is not JobState.SENDING:
            return
        counts = self.job_summary(job_id)
        if counts.get(OutboxState.PENDING) or counts.get(OutboxState.COMMITTING):
            return
        failures = self.failures(job_id)
        done = counts.get(OutboxState.DELIVERED, 0)
        try:
            if failures:
                first = failures[0]
                more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
                delivered = f"; {done} other file(s) delivered" if done else ""
                self.index.transition(
                    job_id,
                    JobState.FAILED,
                    reason=f"delivery to {first.destination} failed: {scrub(str(first.last_error))}{more}{delivered}",
                )
                return
            self.index.update_detail(job_id, lambda d: replace(d, deliveries=done))
            shadow = "shadow route: results kept on the node, nothing sent" if not counts else None
            self.index.transition(job_id, JobState.DELIVERED, reason=shadow)
        except TransitionError:
            return  # the worker and the outbox both settle; the other one got there first
        log.info("job delivered", job=job_id, files=done)
