"""Storage Commitment Push Model (PS3.4 Annex J), both ways.

**Asking a destination** (``commitment: true``): after the C-STOREs of a pass the sender asks,
on the same association, for commitment of the files the peer took (N-ACTION), and the rows
wait as ``committing``. The peer's answer (N-EVENT-REPORT) may come on that association, while
the sender waits ``commitment_wait_s`` before releasing it, or later on a new association to the
node's listener (the destination's AE title must then be an allowed caller): either way
:class:`Commitments` reads it. A committed row is delivered; a row the peer did not commit
(its failure reason named) or that got no report within ``commitment_timeout_s`` counts as a
failed attempt and is sent again after its backoff, so a job is ``delivered`` only once the
peer has committed every file.

**Answering a caller**: the node's listener offers Storage Commitment Push Model as SCP and
commits only instances whose file and index row are in the spool (what a C-STORE Success
already promised); others are listed as failed, "no such object instance". The report goes on
the caller's association, after the N-ACTION response; a caller that releases at once gets no
report (the node does not open associations to callers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP

from ie_gateway.config import Destination
from ie_gateway.errors import CommitmentError, UnsafeUIDError
from ie_gateway.store import Store, check_uid
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import LABEL_MAP_SEGMENTATION_STORAGE, OutboxRow

log = structlog.get_logger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
#: The well-known SOP Instance of the Storage Commitment Push Model.
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type IDs
#: PS3.4 J.3.2.1.1 failure reasons the node gives or names.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}
NO_SUCH_INSTANCE, CLASS_CONFLICT = 0x0112, 0x0119
#: N-ACTION / N-EVENT-REPORT statuses (PS3.7 Annex C).
SUCCESS, INVALID_ARGUMENT, NO_SUCH_ACTION, PROCESSING_FAILURE = 0x0000, 0x0115, 0x0123, 0x0110
#: More references than this in one request are refused: a hostile caller cannot make the
#: node build an unbounded report.
MAX_REFERENCES = 100_000
#: How long the report thread waits for pynetdicom to send the N-ACTION response.
RESPONSE_SENT_S = 30.0

#: Where a failed commitment goes: the sender's retry-or-dead-letter of one row.
FailRow = Callable[[OutboxRow, int | None, str], None]


def sop_name(sop_class: str) -> str:
    """The SOP class's name for an admin; pydicom 3.0 names all we send but the LABELMAP SEG."""
    return "Label Map Segmentation Storage" if sop_class == LABEL_MAP_SEGMENTATION_STORAGE else UID(sop_class).name


def reason_text(code: int | None) -> str:
    if code is None:
        return "no failure reason given"
    return f"{FAILURE_REASONS.get(code, 'failure')} (0x{code:04X})"


@dataclass(frozen=True)
class Reference:
    """One SOP instance named in a commitment request or report."""

    sop_class: str
    sop_uid: str
    failure: int | None = None

    def item(self) -> Dataset:
        ds = Dataset()
        ds.ReferencedSOPClassUID = self.sop_class
        ds.ReferencedSOPInstanceUID = self.sop_uid
        if self.failure is not None:
            ds.FailureReason = self.failure
        return ds


def references(info: Dataset, keyword: str) -> list[Reference]:
    """The items of ``keyword`` (ReferencedSOPSequence, FailedSOPSequence), checked: UIDs that
    could name a file, at most MAX_REFERENCES. CommitmentError otherwise."""
    try:
        items = info.get(keyword) or []
        if len(items) > MAX_REFERENCES:
            raise CommitmentError(f"{len(items)} references in {keyword}, more than {MAX_REFERENCES}")
        found = []
        for item in items:
            sop_class, sop_uid = str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)
            check_uid(sop_class, "ReferencedSOPClassUID")
            check_uid(sop_uid, "ReferencedSOPInstanceUID")
            failure = item.get("FailureReason")
            found.append(Reference(sop_class, sop_uid, int(failure) if failure is not None else None))
        return found
    except (AttributeError, KeyError, TypeError, ValueError, UnsafeUIDError) as exc:  # pydicom parses lazily
        raise CommitmentError(f"{keyword} cannot be read: {exc}") from exc


