"""Delivery: C-STORE of result files to destinations, one association per destination batch.

The outbox is durable, so a retry survives restarts: each attempt is recorded with the peer's
status; the next is due after an exponential backoff with jitter (base·2^(n-1), capped, times a
random factor in [0.5, 1] so that a recovering TPS is not hit by every node at once); after
`max_attempts` or `max_age_s` the row is dead-lettered and the job fails with the peer's status.
The same SOP Instance UID is sent on every attempt: the files are written once.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ie_gateway import tls
from ie_gateway.config import DeliverySettings, Destination
from ie_gateway.store.outbox import Outbox, OutboxRow

log = structlog.get_logger(__name__)

# C-STORE warnings (coercion, elements discarded) still mean the peer has the instance.
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def backoff_s(attempt: int, settings: DeliverySettings, rng: Callable[[], float] = random.random) -> float:
    """Seconds until attempt ``attempt + 1``: exponential, capped, with jitter in [0.5, 1]."""
    delay = min(settings.cap_s, settings.base_s * 2 ** max(attempt - 1, 0))
    return delay * (0.5 + 0.5 * rng())


class Sender:
    """Drains the outbox for every destination that has due rows."""

    def __init__(self, destinations: dict[str, Destination], settings: DeliverySettings,
                 outbox: Outbox, results_root: Path,
                 on_settled: Callable[[int], None] | None = None) -> None:
        self.destinations = destinations
        self.settings = settings
        self.outbox = outbox
        self.results_root = results_root
        self.on_settled = on_settled or (lambda job_id: None)

    def deliver_due(self) -> int:
        """One pass over the due rows; returns how many were delivered."""
        delivered = 0
        for name, rows in self.outbox.due().items():
            delivered += self._deliver(name, rows)
            for job_id in sorted({r.job_id for r in rows}):
                self.on_settled(job_id)
        return delivered

    def _deliver(self, name: str, rows: list[OutboxRow]) -> int:
        dest = self.destinations.get(name)
        if dest is None:
            for row in rows:
                self._failed(row, None, f"destination {name} is not configured any more")
            return 0
        ae = AE(ae_title=self.settings.calling_ae)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        for sop_class in sorted({r.sop_class for r in rows}):
            # one context per transfer syntax, so the explicit one is accepted when offered
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
            ae.add_requested_context(sop_class, ImplicitVRLittleEndian)
        started = time.monotonic()
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls.associate_args(dest))
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "peer not reachable"
            for row in rows:
                self._failed(row, None, f"{name}: {reason}")
            log.warning("delivery deferred", destination=name, reason=reason, files=len(rows))
            return 0
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        delivered = 0
        try:
            for row in rows:
                if not assoc.is_established:
                    self._failed(row, None, f"{name}: association lost")
                    continue
                delivered += self._send_one(assoc, name, row)
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("delivery pass", destination=name, files=len(rows), delivered=delivered,
                 seconds=round(time.monotonic() - started, 3))
        return delivered

    def _send_one(self, assoc: object, name: str, row: OutboxRow) -> int:
        path = self.results_root / row.path
        if not path.is_file():
            self._failed(row, None, f"result file {row.path} is missing", dead=True)
            return 0
        rsp = assoc.send_c_store(path)  # type: ignore[attr-defined]
        status = int(rsp.Status) if "Status" in rsp else None
        if status in DELIVERED_STATUSES:
            self.outbox.record(row, status, None, delivered=True)
            log.info("delivered", job=row.job_id, destination=name, attempt=row.attempts + 1)
            return 1
        error = f"{name} answered 0x{status:04X}" if status is not None else f"{name}: no response"
        self._failed(row, status, error)
        return 0

    def _failed(self, row: OutboxRow, status: int | None, error: str, dead: bool = False) -> None:
        attempts = row.attempts + 1
        too_old = time.time() - row.created_at >= self.settings.max_age_s
        dead = dead or attempts >= self.settings.max_attempts or too_old
        next_at = time.time() + backoff_s(attempts, self.settings)
        self.outbox.record(row, status, error, delivered=False, next_at=next_at, dead=dead)
        if dead:
            log.error("delivery dead-lettered", job=row.job_id, destination=row.destination,
                      attempts=attempts, status=status, error=error)
