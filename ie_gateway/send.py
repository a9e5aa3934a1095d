"""Delivery: C-STORE of result files to destinations, one association per destination batch.

Destinations are independent: each due destination is drained in its own thread, and a
destination already in a pass is skipped, so a peer that is down or hangs (bounded by its
``connect_timeout_s``) never delays another's deliveries.

A peer that refuses an output's SOP class (or every transfer syntax we offer for it) when the
association is negotiated will refuse it on every retry: that row is dead-lettered at once with
"TPS does not accept Segmentation Storage (refused at association)", and the other rows of the
batch go on. Any error the SCU raises for a row counts as a failed attempt, so no row retries
beyond ``max_attempts``.

The outbox is durable, so a retry survives restarts: each attempt is recorded with the peer's
status; the next is due after an exponential backoff with jitter (base·2^(n-1), capped, times a
random factor in [0.5, 1] so that a recovering TPS is not hit by every node at once); after
`max_attempts` or `max_age_s` the row is dead-lettered and the job fails with the peer's status.
The same SOP Instance UID is sent on every attempt: the files are written once.

That a peer took a file is recorded in the index: a write that finds the index full or away is
retried for as long as the pass holds the row's lease, so a peer is not sent a file twice because
the disk was full for a moment. A node that cannot record it within the lease sends the file again
once the lease lapses, with the same SOP Instance UID.

Several nodes may drain one outbox: a pass takes its destination's due rows under a lease as
long as the pass can last (the connection timeout plus the DIMSE timeout per file), so no two
nodes send a row at once, and a node that dies mid-pass leaves rows that go again afterwards.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pydicom
import structlog
from azure.core.exceptions import ClientAuthenticationError
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from ie_gateway import reactor
from ie_gateway.config import DeliverySettings, Destination
from ie_gateway.errors import CommitmentError, DeliveryError, StoreError, StowRefused
from ie_gateway.interop.commitment import STORAGE_COMMITMENT, Commitments, ReportAnswers, request_commitment, sop_name
from ie_gateway.interop.dicomweb import StowClient
from ie_gateway.log import scrub
from ie_gateway.ops import tls
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import LABEL_MAP_SEGMENTATION_STORAGE, OutboxRow
from ie_gateway.vocab import PeerProtocol

log = structlog.get_logger(__name__)

#: Seconds a peer may take to answer one C-STORE (and the network timeout of an association).
DIMSE_TIMEOUT_S = 60
# C-STORE warnings (coercion, elements discarded) still mean the peer has the instance.
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: The transfer syntaxes proposed for each output's SOP class, one presentation context each (so
#: the explicit one is accepted when offered); the conformance statement reads them from here.
PROPOSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Presentation context result 0x04 (PS3.8 9.3.3.2): the SOP class, but none of our syntaxes.
NO_TRANSFER_SYNTAX = 0x04
#: What the SCU may raise for one C-STORE (no accepted context, a file it cannot read or
#: encode, a connection dropped mid-PDU): each is one failed attempt of that row.
SCU_ERRORS = (ValueError, RuntimeError, OSError, AttributeError, pydicom.errors.InvalidDicomError)
#: Outputs written in a compressed syntax, sent as written: a LABELMAP SEG is RLE Lossless, and a
#: peer that cannot take that is told apart at association ("none of the transfer syntaxes").
FILE_SYNTAXES: dict[str, tuple[str, ...]] = {LABEL_MAP_SEGMENTATION_STORAGE: (RLELossless,)}
#: Seconds between tries to record that a peer took a file while the index is full or away,
#: doubling from the first to the last.
RECORD_RETRY_S = (0.5, 8.0)


def requested_contexts(sop_classes: Iterable[str], commitment: bool) -> list[PresentationContext]:
    """What a delivery association proposes for these SOP classes: one context per transfer
    syntax (so the explicit one is accepted when offered), and Storage Commitment Push Model to
    a destination that commits. The conformance statement reads them from here."""
    contexts = [
        build_context(sop_class, syntax)
        for sop_class in sorted(set(sop_classes))
        for syntax in FILE_SYNTAXES.get(sop_class, PROPOSED_SYNTAXES)
    ]
    if commitment:
        contexts.append(build_context(STORAGE_COMMITMENT))
    return contexts


def backoff_s(attempt: int, settings: DeliverySettings, rng: Callable[[], float] = random.random) -> float:
    """Seconds until attempt ``attempt + 1``: exponential, capped, with jitter in [0.5, 1]."""
    delay = min(settings.cap_s, settings.base_s * 2.0 ** max(attempt - 1, 0))
    return delay * (0.5 + 0.5 * rng())


def record_failure(
    outbox: Outbox, settings: DeliverySettings, row: OutboxRow, status: int | None, error: str, dead: bool = False
) -> None:
    """One failed attempt of ``row``: due again after its backoff, or dead-lettered after
    ``max_attempts`` or ``max_age_s`` (or at once when ``dead``)."""
    attempts = row.attempts + 1
    too_old = time.time() - row.created_at >= settings.max_age_s
    dead = dead or attempts >= settings.max_attempts or too_old
    next_at = time.time() + backoff_s(attempts, settings)
    outbox.record(row, status, error, delivered=False, next_at=next_at, dead=dead)
    if dead:
        log.error(
            "delivery dead-lettered",
            job=row.job_id,
            destination=row.destination,
            attempts=attempts,
            status=status,
            error=error,
        )


class Sender:
    """Drains the outbox: one thread per destination with due rows, at most one pass each.

    ``commitments`` reads the storage commitment reports of destinations with ``commitment:
    true``; the listener shares it for reports that come on a new association.
    """

    def __init__(
        self,
        destinations: dict[str, Destination],
        settings: DeliverySettings,
        outbox: Outbox,
        results_root: Path,
        node: str = "local",
        after_pass: Callable[[], None] = lambda: None,
    ) -> None:
        """``after_pass``: called when a pass over a destination ends (the worker's finish
        stage waits for the first attempt at a job's RT-STRUCTs)."""
        self.node = node
        self.after_pass = after_pass
        self.destinations = destinations
        self.settings = settings
        self.outbox = outbox
        self.results_root = results_root
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(destinations)), thread_name_prefix="deliver")
        self._busy: set[str] = set()
        self._lease_ends: dict[str, float] = {}  # monotonic end of each running pass's lease
        self._lock = threading.Lock()
        self._closing = False
        self.commitments = Commitments(outbox, destinations, self._fail_row, outbox.settle)

    def _fail_row(self, row: OutboxRow, status: int | None, error: str) -> None:
        self._failed(row, status, error)

    def deliver_due(self) -> list[Future[int]]:
        """Start a pass for every destination with due rows that is not in one already.

        Returns at once with the passes started (each future gives how many files it
        delivered), so the scheduler never waits on a slow peer.
        """
        self._expire_commitments()
        self.outbox.settle_sending()
        started = (self._start(name) for name in self.outbox.due_destinations())
        return [future for future in started if future is not None]

    def _start(self, name: str) -> Future[int] | None:
        """A pass over the destination's due rows, unless one runs or another node took them."""
        with self._lock:
            if name in self._busy:
                return None
            self._busy.add(name)
        claimed_at = time.monotonic()
        rows = self._claim(name)
        if not rows:  # another node took them first
            with self._lock:
                self._busy.discard(name)
            return None
        self._lease_ends[name] = claimed_at + self._lease_s(name, len(rows))
        return self._pool.submit(self._pass, name, rows)

    def _expire_commitments(self) -> None:
        """Rows whose commitment report never came count a failed attempt and go again."""
        for row in self.outbox.overdue_commitments():
            dest = self.destinations.get(row.destination)
            waited = f" within {dest.commitment_timeout_s:g} s" if dest is not None else ""
            self._failed(row, None, f"{row.destination}: no storage commitment report{waited}")
            self.outbox.settle(row.job_id)

    def _claim(self, name: str) -> list[OutboxRow]:
        """The destination's due rows, held for as long as a pass over them can last."""
        return self.outbox.claim_due(name, self.node, self._lease_s(name, 0), per_row_s=DIMSE_TIMEOUT_S)

    def _lease_s(self, name: str, rows: int) -> float:
        """How long a pass holds ``rows`` rows: the connection timeout plus the DIMSE timeout
        for each file."""
        dest = self.destinations.get(name)
        connect_s = dest.connect_timeout_s if dest is not None else 0.0
        return connect_s + DIMSE_TIMEOUT_S * rows

    def _record_taken(self, row: OutboxRow, write: Callable[[], None]) -> None:
        """Record that the peer took ``row``'s file (``write``). An index that is full or away
        for a moment must not make the peer get the file twice: the write is retried while
        this pass holds the row's lease, so that no other pass sends it meanwhile. Past the
        lease the error stands and the row goes again when the lease lapses."""
        wait, cap = RECORD_RETRY_S
        until = self._lease_ends.get(row.destination, 0.0)
        while True:
            try:
                write()
                return
            except StoreError as exc:
                if self._closing or time.monotonic() + wait >= until:
                    raise
                error = scrub(str(exc))
                log.warning(
                    "delivery not recorded yet; retrying",
                    job=row.job_id,
                    destination=row.destination,
                    error=error,
                    retry_in_s=wait,
                )
            time.sleep(wait)  # the destination's own thread: nothing else waits on it
            wait = min(2 * wait, cap)

    def close(self) -> None:
        """Let passes in flight finish (each is bounded by its timeouts); start no more."""
        self._closing = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _next_pass(self, name: str) -> None:
        """Rows queued while a pass ran (the next job's RT-STRUCT, behind this one's SEG) go
        now, not at the next interval."""
        if self._closing:
            return
        try:
            if name in self.outbox.due_destinations():
                self._start(name)
        except (StoreError, RuntimeError) as exc:  # the index is away, or the pool shut down: the interval retries
            log.warning("next delivery pass not started", destination=name, error=str(exc))

    def _pass(self, name: str, rows: list[OutboxRow]) -> int:
        recorded: set[int] = set()
        delivered = 0
        try:
            delivered = self._deliver(name, rows, recorded)
            return delivered
        except Exception as exc:  # the top of a delivery thread: every row gets its attempt recorded
            log.exception("delivery pass crashed", destination=name)
            for row in rows:
                if row.id not in recorded:
                    self._failed_unless_index_away(row, f"{name}: internal error {type(exc).__name__}: {exc}")
            return 0
        finally:
            with self._lock:
                self._busy.discard(name)
                self._lease_ends.pop(name, None)
            try:
                for job_id in sorted({r.job_id for r in rows}):
                    self.outbox.settle(job_id)  # delivered, or failed with the peer's status
            except StoreError as exc:  # deliver_due settles them at the next interval
                log.warning("jobs not settled", destination=name, error=scrub(str(exc)))
            if delivered == len(rows):  # a peer that failed a file waits for the interval
                self._next_pass(name)
            self.after_pass()

    def _failed_unless_index_away(self, row: OutboxRow, error: str) -> None:
        """A failed attempt, where the index can take it; where it cannot, the row's lease
        lapses and the row goes again."""
        try:
            self._failed(row, None, error)
        except StoreError as exc:
            log.warning("attempt not recorded; the row goes again", job=row.job_id, error=scrub(str(exc)))

    def _deliver(self, name: str, rows: list[OutboxRow], recorded: set[int]) -> int:
        dest = self.destinations.get(name)
        if dest is None:
            for row in rows:
                self._record_failed(recorded, row, None, f"destination {name} is not configured any more")
            return 0
        if dest.protocol is PeerProtocol.DICOMWEB:
            return self._deliver_stow(name, dest, rows, recorded)
        ae = AE(ae_title=self.settings.calling_ae)
        ae.network_timeout = ae.dimse_timeout = DIMSE_TIMEOUT_S
        # a peer that accepts the TCP connection but never answers the association request is
        # as good as down: connect_timeout_s bounds both waits
        ae.connection_timeout = ae.acse_timeout = dest.connect_timeout_s
        ae.requested_contexts = requested_contexts({r.sop_class for r in rows}, dest.commitment)
        # a peer may report commitment on this association: the rows are this destination's
        answers = ReportAnswers()

        def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
            answers.take()
            return self.commitments.on_event_report(event, name)

        handlers = [(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_DIMSE_SENT, answers.on_sent)]
        started = time.monotonic()
        tls_args = tls.associate_args(dest)  # pynetdicom hints str; None (no hostname check) is what ssl takes
        assoc = reactor.associate(
            ae, dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args, evt_handlers=handlers
        )
        refused = _refused_classes(assoc)
        for row in rows:
            if row.sop_class in refused:
                error = f"{name} does not accept {sop_name(row.sop_class)} ({refused[row.sop_class]})"
                self._record_failed(recorded, row, None, error, dead=True)
                log.error("output refused by destination", job=row.job_id, destination=name, error=error)
        rows = [r for r in rows if r.id not in recorded]
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "peer not reachable"
            for row in rows:
                self._record_failed(recorded, row, None, f"{name}: {reason}")
            if rows:
                log.warning("delivery deferred", destination=name, reason=reason, files=len(rows))
            return 0
        if dest.commitment and not _accepts(assoc, STORAGE_COMMITMENT):  # nothing sent could be committed
            for row in rows:
                error = f"{name} does not offer Storage Commitment (refused at association)"
                self._record_failed(recorded, row, None, error, dead=True)
            assoc.release()
            return 0
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        delivered = 0
        stored: list[OutboxRow] = []
        try:
            for row in rows:
                if not assoc.is_established:
                    self._record_failed(recorded, row, None, f"{name}: association lost")
                    continue
                delivered += self._send_one(assoc, name, row, dest, stored)
                recorded.add(row.id)
            if stored:
                self._request_commitment(assoc, name, dest, stored)
        finally:
            if assoc.is_established:
                answers.wait_answered()  # a report's rows settle before its response is out
                assoc.release()
        log.info(
            "delivery pass",
            destination=name,
            files=len(rows),
            delivered=delivered,
            seconds=round(time.monotonic() - started, 3),
        )
        return delivered

    def _deliver_stow(self, name: str, dest: Destination, rows: list[OutboxRow], recorded: set[int]) -> int:
        """STOW-RS each row's file; the same outcomes, retries and dead-letters as C-STORE."""
        started = time.monotonic()
        try:
            client = StowClient(name, dest, dest.connect_timeout_s + DIMSE_TIMEOUT_S)
        except (DeliveryError, ClientAuthenticationError) as exc:  # a credential that cannot be had
            for row in rows:
                self._record_failed(recorded, row, None, f"{name}: {exc}")
            return 0
        delivered = 0
        try:
            for row in rows:
                path = self.results_root / row.path
                recorded.add(row.id)
                if not path.is_file():
                    self._failed(row, None, f"result file {row.path} is missing", dead=True)
                    continue
                try:
                    client.store(path)
                except StowRefused as exc:
                    self._failed(row, exc.status, str(exc), dead=True)
                    log.error("output refused by destination", job=row.job_id, destination=name, error=str(exc))
                    continue
                except DeliveryError as exc:
                    self._failed(row, exc.status, str(exc))
                    continue
                self._record_taken(row, partial(self.outbox.record, row, 0, None, delivered=True))
                log.info("delivered", job=row.job_id, destination=name, attempt=row.attempts + 1, protocol="stow-rs")
                delivered += 1
        finally:
            client.close()
        log.info(
            "delivery pass",
            destination=name,
            files=len(rows),
            delivered=delivered,
            seconds=round(time.monotonic() - started, 3),
            protocol="stow-rs",
        )
        return delivered

    def _request_commitment(self, assoc: Association, name: str, dest: Destination, rows: list[OutboxRow]) -> None:
        """Ask for commitment of the files the peer took, then wait a little for the report
        on this association (a peer may send it later, on a new one)."""
        if not assoc.is_established:
            for row in rows:
                self._failed(row, None, f"{name}: association lost before the storage commitment request")
            return
        try:
            transaction = request_commitment(assoc, rows)
        except (CommitmentError, *SCU_ERRORS) as exc:
            for row in rows:
                self._failed(row, None, f"{name}: {exc}")
            return
        log.info("storage commitment requested", destination=name, files=len(rows), transaction=transaction)
        if dest.commitment_wait_s > 0:
            self.commitments.wait_settled(rows, dest.commitment_wait_s)

    def _send_one(
        self, assoc: Association, name: str, row: OutboxRow, dest: Destination, stored: list[OutboxRow]
    ) -> int:
        path = self.results_root / row.path
        if not path.is_file():
            self._failed(row, None, f"result file {row.path} is missing", dead=True)
            return 0
        try:
            rsp = assoc.send_c_store(path)
        except SCU_ERRORS as exc:
            self._failed(row, None, f"{name}: {type(exc).__name__}: {exc}")
            return 0
        status = int(rsp.Status) if "Status" in rsp else None
        if status in DELIVERED_STATUSES and dest.commitment:
            until = time.time() + dest.commitment_timeout_s
            self._record_taken(row, lambda: self.outbox.record_stored(row, status, until))
            stored.append(row)
            return 1
        if status in DELIVERED_STATUSES:
            self._record_taken(row, lambda: self.outbox.record(row, status, None, delivered=True))
            log.info("delivered", job=row.job_id, destination=name, attempt=row.attempts + 1)
            return 1
        error = f"{name} answered 0x{status:04X}" if status is not None else f"{name}: no response"
        self._failed(row, status, error)
        return 0

    def _record_failed(
        self, recorded: set[int], row: OutboxRow, status: int | None, error: str, dead: bool = False
    ) -> None:
        self._failed(row, status, error, dead=dead)
        recorded.add(row.id)

    def _failed(self, row: OutboxRow, status: int | None, error: str, dead: bool = False) -> None:
        record_failure(self.outbox, self.settings, row, status, error, dead)


def _accepts(assoc: Association, sop_class: str) -> bool:
    return any(str(cx.abstract_syntax) == sop_class for cx in assoc.accepted_contexts)


def _refused_classes(assoc: Association) -> dict[str, str]:
    """SOP classes the peer refused in negotiation (none of their contexts accepted), and why.

    pynetdicom aborts an association in which no context was accepted, but still records the
    peer's answer for each context, so a peer refusing everything is told apart from one that
    is down.
    """
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    refused: dict[str, str] = {}
    for cx in assoc.rejected_contexts:
        sop_class = str(cx.abstract_syntax)
        if sop_class not in accepted:
            refused[sop_class] = (
                "refused at association: none of the transfer syntaxes offered"
                if cx.result == NO_TRANSFER_SYNTAX
                else "refused at association"
            )
    return refused
