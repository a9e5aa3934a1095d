"""The DICOM listener: association policy, C-ECHO, and C-STORE into the spool.

The C-STORE handler stores and answers, nothing more: the received bytes are written as they
came (no pixel decoding), made durable, indexed, and only then answered Success. Every failure
gets a specific status so the sender knows whether to retry (0xA7xx) or not (0xA9xx, 0xCxxx).

Nothing a peer sends is held in memory whole: a PDU whose header announces more than the node
accepts (64 KiB before association, ``node.max_pdu_kb`` after) is refused before it is read and
the connection closed, and each C-STORE's data set is written to a file as its PDUs arrive
(pynetdicom's chunked receive), checked on its header against ``limits:``, then moved into the
spool.

A connection reaches pynetdicom only once it has sent its first bytes (and, on the TLS port,
completed its handshake) within ``node.acse_timeout_s``: load-balancer probes and port scanners
that connect and close, or connect and say nothing, are dropped in their own thread and never
hold one of the ``max_associations`` slots, which count only associations that were requested.
"""

from __future__ import annotations

import ipaddress
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydicom
import structlog
from pydicom import uid as tsuid
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF as P_DATA_TF_PDU
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler, ThreadedAssociationServer

from ie_gateway import reactor
from ie_gateway.config import Caller, Limits, Node
from ie_gateway.errors import InstanceOverLimit, StoreError, UnsafeUIDError
from ie_gateway.files import remove_leftovers
from ie_gateway.intake import Received, check_limits, read_received, sent_text
from ie_gateway.interop.commitment import PROCESSING_FAILURE, STORAGE_COMMITMENT, Commitments, CommitmentSCP
from ie_gateway.ops import metrics, tls
from ie_gateway.store import Arrival, SeriesHeader, Store, check_uid, header_values
from ie_gateway.store.space import DiskSpace

log = structlog.get_logger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")  # pynetdicom makes its SOP class constants at run time

STORAGE_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)
TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLossless,
    tsuid.JPEGLSLossless,
    tsuid.RLELossless,
    tsuid.JPEG2000Lossless,
]

# C-STORE statuses (PS3.4 Annex B.2.3): 0xA7xx out of resources (sender should retry),
# 0xA900 data set does not match SOP class, 0xCxxx cannot understand.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk full or I/O error writing the instance
INDEX_UNAVAILABLE = 0xA701  # the instance could not be indexed (database busy or broken)
OVER_LIMIT = 0xA702  # the instance, or its series with it, passes one of `limits:`
DATASET_MISMATCH = 0xA900  # the data set's SOP Instance/Class is not the request's
CANNOT_UNDERSTAND = 0xC210  # the data set cannot be parsed
INVALID_UID = 0xC211  # a UID that is not digits and dots of at most 64 characters

REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Reasons for rejecting an association (PS3.8 Table 9-21): result, source, diagnostic.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded

# Connections waiting for their first bytes (each a parked thread); beyond this a new one is
# closed at once, so a flood of silent connections cannot exhaust threads or memory.
MAX_SCREENING = 256
# Connections that have sent bytes but not yet a whole A-ASSOCIATE-RQ, beyond max_associations.
REQUEST_HEADROOM = 32

# An A-ASSOCIATE-RQ (the only PDU a peer may send before association) longer than this is
# refused unread: real ones are a few hundred bytes to a few KiB, even with 100 presentation contexts.
MAX_REQUEST_PDU = 64 * 1024
# How long the DUL thread of an idle association waits in select (for a PDU, or a wake-up when
# something is queued to send) before it looks at its timers and kill flag again.
READY_WAIT_S = 0.01
PDU_HEADER = 6  # every PDU starts with its type (1 byte), a reserved byte and its length (4)
PDV_COMMAND = 0x01  # a fragment's message control header: a command set's (else a data set's)
PDV_LAST = 0x02  # ... and the last fragment of it
#: the most pynetdicom may gather in memory for one command set, or for the data set of a
#: message other than a C-STORE request (a storage commitment request for 10,000 instances
#: is ~2 MB)
MAX_MESSAGE_IN_MEMORY = 16 * 2**20
#: listener processes sharing a port (node.listener_processes): one that serves connections
#: waits this long for each before it takes a new one, so that a process with fewer takes it
#: first; at most MAX_ACCEPT_WAIT_S, a pause a sender does not notice in an association's set-up
ACCEPT_STEP_S = 0.02
MAX_ACCEPT_WAIT_S = 0.1
P_DATA_TF = 0x04  # the PDU type that carries DIMSE messages, bounded by node.max_pdu_kb

