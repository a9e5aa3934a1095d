"""Signals taken as data, not as interrupts.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread
is: a handler that logs, sets an Event or reloads a file can run while the main thread holds
the very lock it needs (the Event's own, the log stream's) and wait for it forever. A listener
child that set an Event from its SIGTERM handler needed SIGKILL now and then to stop.

Here the handlers do nothing; the interpreter writes each signal's number to a socket (its
wakeup fd), and the main thread reads them in its own loop and acts in plain code.
"""

from __future__ import annotations

import select
import signal
import socket
from collections.abc import Iterable


def _ignore(_signum: int, _frame: object) -> None:
    """A handler that does nothing: the signal's byte on the wakeup socket is the message."""


class SignalInbox:
    """The signals of ``handled`` as a queue the main thread reads; ``ignored`` are dropped.
    Made in the main thread (Python installs handlers only there), once per process."""

    def __init__(self, handled: Iterable[signal.Signals], ignored: Iterable[signal.Signals] = ()) -> None:
        self._woken, self._wake = socket.socketpair()
        self._wake.setblocking(False)
        signal.set_wakeup_fd(self._wake.fileno(), warn_on_full_buffer=False)
        self._handled = frozenset(handled)
        for signum in self._handled:
            signal.signal(signum, _ignore)
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)

    def wait(self, timeout: float | None = None) -> list[signal.Signals]:
        """The handled signals that arrived, in order, waiting up to ``timeout`` seconds (None:
        until one comes); an empty list when none came in time."""
        ready, _, _ = select.select([self._woken], [], [], timeout)
        if not ready:
            return []
        return [signal.Signals(n) for n in self._woken.recv(256) if n in self._handled]