def transaction_uid(info: Dataset) -> str:
    try:
        uid = str(info.TransactionUID)
        check_uid(uid, "TransactionUID")
    except (AttributeError, KeyError, TypeError, ValueError, UnsafeUIDError) as exc:
        raise CommitmentError(f"no readable TransactionUID: {exc}") from exc
    return uid


def request_commitment(assoc: Association, rows: Sequence[OutboxRow]) -> str:
    """Ask the peer to commit ``rows`` (N-ACTION); return the transaction UID.
    CommitmentError when the peer does not take the request."""
    info = Dataset()
    info.TransactionUID = generate_uid()
    info.ReferencedSOPSequence = [Reference(r.sop_class, r.sop_uid).item() for r in rows]
    status, _ = assoc.send_n_action(info, REQUEST_COMMITMENT, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
    code = int(status.Status) if "Status" in status else None
    if code != SUCCESS:
        answer = f"0x{code:04X}" if code is not None else "no response"
        raise CommitmentError(f"storage commitment request answered {answer}")
    return str(info.TransactionUID)


class Commitments:
    """Reads the commitment reports of destinations and settles their rows."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: dict[str, Destination],
        fail_row: FailRow,
        on_settled: Callable[[int], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.destinations = destinations
        self.fail_row = fail_row
        self.on_settled = on_settled or (lambda job_id: None)
        self.reported = threading.Condition()

    # --- reports from destinations -------------------------------------------------------

    def on_event_report(self, event: evt.Event, destination: str | None = None) -> tuple[int, Dataset | None]:
        """EVT_N_EVENT_REPORT: a destination's commitment report. ``destination`` is known on
        the sender's own association; on a new one it is the destination whose AE title called."""
        request = event.request
        if str(getattr(request, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT:
            return PROCESSING_FAILURE, None
        names = [destination] if destination else self._destinations_of(event.assoc.requestor.ae_title)
        if not names:
            log.warning("commitment report from an unknown destination", caller=event.assoc.requestor.ae_title)
            return PROCESSING_FAILURE, None
        try:
            info = event.event_information
            uid = transaction_uid(info)
            committed = references(info, "ReferencedSOPSequence")
            failed = references(info, "FailedSOPSequence")
        except CommitmentError as exc:
            log.warning("commitment report refused", reason=str(exc))
            return INVALID_ARGUMENT, None
        self.settle_report(names, uid, committed, failed)
        return SUCCESS, None

    def settle_report(
        self, destinations: list[str], uid: str, committed: list[Reference], failed: list[Reference]
    ) -> None:
        """Committed rows are delivered; failed ones go back to the queue with the reason."""
        jobs: set[int] = set()
        for name in destinations:
            rows = {r.sop_uid: r for r in self.outbox.committing(name, [x.sop_uid for x in committed + failed])}
            for ref in committed:
                row = rows.get(ref.sop_uid)
                if row is not None:
                    self.outbox.record(row, SUCCESS, None, delivered=True)
                    jobs.add(row.job_id)
            for ref in failed:
                row = rows.get(ref.sop_uid)
                if row is not None:
                    error = f"{name} did not commit {sop_name(row.sop_class)}: {reason_text(ref.failure)}"
                    self.fail_row(row, ref.failure, error)
                    jobs.add(row.job_id)
            log.info(
                "commitment report", destination=name, transaction=uid, committed=len(committed), failed=len(failed)
            )
        with self.reported:
            self.reported.notify_all()
        for job_id in sorted(jobs):
            self.on_settled(job_id)

    def wait_settled(self, rows: Sequence[OutboxRow], timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for reports on every row; True when none is committing."""
        ids = {r.id for r in rows}

        def settled() -> bool:
            return not any(r.id in ids for r in self.outbox.committing_rows(ids))

        with self.reported:
            return self.reported.wait_for(settled, timeout=timeout_s)

    def _destinations_of(self, ae_title: str) -> list[str]:
        return [name for name, d in self.destinations.items() if d.commitment and d.ae_title == ae_title]


class ReportAnswers:
    """Commitment reports a peer sent on one of the sender's own associations, and how many
    have had their response. The rows settle inside the handler, before pynetdicom sends the
    response: the sender must not release in between, or the peer waits for an answer that
    never comes and its report goes unanswered."""

    def __init__(self) -> None:
        self.taken = 0
        self.answered = 0
        self.changed = threading.Condition()

    def take(self) -> None:
        """Count a report before its rows settle (the handler calls this first)."""
        with self.changed:
            self.taken += 1

    def on_sent(self, event: evt.Event) -> None:
        """EVT_DIMSE_SENT: count the N-EVENT-REPORT responses that went out."""
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            with self.changed:
                self.answered += 1
                self.changed.notify_all()

    def wait_answered(self, timeout_s: float = RESPONSE_SENT_S) -> bool:
        """Wait until every report taken has had its response; True when none is pending."""
        with self.changed:
            return self.changed.wait_for(lambda: self.answered >= self.taken, timeout=timeout_s)


class CommitmentSCP:
    """Answers callers' commitment requests for what is safe in the spool."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """EVT_N_ACTION: a caller asks the node to commit instances it sent. Answers at once;
        the report follows on the same association once the answer is out."""
        request = event.request
        if str(getattr(request, "RequestedSOPClassUID", "")) != STORAGE_COMMITMENT:
            return NO_SUCH_ACTION, None
        if getattr(request, "ActionTypeID", None) != REQUEST_COMMITMENT:
            return NO_SUCH_ACTION, None
        try:
            info = event.action_information
            uid = transaction_uid(info)
            wanted = references(info, "ReferencedSOPSequence")
        except CommitmentError as exc:
            log.warning("commitment request refused", reason=str(exc))
            return INVALID_ARGUMENT, None
        sent = threading.Event()
        message_id = request.MessageID

        def response_sent(e: evt.Event) -> None:
            if getattr(e.message.command_set, "MessageIDBeingRespondedTo", None) == message_id:
                sent.set()

        event.assoc.bind(evt.EVT_DIMSE_SENT, response_sent)
        threading.Thread(
            target=self._report, args=(event.assoc, uid, wanted, sent, response_sent), name="commitment-report"
        ).start()
        return SUCCESS, None

    def verdicts(self, wanted: Sequence[Reference]) -> list[Reference]:
        """Each reference as committed (failure None) or failed with its reason."""
        out = []
        for ref in wanted:
            stored = self.store.stored_instance(ref.sop_uid)
            if stored is None:
                out.append(Reference(ref.sop_class, ref.sop_uid, NO_SUCH_INSTANCE))
            elif stored != ref.sop_class:
                out.append(Reference(ref.sop_class, ref.sop_uid, CLASS_CONFLICT))
            else:
                out.append(ref)
        return out

    def _report(
        self,
        assoc: Association,
        uid: str,
        wanted: list[Reference],
        sent: threading.Event,
        response_sent: Callable[[evt.Event], None],
    ) -> None:
        try:
            results = self.verdicts(wanted)
            info = Dataset()
            info.TransactionUID = uid
            committed = [r.item() for r in results if r.failure is None]
            failed = [r.item() for r in results if r.failure is not None]
            if committed:
                info.ReferencedSOPSequence = committed
            if failed:
                info.FailedSOPSequence = failed
            if not sent.wait(RESPONSE_SENT_S) or not assoc.is_established:
                log.warning("commitment report not sent: the caller left", transaction=uid)
                return
            event_type = SOME_FAILED if failed else ALL_COMMITTED
            assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
            log.info("commitment answered", transaction=uid, committed=len(committed), failed=len(failed))
        except Exception:  # the top of a report thread: the caller asks again
            log.exception("commitment report failed", transaction=uid)
        finally:
            assoc.unbind(evt.EVT_DIMSE_SENT, response_sent)
