"""Extra listener processes: ``node.listener_processes`` above 1.

One Python process serves its associations one at a time under the GIL, however many threads
it has: four senders at once take four times as long as one. With ``listener_processes: N``
the node starts N-1 child processes that run only the DICOM listeners (the plain and the TLS
port, the same association policy, limits, screening and storage commitment), each its own
interpreter. The main process binds and listens on each port once and every child inherits
those sockets and accepts from them, as the main process does: an idle process takes a new
connection, a busy one lets a less busy one take it first (see ``receive.listen_sockets``), and
a connection never waits in the queue of a process that has died. A child stores into the same
spool and index as the main process, with the same durable ack (file, folder entry and index
row before Success); series completion stays with the main process's stability sweep, which
reads the index.

The children are the main process's to keep: it waits until each listens before it says
ready, restarts one that exits (backing off when one dies young), and stops them on its way
out. Each child reads EOF on its stdin when the main process ends, however it ends (SIGKILL
too), and stops. A child's environment holds no secret the listener does not need (only the
index's PostgreSQL password and the credentials folder for the TLS key stay).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog

from ie_gateway import log as logsetup
from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.errors import ListenerProcessError
from ie_gateway.infer.sandbox import SECRET_ENV
from ie_gateway.ops import metrics
from ie_gateway.ops.signals import SignalInbox
from ie_gateway.receive import Receiver
from ie_gateway.send import Sender
from ie_gateway.store import Store
from ie_gateway.store.db import node_name
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.space import disk_space

log = structlog.get_logger(__name__)

#: how long a child may take to listen after it starts (it imports pynetdicom, opens the index)
START_TIMEOUT_S = 60.0
#: how often the main process looks at its children
WATCH_EVERY_S = 1.0
#: a child that lived shorter than this before it exited is restarted after a growing pause
YOUNG_S = 10.0
MAX_BACKOFF_S = 30.0
#: a stopping child gets this long after SIGTERM, then SIGKILL (well inside the unit's
#: TimeoutStopSec=60, and long enough for a loaded machine: it usually takes under a second)
STOP_GRACE_S = 15.0
READY = b"ready\n"


def child_environment(cfg: GatewayConfig, environ: dict[str, str]) -> dict[str, str]:
    """The environment a listener child gets: secret-looking variables removed but those the
    listener needs (PostgreSQL's for the index, the credentials folder for the TLS key), and
    none of systemd's notify/watchdog variables (only the main process talks to systemd)."""
    keep_pg = cfg.storage.index != "sqlite"
    keep_creds = cfg.node.tls is not None

    def kept(name: str) -> bool:
        if name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            return False
        if not SECRET_ENV.search(name):
            return True
        return (keep_pg and name.startswith("PG")) or (keep_creds and name == "CREDENTIALS_DIRECTORY")

    return {name: value for name, value in environ.items() if kept(name)}


class ListenerProcesses:
    """The node's N-1 extra listener processes, kept running while the node runs."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.count = cfg.node.listener_processes - 1
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, float] = {}
        self._pause: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.restarts = 0
        self.counts: metrics.ListenerCounts | None = None
        self._sockets: list[socket.socket] = []

    def start(self, shared: list[socket.socket]) -> None:
        """Start every child, accepting on the listening sockets ``shared``
        (``receive.listen_sockets``), and wait until each listens; ListenerProcessError if one
        cannot. Their metrics count in `/metrics` from then on."""
        # our own descriptors of the sockets, for the children started later too: the main
        # process's listener closes its own when it stops
        self._sockets = [sock.dup() for sock in shared]
        self.counts = metrics.ListenerCounts()
        metrics.count_listeners(self.counts)
        for number in range(1, self.count + 1):
            self._spawn(number)
        try:
            for number in range(1, self.count + 1):
                self._await_ready(number)
        except ListenerProcessError:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch, name="listener-processes", daemon=True)
        self._watcher.start()

    def _spawn(self, number: int) -> None:
        command = [
            sys.executable,
            "-m",
            "ie_gateway.listeners",
            "--config",
            str(self.cfg.source),
            "--number",
            str(number),
            "--listen-fds",
            ",".join(str(sock.fileno()) for sock in self._sockets),
        ]
        assert self.counts is not None
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,  # never written: its EOF tells the child the main process ended
            stdout=subprocess.PIPE,  # the child's READY line
            pass_fds=[sock.fileno() for sock in self._sockets],  # the same numbers in the child
            env={**child_environment(self.cfg, dict(os.environ)), **self.counts.environment()},
        )
        with self._lock:
            self._procs[number] = proc
            self._started[number] = time.monotonic()
        log.info("listener process started", listener=number, listener_pid=proc.pid)

    def _await_ready(self, number: int) -> None:
        proc = self._procs[number]
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if readable else b""
        if line != READY:
            ended = proc.poll() is not None
            proc.kill()
            proc.wait()
            why = "ended before it listened" if ended else f"did not listen within {START_TIMEOUT_S:g} s"
            raise ListenerProcessError(
                f"listener process {number} {why} (exit status {proc.returncode}); its log lines say why"
            )

    def alive(self) -> bool:
        """Every child is running (one that died is being restarted: not alive until then)."""
        with self._lock:
            return len(self._procs) == self.count and all(p.poll() is None for p in self._procs.values())

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs.values()]

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY_S):
            try:
                self._restart_dead()
            except Exception:  # top of the watcher loop: the next round tries again
                if not self._stop.is_set():  # else stop() ended the child it waited for
                    log.exception("listener process restart failed")

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for number in range(1, self.count + 1):
            with self._lock:
                proc = self._procs.get(number)
            if proc is None or proc.poll() is None:
                continue
            if self.counts is not None:
                self.counts.ended(proc.pid)
            lived = now - self._started[number]
            pause = min(MAX_BACKOFF_S, self._pause.get(number, 0.5) * 2) if lived < YOUNG_S else 0.0
            self._pause[number] = pause
            log.error(
                "listener process exited; restarting it",
                listener=number,
                listener_pid=proc.pid,
                exit_status=proc.returncode,
                lived_s=round(lived, 1),
                pause_s=pause,
            )
            if self._stop.wait(pause):
                return
            self._spawn(number)
            self._await_ready(number)
            self.restarts += 1

    def stop(self) -> None:
        """SIGTERM every child, wait for them (SIGKILL after a grace period)."""
        self._stop.set()
        self._terminate()  # first: a restarted child the watcher waits for ends, and its wait
        if self._watcher is not None:
            self._watcher.join(timeout=START_TIMEOUT_S)
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
        self._terminate(procs)  # one the watcher started meanwhile
        for proc in procs:
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.info("listener process stopped", listener_pid=proc.pid, exit_status=proc.returncode)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self.counts is not None:
            metrics.count_listeners(None)
            self.counts.close()
            self.counts = None

    def _terminate(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        if procs is None:
            with self._lock:
                procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()


def serve_listener(cfg: GatewayConfig, number: int, listen_fds: list[int]) -> None:
    """A child's life: accept on the inherited listening sockets ``listen_fds`` (plain port,
    then TLS port) until SIGTERM or until the main process ends (EOF on stdin).
    SIGTERM reaches this thread through a SignalInbox (see ops/signals.py for why)."""
    # a terminal's ^C goes to the main process, which stops us
    inbox = SignalInbox([signal.SIGTERM], ignored=[signal.SIGINT])
    store = Store.for_settings(cfg.storage)
    # a destination's storage commitment report on a new association settles its rows in the
    # index from whichever process the kernel gave the connection to
    sender = Sender(cfg.destinations, cfg.delivery, Outbox(store.index), store.results, node=node_name())
    receiver = Receiver(
        cfg.node,
        store,
        space=lambda: disk_space(cfg.storage.root, cfg.storage.reserve),
        limits=cfg.limits,
        commitment_reports=sender.commitments,
    )
    shared = [socket.socket(fileno=fd) for fd in listen_fds]
    for sock in shared:
        sock.setblocking(False)  # as the main process made it (the flag is the socket's, not ours)
    receiver.start(shared)
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
    log.info("ready", listener=number, port=receiver.port)
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    # nobody reads the pipe after READY: whatever a library prints later goes to the log,
    # rather than filling the pipe until the printing thread blocks
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    while not inbox.wait():  # SIGTERM: from the main process, or from _watch_parent when it has ended
        pass
    # should stopping hang, every thread's stack goes to the log before the main process's SIGKILL
    faulthandler.dump_traceback_later(STOP_GRACE_S / 2)
    receiver.stop()
    sender.close()
    faulthandler.cancel_dump_traceback_later()
    log.info("stopped", listener=number)


def _watch_parent() -> None:
    """Stop this child (SIGTERM to itself) when stdin reaches EOF: the main process closed it
    or ended. It reads the raw descriptor: a daemon thread blocked in the buffered
    ``sys.stdin`` holds its lock, and the interpreter aborts on that lock when it finalises."""
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ie_gateway.listeners", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--listen-fds", required=True, help="the inherited listening sockets, comma-separated")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    logsetup.configure(cfg.log_level, process=f"listener-{args.number}")
    serve_listener(cfg, args.number, [int(fd) for fd in args.listen_fds.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
