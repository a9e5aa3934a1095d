"""The DICOM listener: association policy, C-ECHO, and C-STORE into the spool.

The C-STORE handler stores and answers, nothing more: the received bytes are written as they
came (no pixel decoding), made durable, indexed, and only then answered Success. Every failure
gets a specific status so the sender knows whether to retry (0xA7xx) or not (0xA9xx, 0xCxxx).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pydicom
import structlog
from pydicom import uid as tsuid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from ie_gateway.config import Caller, Node
from ie_gateway.errors import StoreError, UnsafeUIDError
from ie_gateway.store import Arrival, Store, check_uid, header_values

log = structlog.get_logger(__name__)

STORAGE_CLASSES = (
    CTImageStorage, EnhancedCTImageStorage, MRImageStorage, EnhancedMRImageStorage,
    RTStructureSetStorage, SegmentationStorage,
)
TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian, tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.JPEGLosslessSV1, tsuid.JPEGLossless, tsuid.JPEGLSLossless, tsuid.RLELossless,
    tsuid.JPEG2000Lossless,
]

# C-STORE statuses (PS3.4 Annex B.2.3): 0xA7xx out of resources (sender should retry),
# 0xA900 data set does not match SOP class, 0xCxxx cannot understand.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700          # disk full or I/O error writing the instance
INDEX_UNAVAILABLE = 0xA701         # the instance could not be indexed (database busy or broken)
DATASET_MISMATCH = 0xA900          # the data set's SOP Instance/Class is not the request's
CANNOT_UNDERSTAND = 0xC210         # the data set cannot be parsed
INVALID_UID = 0xC211               # a UID that is not digits and dots of at most 64 characters

REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Reasons for rejecting an association (PS3.8 Table 9-21): result, source, diagnostic.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)   # permanent, service user, calling AE not recognised

# Exceptions pydicom raises on truncated or corrupt encodings.
DECODE_ERRORS = (pydicom.errors.InvalidDicomError, ValueError, EOFError, struct.error, KeyError,
                 IndexError, NotImplementedError, TypeError)


def status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an ErrorComment (≤ 64 chars) a person can read."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass
class AssociationStats:
    """Counts of one association, logged when it closes."""

    opened: float = field(default_factory=time.monotonic)
    instances: int = 0
    duplicates: int = 0
    failures: int = 0
    bytes: int = 0
    calling_ae: str = ""


def caller_allowed(callers: list[Caller], calling_ae: str, address: str) -> bool:
    """True when ``calling_ae`` (and the peer ``address`` where configured) is on the list."""
    for caller in callers:
        if caller.ae_title != calling_ae:
            continue
        if caller.host is None or ipaddress.ip_address(caller.host) == ipaddress.ip_address(address):
            return True
    return False


class Receiver:
    """A pynetdicom SCP that writes into a Store."""

    def __init__(self, node: Node, store: Store) -> None:
        self.node = node
        self.store = store
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = self.node.max_associations
        ae.network_timeout = self.node.network_timeout_s
        ae.dimse_timeout = self.node.network_timeout_s
        ae.acse_timeout = self.node.network_timeout_s
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs cost less Python per byte
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Listen in background threads (one per association)."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server((self.node.bind, self.node.port), block=False,
                                            evt_handlers=handlers)
        log.info("listening", ae_title=self.node.ae_title, bind=self.node.bind, port=self.node.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def _on_conn_open(self, event: evt.Event) -> None:
        # Without TCP_NODELAY each response waits ~40 ms on the peer's delayed ACK (pynetdicom,
        # like Debian's dcmtk, leaves it off): 200 slices take seconds instead of a fraction.
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event) -> None:
        # The requestor's fields are filled in only after this event; read the request itself.
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        address = event.assoc.requestor.address
        if not caller_allowed(self.node.allowed_callers, calling, address):
            log.warning("association refused", reason="calling AE not allowed", calling_ae=calling,
                        peer=address)
            event.assoc.acse.send_reject(*REJECT_CALLING_AE)
            event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL flush the A-ASSOCIATE-RJ

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._stats[id(event.assoc)] = AssociationStats(calling_ae=event.assoc.requestor.ae_title.strip())
        log.info("association opened", calling_ae=event.assoc.requestor.ae_title.strip(),
                 peer=event.assoc.requestor.address)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        seconds = max(time.monotonic() - stats.opened, 1e-6)
        log.info("association closed", how="released" if event.event is evt.EVT_RELEASED else "aborted",
                 calling_ae=stats.calling_ae, instances=stats.instances, duplicates=stats.duplicates,
                 failures=stats.failures, mbytes=round(stats.bytes / 2**20, 2),
                 seconds=round(seconds, 3), mb_per_s=round(stats.bytes / 2**20 / seconds, 1))

    def _on_store(self, event: evt.Event) -> Dataset | int:
        stats = self._stats.get(id(event.assoc)) or AssociationStats()
        result = self._store(event, stats)
        if result != SUCCESS:
            stats.failures += 1
        return result

    def _store(self, event: evt.Event, stats: AssociationStats) -> Dataset | int:
        request = event.request
        try:
            ds = event.dataset
            absent = [kw for kw in REQUIRED if kw not in ds]
            if absent:
                log.warning("instance refused", reason="data set incomplete", absent=absent)
                return status(CANNOT_UNDERSTAND, f"data set lacks {absent[0]} (truncated or corrupt)")
            arrival = Arrival(
                sop_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
                sop_class=str(ds.get("SOPClassUID", "")),
                study_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
                series_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
                transfer_syntax=str(event.context.transfer_syntax),
                calling_ae=event.assoc.requestor.ae_title.strip(),
                called_ae=event.assoc.acceptor.ae_title.strip(),
            )
        except UnsafeUIDError as exc:
            log.warning("instance refused", reason=str(exc), calling_ae=event.assoc.requestor.ae_title.strip())
            return status(INVALID_UID, str(exc))
        except DECODE_ERRORS as exc:
            log.warning("instance refused", reason="data set cannot be decoded", error=type(exc).__name__)
            return status(CANNOT_UNDERSTAND, "data set cannot be decoded")
        if arrival.sop_uid != str(request.AffectedSOPInstanceUID) or arrival.sop_class != str(request.AffectedSOPClassUID):
            log.warning("instance refused", reason="data set does not match the request's SOP instance/class")
            return status(DATASET_MISMATCH, "SOP Instance/Class differs from the C-STORE request")
        payload = event.encoded_dataset(include_meta=True)  # the bytes as sent, with file meta
        try:
            job_id, duplicate, late = self.store.accept(arrival, (payload,), lambda: _header(ds))
        except OSError as exc:
            log.error("instance not stored", reason="storage failure", error=exc.strerror or str(exc),
                      errno=exc.errno)
            return status(OUT_OF_RESOURCES, f"storage failure: {exc.strerror or exc}")
        except StoreError as exc:
            log.error("instance not stored", reason=str(exc))
            return status(INDEX_UNAVAILABLE, "index unavailable")
        if duplicate:
            stats.duplicates += 1
            log.info("duplicate instance ignored", sop=arrival.sop_uid)
        else:
            stats.instances += 1
            stats.bytes += len(payload)
            if late:
                log.warning("late instance opened a new job", job=job_id,
                            policy="the series is processed again as a whole")
        return SUCCESS


def _header(ds: Dataset) -> dict[str, Any]:
    try:
        return header_values(ds)
    except DECODE_ERRORS:
        return {}