# Exceptions pydicom raises on truncated or corrupt encodings.
DECODE_ERRORS = (
    pydicom.errors.InvalidDicomError,
    ValueError,
    EOFError,
    struct.error,
    KeyError,
    IndexError,
    NotImplementedError,
    TypeError,
)


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
    # of the DIMSE message being received, so far: [its data set, its command set] (by PDV_COMMAND)
    message_bytes: list[int] = field(default_factory=lambda: [0, 0])


def find_caller(callers: list[Caller], calling_ae: str, address: str) -> Caller | None:
    """The entry that admits ``calling_ae`` from ``address``, or None."""
    for caller in callers:
        if caller.ae_title != calling_ae:
            continue
        if caller.host is None or ipaddress.ip_address(caller.host) == ipaddress.ip_address(address):
            return caller
    return None


def caller_allowed(callers: list[Caller], calling_ae: str, address: str) -> bool:
    """True when ``calling_ae`` (and the peer ``address`` where configured) is on the list."""
    return find_caller(callers, calling_ae, address) is not None


def over_tls(assoc: Association) -> bool:
    """Whether the association came in on the TLS listener."""
    sock = assoc.dul.socket
    return sock is not None and isinstance(sock.socket, ssl.SSLSocket)


class BoundedSocket(AssociationSocket):
    """pynetdicom's socket, refusing a PDU longer than the node accepts before reading it.

    pynetdicom's DUL reads each PDU with two calls: its 6-byte header (type, length), then as
    many bytes as the header announces, gathered in memory. A P-DATA-TF longer than the maximum
    PDU the node announced, or any other PDU (an A-ASSOCIATE-RQ above all: it comes before any
    AE title is checked) longer than 64 KiB, closes the connection instead and returns nothing,
    as a peer that hung up would: the DUL then ends the connection.
    """

    # class defaults: the object is created as an AssociationSocket (see BoundedRequestHandler)
    _body_next = False
    _pdu_type = 0
    _cut = False  # cut off: nothing more is read
    _waker: socket.socket | None = None  # readable when the DUL has something queued to send
    _wake: socket.socket | None = None  # its other end, written by SendQueue

    @property
    def ready(self) -> bool:
        """Whether a PDU has begun to arrive; waits for one, or for something to send.

        pynetdicom's DUL thread polls the socket with a zero timeout and sleeps a millisecond
        between polls: each C-STORE request of a sender that sends the next instance only after
        the last one's response sat up to that long before it was read, each response as long
        before it was sent, and every association woke its thread 1000 times a second. Here the
        thread waits in select (GIL released) until bytes come or the association queues a PDU
        to send (``SendQueue`` writes to the waker), at most ``READY_WAIT_S``; the DUL's own
        sleep is set to zero (BoundedRequestHandler).
        """
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(READY_WAIT_S)  # the DUL loop no longer sleeps: do not spin while it stops
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes select cannot see
        waker = self._waker
        try:
            readable, _, _ = select.select([sock] if waker is None else [sock, waker], [], [], READY_WAIT_S)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom signals it
            return False
        if waker is not None and waker in readable:
            _drain(waker)
        return sock in readable

    def close(self) -> None:
        super().close()
        for end in (self._waker, self._wake):
            if end is not None:
                end.close()

    def recv(self, nr_bytes: int) -> bytearray:
        if self._cut:
            return bytearray()  # what the peer sent before the cut stays unread
        if not self._body_next:
            header = _recv_exactly(self, nr_bytes)
            self._body_next = len(header) == nr_bytes
            self._pdu_type = header[0] if header else 0
            return header
        self._body_next = False
        limit = (self.assoc.acceptor.maximum_length or 0) if self._pdu_type == P_DATA_TF else MAX_REQUEST_PDU
        if 0 < limit < nr_bytes:
            metrics.CONNECTIONS_REFUSED.labels("pdu_too_large").inc()
            log.warning(
                "connection refused",
                reason="PDU longer than the node accepts",
                pdu_type=f"0x{self._pdu_type:02X}",
                pdu_bytes=nr_bytes,
                limit_bytes=limit,
            )
            self.cut_off()
            return bytearray()
        return _recv_exactly(self, nr_bytes)

    def cut_off(self) -> None:
        """End the connection now, as a peer that hung up: the DUL then ends the association."""
        self._cut = True
        sock = self.socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer has gone already


