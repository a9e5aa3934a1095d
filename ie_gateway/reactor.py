"""A pause of a pynetdicom association's reactor that holds.

An association runs a reactor thread that takes each decoded DIMSE message off the queue and
serves it as a request. When the node itself sends on the association (C-STORE, N-ACTION,
N-EVENT-REPORT, C-ECHO, C-FIND, C-MOVE), pynetdicom pauses the reactor first, so that the
peer's *response* is left for the sender: the sender clears the reactor's checkpoint (a
``threading.Event``) and waits until the reactor says ``_is_paused``. But the reactor says it
before it waits at the checkpoint and unsays it only after passing, so a sender that pauses it
just as it passes reads a stale "paused", sends, and the reactor then takes the response off
the queue ("Received unexpected N-ACTION service message" in pynetdicom's log): the sender
waits its whole DIMSE timeout and reports no response from a peer that answered. Seen in CI
with Orthanc answering a storage commitment request within a millisecond, on a loaded machine.

``ReactorCheckpoint`` replaces that Event: a sender's ``clear()`` also withdraws a "paused"
that the reactor has not earned (it is not stopped at the checkpoint), and the reactor says
"paused" again as it stops there, so the sender waits until the reactor really stops, and no
longer. ``guard`` installs it on an association, acceptor or requestor; nothing else in
pynetdicom changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

#: How often a reactor stopped at its checkpoint says again that it is paused.
RESAY_S = 0.05


class ReactorCheckpoint:
    """The Event interface pynetdicom uses (set, clear, is_set, wait), keeping the association's
    ``_is_paused`` true only while its reactor is stopped here (or itself the sender)."""

    def __init__(self, assoc: Association, wake: Callable[[], None] | None = None) -> None:
        self._assoc = assoc
        self._wake = wake or (lambda: None)  # a reactor that sleeps on a bell comes to the checkpoint now
        self._cond = threading.Condition(threading.Lock())  # as threading.Event's
        self._open = True
        self._stopped = False

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            if not self._stopped and self._reactor_comes():
                self._assoc._is_paused = False
        self._wake()

    def _reactor_comes(self) -> bool:
        """Whether the reactor runs in another thread and will come to this checkpoint. Not when
        the caller is the reactor's own thread (a release on its network timeout, a send from a
        handler: it is where it says it is), nor when the reactor has ended or been killed
        (pynetdicom says "paused" for it, and the send then fails on the closed association)."""
        reactor = self._assoc
        return reactor.is_alive() and not reactor._kill and threading.current_thread() is not reactor

    def is_set(self) -> bool:
        with self._cond:
            return self._open

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if self._open:  # the reactor's every turn: it passes
                return True
            self._stopped = True
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                while not self._open:
                    # stopped here: say so, and again every RESAY_S while stopped. A clear() may
                    # have withdrawn the "paused" the reactor said just before it came, and once
                    # in CI a sender's release() spun forever on a "paused" that was false while
                    # the reactor waited here: both then wait for good, so the truth is said again.
                    self._assoc._is_paused = True
                    left = RESAY_S if deadline is None else min(RESAY_S, deadline - time.monotonic())
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._stopped = False


def guard(assoc: Association, wake: Callable[[], None] | None = None) -> Association:
    """Give ``assoc`` a ReactorCheckpoint. On a requestor the reactor already runs: it passes the
    old Event, which nobody clears any more, and stops at the new one from its next turn."""
    assoc._reactor_checkpoint = ReactorCheckpoint(assoc, wake)  # type: ignore[assignment]
    return assoc


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate`` with a guarded reactor: what the node uses for every association it requests."""
    return guard(ae.associate(host, port, **kwargs))