class SendQueue(queue.Queue[Any]):
    """The DUL's queue of PDUs to send, which wakes the DUL thread from BoundedSocket.ready's
    select when something is put in it (a C-STORE response, above all)."""

    def __init__(self, waker: socket.socket) -> None:
        super().__init__()
        self._waker = waker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        try:
            self._waker.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending already; closed: the association has ended


def _drain(waker: socket.socket) -> None:
    try:
        while waker.recv(4096):
            pass
    except OSError:
        pass  # nothing more to read (non-blocking), or closed


def _recv_exactly(assoc_socket: AssociationSocket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from the connection (fewer only when the peer closes it), read straight into
    one buffer: pynetdicom reads in 4 KiB pieces appended to a growing bytearray, about 60
    Python-level reads and copies for each 256 KiB PDU."""
    sock = assoc_socket.socket
    assert sock is not None  # pynetdicom reads only from a connected socket
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    got = 0
    while got < nr_bytes:
        count = sock.recv_into(view[got:], nr_bytes - got)
        if not count:
            return buffer[:got]  # the peer closed the connection: what came, as pynetdicom returns it
        got += count
    return buffer


#: how long an association's reactor waits for its bell before it looks at what nothing rings
#: for: the network timeout, a DUL thread that died, a kill from another thread
REACTOR_IDLE_S = 0.05


class BellQueue(queue.Queue[Any]):
    """A queue that rings its association's bell on every put: the DIMSE messages the DUL
    decoded, and the primitives it hands up (A-RELEASE, A-ABORT)."""

    def __init__(self, bell: threading.Event) -> None:
        super().__init__()
        self._bell = bell

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._bell.set()


class PromptAssociation(Association):
    """pynetdicom's acceptor association, whose reactor waits for its bell instead of waking
    every millisecond.

    pynetdicom's reactor sleeps 1 ms between looks at its queues: each C-STORE waits for the
    next look, and every association wakes its thread a thousand times a second, each time
    taking the interpreter lock from the threads that receive. Here it waits until the DUL puts
    a message or a primitive in a queue (``BellQueue``), or ``REACTOR_IDLE_S`` passes. The loop
    is pynetdicom 3.0.4's ``Association._run_reactor`` (the version constraints.txt pins) with
    only that wait changed: the same order of checks, the same events.
    """

    _bell: threading.Event

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._bell.wait(REACTOR_IDLE_S)
            self._bell.clear()  # before the looks below: a put from now on rings again

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._bell.set()  # another may be queued behind it
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers, as in pynetdicom
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("association aborted", reason="network timeout (node.network_timeout_s)")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a BoundedSocket under each association."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None and type(sock) is AssociationSocket  # set by pynetdicom just now
        # Same object, one method more: pynetdicom builds the socket inside this call, and a
        # second AssociationSocket would announce the connection to the state machine twice.
        sock.__class__ = BoundedSocket
        # the DUL thread waits in BoundedSocket.ready instead of sleeping, woken by what it must send
        waker, wake = socket.socketpair()
        waker.setblocking(False)
        wake.setblocking(False)
        bounded = cast(BoundedSocket, sock)
        bounded._waker, bounded._wake = waker, wake
        assoc.dul.to_provider_queue = SendQueue(wake)
        assoc.dul._run_loop_delay = 0
        # the association's reactor waits for what the DUL hands up instead of polling
        bell = threading.Event()
        assoc.dimse.msg_queue = BellQueue(bell)
        assoc.dul.to_user_queue = BellQueue(bell)
        assoc.__class__ = PromptAssociation
        cast(PromptAssociation, assoc)._bell = bell
        # a send on this association (a commitment report) pauses the reactor for sure, at once
        return reactor.guard(assoc, wake=bell.set)


def listen_sockets(node: Node) -> list[socket.socket]:
    """Listening sockets for the plain port and, with ``node.tls``, the TLS port, for the node's
    listener processes to share (``Receiver.start(shared=...)``).

    One socket that every process accepts from, rather than one socket each bound with
    SO_REUSEPORT: the kernel hashes each connection to one of SO_REUSEPORT's sockets whatever
    their load, so four senders at once often met three in one process and none in another,
    and a connection queued to a process that dies is reset. On a shared socket every idle
    process may take a connection, and a busy one lets them go first (``ACCEPT_STEP_S``).
    """
    ports = [node.port] + ([node.tls.port] if node.tls is not None else [])
    return [_listen((node.bind, port)) for port in ports]


def _listen(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(AddressInformation.from_tuple(address).address_family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom binds its own
        sock.bind(address)
        sock.listen(ScreeningServer.request_queue_size)
    except OSError:
        sock.close()
        raise
    # accept() answers at once: a connection another process took meanwhile is no wait
    sock.setblocking(False)
    return sock


class ScreeningServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, but a connection becomes an Association only after it
    speaks: accepting never blocks on a peer, and a TLS handshake runs in the connection's own
    thread under the ACSE timeout instead of in the accept loop.

    Given a ``shared`` listening socket (``listen_sockets``), it accepts from that socket
    beside the node's other listener processes instead of binding its own, and takes a new
    connection only after waiting ``ACCEPT_STEP_S`` for each connection it already serves
    (``busy``), so that a process with fewer takes it first.
    """

    acse_timeout_s: float = 5.0
    request_queue_size = 256  # listen backlog: socketserver's 5 drops SYNs under probe bursts
    _screening = threading.BoundedSemaphore(MAX_SCREENING)

    def __init__(
        self, *args: Any, shared: socket.socket | None = None, busy: Callable[[], int] = lambda: 0, **kwargs: Any
    ) -> None:
        self._shared = shared
        self._busy = busy
        self.pending = 0  # connections accepted and not yet handed to pynetdicom
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._shared is None:
            super().server_bind()
            return
        cast(socket.socket, self.socket).close()  # the one socketserver made: the shared one serves
        self.socket = self._shared
        self.server_address = self._shared.getsockname()

    def server_activate(self) -> None:
        if self._shared is None:  # a shared socket listens already
            super().server_activate()

    def server_close(self) -> None:
        if self._shared is None:
            super().server_close()
        else:  # close this process's descriptor only: a shutdown() would stop every process listening
            self._shared.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        if self._shared is not None:
            # every process wakes for a new connection: the least busy takes it (the others'
            # accept then raises BlockingIOError, which socketserver ignores)
            time.sleep(min(MAX_ACCEPT_WAIT_S, ACCEPT_STEP_S * self._busy()))
        conn, address = listener.accept()
        self._count_pending(1)
        return conn, address

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        try:
            self._screen_and_serve(cast(socket.socket, request), client_address)
        finally:
            self._count_pending(-1)

    def _count_pending(self, change: int) -> None:
        with self._pending_lock:
            self.pending += change

    def _screen_and_serve(self, conn: socket.socket, client_address: tuple[str, int] | str) -> None:
        if not self._screening.acquire(blocking=False):
            self._drop(conn, "too_many_connections")
            return
        try:
            ready = self._screen(conn)
        finally:
            self._screening.release()
        if ready is not None:
            super().process_request_thread(ready, client_address)

    def _screen(self, conn: socket.socket) -> socket.socket | None:
        """The connection once it has sent something (TLS: once the handshake is done)."""
        conn.settimeout(self.acse_timeout_s)
        try:
            first = conn.recv(PDU_HEADER, socket.MSG_PEEK)
        except TimeoutError:
            self._drop(conn, "silent")
            return None
        except OSError:  # reset by the peer: a probe that closes with RST
            first = b""
        if not first:
            self._drop(conn, "probe")
            return None
        if self.ssl_context is None:
            return self._unless_oversized(conn, first)
        try:
            secure = self.ssl_context.wrap_socket(conn, server_side=True)
            secure.settimeout(None)
            return secure
        except (ssl.SSLError, OSError) as exc:
            log.warning(
                "connection refused",
                reason="TLS handshake failed",
                error=getattr(exc, "reason", None) or type(exc).__name__,
            )
            self._drop(conn, "tls_handshake")
            return None

    def _unless_oversized(self, conn: socket.socket, first: bytes) -> socket.socket | None:
        """The plain connection, unless its first PDU header (when it came whole) announces more
        than an association request may be: then it is closed here, before pynetdicom starts an
        association for it that would wait ``acse_timeout_s`` for a request (BoundedSocket
        refuses the rest: a header in pieces, and TLS, where nothing can be peeked at)."""
        if len(first) == PDU_HEADER:
            length = struct.unpack(">L", first[2:6])[0]
            if length > MAX_REQUEST_PDU:
                log.warning(
                    "connection refused",
                    reason="PDU longer than the node accepts",
                    pdu_type=f"0x{first[0]:02X}",
                    pdu_bytes=length,
                    limit_bytes=MAX_REQUEST_PDU,
                )
                self._drop(conn, "pdu_too_large")
                return None
        conn.settimeout(None)
        return conn

    def _drop(self, conn: socket.socket, reason: str) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        if reason == "silent":
            log.debug("connection dropped", reason="nothing sent within the ACSE timeout")
        self.shutdown_request(conn)


class Receiver:
    """A pynetdicom SCP that writes into a Store."""

    def __init__(
        self,
        node: Node,
        store: Store,
        space: Callable[[], DiskSpace] | None = None,
        limits: Limits | None = None,
        commitment_reports: Commitments | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.space = space
        self.limits = limits or Limits()
        # Storage Commitment: callers' requests answered for what is in the spool; reports of
        # destinations asked by the sender, when they come on a new association
        self.commitment_scp = CommitmentSCP(store)
        self.commitment_reports = commitment_reports
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        self._sessions: set[Association] = set()
        self._servers: list[ScreeningServer] = []
        self._threads: list[threading.Thread] = []
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.require_called_aet = True
        # pynetdicom counts every connection it holds; our own limit (in _on_requested) counts
        # requested associations only, so this one is set above it.
        ae.maximum_associations = self.node.max_associations + REQUEST_HEADROOM
        ae.network_timeout = self.node.network_timeout_s  # an established association idle this long is aborted
        ae.dimse_timeout = self.node.network_timeout_s
        ae.acse_timeout = self.node.acse_timeout_s
        # what the node tells peers it receives, and (BoundedSocket) the most it reads at once
        ae.maximum_pdu_size = self.node.max_pdu_kb * 1024
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        # both roles: a caller asks us (we are SCP), a destination reports to us (it is SCP)
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        return ae

    def start(self, shared: list[socket.socket] | None = None) -> None:
        """Listen in background threads (one per association): the plain port, and the TLS
        port when ``node.tls`` is set; ``shared``: on these listening sockets
        (``listen_sockets``, in that order), beside the node's other listener processes."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self.commitment_scp.on_action),
            (evt.EVT_N_EVENT_REPORT, self._on_commitment_report),
        ]
        # Each C-STORE's data set goes to a file as its PDUs arrive (event.dataset_path) instead
        # of into memory. The switch is pynetdicom's documented one, and process-wide.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        self._check_temp_dir()
        sockets: list[socket.socket | None] = [*shared] if shared else [None, None]
        self._serve(self.node.port, None, handlers, sockets[0])
        if self.node.tls is not None:
            self._serve(self.node.tls.port, tls.server_context(self.node.tls), handlers, sockets[1])
        # the main process reads the count when scraped; a listener child's value lives in its
        # multiprocess file, which only set() writes: the session changes above set it too
        metrics.ASSOCIATIONS_OPEN.set_function(self.open_associations)

    def _check_temp_dir(self) -> None:
        """pynetdicom writes received data sets to the temp folder (TMPDIR): on the spool's file
        system each is renamed into the spool; elsewhere it is copied, and on a tmpfs it is held
        in memory until then."""
        temp = Path(tempfile.gettempdir())
        if temp.stat().st_dev != self.store.spool.root.stat().st_dev:
            log.warning(
                "received instances are copied into the spool",
                reason="the temp folder is on another file system",
                temp=str(temp),
                fix="set TMPDIR to a folder on the spool's file system",
            )

    def remove_abandoned_receipts(self) -> None:
        """Remove the temp files of C-STOREs that ended before their last byte.

        pynetdicom writes each data set being received to its own temp file, and the handler
        moves it into the spool; a transfer cut off first (the sender killed or aborting, the
        network gone) leaves its file behind, up to ``limits.max_instance_mb`` each, on the
        spool's disk. A transfer still under way writes its file at least every
        ``node.network_timeout_s`` (else the association times out), so a file untouched for
        ``ABANDONED_AFTER`` network timeouts (at least ``MIN_ABANDONED_S``) is no one's.
        """
        older_than = max(MIN_ABANDONED_S, ABANDONED_AFTER * self.node.network_timeout_s)
        removed = remove_leftovers(Path(tempfile.gettempdir()).glob(RECEIPT_GLOB), time.time() - older_than)
        if removed:
            log.warning(
                "abandoned receipts removed",
                reason="a C-STORE ended before its last byte",
                files=len(removed),
                mbytes=round(sum(removed) / 2**20, 1),
            )

    def _serve(
        self, port: int, context: ssl.SSLContext | None, handlers: list[Any], shared: socket.socket | None
    ) -> None:
        server = self.ae.make_server(
            (self.node.bind, port),
            ssl_context=context,
            evt_handlers=handlers,
            server_class=ScreeningServer,
            request_handler=BoundedRequestHandler,
            shared=shared,
            busy=self.busy,
        )
        assert isinstance(server, ScreeningServer)
        server.acse_timeout_s = self.node.acse_timeout_s
        thread = threading.Thread(target=server.serve_forever, name=f"listener-{port}", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # as ae.start_server does: server.shutdown() expects it
        self._servers.append(server)
        self._threads.append(thread)
        log.info("listening", ae_title=self.node.ae_title, bind=self.node.bind, port=port, tls=context is not None)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers.clear()
        self._threads.clear()

    @property
    def listening(self) -> bool:
        """Every listener's accept loop is running."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def port(self) -> int:
        """The bound plain port."""
        return int(self._servers[0].server_address[1])

    def busy(self) -> int:
        """Connections this receiver serves: its associations, counted from the moment
        pynetdicom starts one (before the peer's request is read: connections arriving together
        must see each other), and connections accepted that are not one yet (being screened)."""
        serving = sum(1 for t in threading.enumerate() if isinstance(t, Association) and t.ae is self.ae)
        return serving + sum(server.pending for server in self._servers)

    def open_associations(self) -> int:
        """Associations requested and not yet ended (the ones max_associations counts)."""
        with self._lock:
            self._sessions = {a for a in self._sessions if _holds_slot(a)}
            return len(self._sessions)

    def _on_conn_open(self, event: evt.Event) -> None:
        # Without TCP_NODELAY each response waits ~40 ms on the peer's delayed ACK (pynetdicom,
        # like Debian's dcmtk, leaves it off): 200 slices take seconds instead of a fraction.
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event) -> None:
        # The requestor's fields are filled in only after this event; read the request itself.
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ has been read
        calling = str(primitive.calling_ae_title).strip()
        address = assoc.requestor.address
        caller = find_caller(self.node.allowed_callers, calling, address)
        if caller is None:
            self._reject(
                assoc, REJECT_CALLING_AE, "calling_ae", "calling AE not allowed", calling_ae=calling, peer=address
            )
            return
        if caller.require_tls and not over_tls(assoc):
            self._reject(
                assoc,
                REJECT_CALLING_AE,
                "tls_required",
                "caller must use the TLS port",
                calling_ae=calling,
                peer=address,
            )
            return
        space = self.space() if self.space is not None else None
        if space is not None and space.below_reserve:
            self._reject(
                assoc,
                REJECT_LOCAL_LIMIT,
                "disk_reserve",
                "free space below storage.reserve",
                calling_ae=calling,
                free_mb=space.free_bytes // 2**20,
                reserve_mb=space.reserve_bytes // 2**20,
            )
            return
        with self._lock:
            self._sessions = {a for a in self._sessions if _holds_slot(a)}
            busy = len(self._sessions) >= self.node.max_associations
            if not busy:
                self._sessions.add(assoc)
            open_now = len(self._sessions)
        metrics.ASSOCIATIONS_OPEN.set(open_now)
        if busy:
            self._reject(
                assoc,
                REJECT_LOCAL_LIMIT,
                "busy",
                "max_associations reached",
                calling_ae=calling,
                open=self.node.max_associations,
            )

    def _reject(self, assoc: Association, rsd: tuple[int, int, int], reason: str, why: str, **fields: Any) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        log.warning("association refused", reason=why, **fields)
        assoc.acse.send_reject(*rsd)
        assoc.kill()  # as pynetdicom's own rejections do: lets the DUL flush the A-ASSOCIATE-RJ

    def _on_accepted(self, event: evt.Event) -> None:
        secure = over_tls(event.assoc)
        metrics.ASSOCIATIONS_ACCEPTED.labels("yes" if secure else "no").inc()
        with self._lock:
            self._stats[id(event.assoc)] = AssociationStats(calling_ae=event.assoc.requestor.ae_title.strip())
        log.info(
            "association opened",
            calling_ae=event.assoc.requestor.ae_title.strip(),
            peer=event.assoc.requestor.address,
            tls=secure,
        )

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
            self._sessions.discard(event.assoc)  # a local abort is not yet flagged aborted here
        metrics.ASSOCIATIONS_OPEN.set(self.open_associations())
        if stats is None:
            return
        seconds = max(time.monotonic() - stats.opened, 1e-6)
        log.info(
            "association closed",
            how="released" if event.event is evt.EVT_RELEASED else "aborted",
            calling_ae=stats.calling_ae,
            instances=stats.instances,
            duplicates=stats.duplicates,
            failures=stats.failures,
            mbytes=round(stats.bytes / 2**20, 2),
            seconds=round(seconds, 3),
            mb_per_s=round(stats.bytes / 2**20 / seconds, 1),
        )

    def _on_commitment_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        if self.commitment_reports is None:  # a node that sends nothing asked nobody
            return PROCESSING_FAILURE, None
        return self.commitment_reports.on_event_report(event)

    def _on_pdu(self, event: evt.Event) -> None:
        """Count the DIMSE message each P-DATA-TF adds to and cut the association off once it
        passes what the node holds for it: a C-STORE's data set goes to a temp file on the
        spool's disk, up to ``limits.max_instance_mb``; any other data set, and every command
        set, pynetdicom gathers in memory, up to ``MAX_MESSAGE_IN_MEMORY``. Without this a peer
        could send one data set without end, filling the disk or the memory before any handler
        saw it. Runs in the DUL thread as each PDU is decoded, before its fragments are added."""
        pdu = event.pdu
        stats = self._stats.get(id(event.assoc))
        if not isinstance(pdu, P_DATA_TF_PDU) or stats is None:
            return
        for item in pdu.presentation_data_value_items:
            value = cast(bytes, item.presentation_data_value)
            command = value[0] & PDV_COMMAND
            size = stats.message_bytes[command] + len(value) - 1
            limit, allowed = self._bound(event.assoc, command)
            if size > allowed:
                self._cut_off(event.assoc, limit, allowed)
                return
            stats.message_bytes[command] = 0 if value[0] & PDV_LAST else size

    def _bound(self, assoc: Association, command: int) -> tuple[str, int]:
        """What the node holds for a command set (``command``) or a data set on ``assoc``: the
        command set before a data set has been decoded by now (a C-STORE's first data fragment
        in the same PDU as its command's last is held to the smaller bound)."""
        if not command and isinstance(assoc.dimse.message, C_STORE_RQ):
            return "limits.max_instance_mb", self.limits.max_instance_mb * 2**20
        return ("a command set" if command else "a data set other than a C-STORE's"), MAX_MESSAGE_IN_MEMORY

    def _cut_off(self, assoc: Association, limit: str, allowed: int) -> None:
        metrics.CONNECTIONS_REFUSED.labels("message_too_large").inc()
        log.warning(
            "association cut off",
            reason="a DIMSE message longer than the node holds",
            limit=limit,
            limit_mb=round(allowed / 2**20, 1),
            calling_ae=assoc.requestor.ae_title.strip(),
        )
        sock = assoc.dul.socket
        if isinstance(sock, BoundedSocket):
            sock.cut_off()

    def _on_store(self, event: evt.Event) -> Dataset | int:
        stats = self._stats.get(id(event.assoc)) or AssociationStats()
        result = self._store(event, stats)
        code = result if isinstance(result, int) else int(result.Status)
        metrics.CSTORE_RESPONSES.labels(f"0x{code:04X}").inc()
        if code != SUCCESS:
            stats.failures += 1
        return result

    def _store(self, event: evt.Event, stats: AssociationStats) -> Dataset | int:
        request = cast(C_STORE, event.request)  # EVT_C_STORE carries a C-STORE request
        calling_ae = event.assoc.requestor.ae_title.strip()
        source = event.dataset_path  # preamble, file meta and the data set as sent
        try:
            received = read_received(source, str(event.context.transfer_syntax), self.limits)
            absent = [kw for kw in REQUIRED if kw not in received.header]
            if absent:
                log.warning("instance refused", reason="data set incomplete", absent=absent)
                return status(CANNOT_UNDERSTAND, f"data set lacks {absent[0]} (truncated or corrupt)")
            arrival = self._arrival(received.header, event)
            check_limits(
                received.header, received.size, self.store.index.series_totals(arrival.series_uid), self.limits
            )
        except InstanceOverLimit as exc:
            log.warning(
                "instance refused",
                reason="over a limit",
                limit=f"limits.{exc.limit}",
                value=exc.value,
                allowed=exc.allowed,
                calling_ae=calling_ae,
            )
            return status(OVER_LIMIT, f"over limits.{exc.limit}: {exc.value} > {exc.allowed}")
        except UnsafeUIDError as exc:
            log.warning("instance refused", reason=str(exc), calling_ae=calling_ae)
            return status(INVALID_UID, str(exc))
        except DECODE_ERRORS as exc:
            log.warning("instance refused", reason="data set cannot be decoded", error=type(exc).__name__)
            return status(CANNOT_UNDERSTAND, "data set cannot be decoded")
        except StoreError as exc:
            log.error("instance not stored", reason=str(exc))
            return status(INDEX_UNAVAILABLE, "index unavailable")
        if arrival.sop_uid != str(request.AffectedSOPInstanceUID) or arrival.sop_class != str(
            request.AffectedSOPClassUID
        ):
            log.warning("instance refused", reason="data set does not match the request's SOP instance/class")
            return status(DATASET_MISMATCH, "SOP Instance/Class differs from the C-STORE request")
        return self._keep(arrival, source, received, stats)

    def _arrival(self, ds: Dataset, event: evt.Event) -> Arrival:
        return Arrival(
            sop_uid=check_uid(sent_text(ds, "SOPInstanceUID"), "SOPInstanceUID"),
            sop_class=str(ds.get("SOPClassUID", "")),
            study_uid=check_uid(sent_text(ds, "StudyInstanceUID"), "StudyInstanceUID"),
            series_uid=check_uid(sent_text(ds, "SeriesInstanceUID"), "SeriesInstanceUID"),
            transfer_syntax=str(event.context.transfer_syntax),
            calling_ae=event.assoc.requestor.ae_title.strip(),
            called_ae=event.assoc.acceptor.ae_title.strip(),
        )

    def _keep(self, arrival: Arrival, source: Path, received: Received, stats: AssociationStats) -> Dataset | int:
        """Move the received file into the spool durably and index it: Success only then."""
        try:
            accepted = self.store.accept_file(arrival, source, lambda: _header(received.header))
        except OSError as exc:
            log.error("instance not stored", reason="storage failure", error=exc.strerror or str(exc), errno=exc.errno)
            return status(OUT_OF_RESOURCES, f"storage failure: {exc.strerror or exc}")
        except StoreError as exc:
            log.error("instance not stored", reason=str(exc))
            return status(INDEX_UNAVAILABLE, "index unavailable")
        if accepted.duplicate:
            stats.duplicates += 1
            log.info("duplicate instance ignored", sop=arrival.sop_uid)
            return SUCCESS
        stats.instances += 1
        stats.bytes += received.size
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(received.size)
        if accepted.replaced:
            log.warning(
                "instance sent again with other bytes",
                job=accepted.job_id,
                policy="both copies kept; the later one is used",
            )
        if accepted.late:
            log.warning(
                "late instance opened a new job", job=accepted.job_id, policy="the series is processed again as a whole"
            )
        return SUCCESS


#: pynetdicom's temp file of a data set being received: NamedTemporaryFile(suffix=".dcm") in TMPDIR
RECEIPT_GLOB = "tmp*.dcm"
ABANDONED_AFTER = 2  # network timeouts without a write
MIN_ABANDONED_S = 60.0  # nor a file whose handler is slow to take it (a busy index)


def _header(ds: Dataset) -> SeriesHeader:
    try:
        return header_values(ds)
    except DECODE_ERRORS:
        return SeriesHeader()


def _holds_slot(assoc: Association) -> bool:
    """Whether an association still counts against max_associations. One that was released or
    aborted does not, although its thread lives on for some milliseconds while its DUL stops: a
    sender that releases and associates again at once must not be refused for its own past."""
    return assoc.is_alive() and not (assoc.is_released or assoc.is_aborted)
