"""Wires the node together: spool recovery, the SCP, the scheduler jobs, signals, systemd.

`ie-gateway serve` builds one Service and calls run(); tests start the same command.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from ie_gateway import sdnotify
from ie_gateway.config import GatewayConfig
from ie_gateway.receive import Receiver
from ie_gateway.store import Store

log = structlog.get_logger(__name__)


class Service:
    """The running node."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.storage.root)
        self.receiver = Receiver(cfg.node, self.store)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self._stop = threading.Event()
        self._hooks: list[Callable[[], None]] = []

    def start(self) -> None:
        """Recover the spool, then listen and schedule; returns once the node is ready."""
        self.store.recover()
        self.scheduler.add_job(self.sweep, "interval", seconds=self.cfg.series.sweep_every_s,
                               id="stability-sweep")
        self.scheduler.start()
        self.receiver.start()
        sdnotify.notify("READY=1\nSTATUS=receiving")
        log.info("ready", ae_title=self.cfg.node.ae_title, port=self.receiver.port)

    def sweep(self) -> None:
        """Complete series that have been quiet long enough."""
        self.store.complete_quiet(self.cfg.series.stable_after_s)

    def healthy(self) -> bool:
        """What the watchdog vouches for: the scheduler runs and the listener is up."""
        return self.scheduler.running and self.receiver._server is not None

    def run(self) -> None:
        """Start, then block until SIGTERM/SIGINT; ping the systemd watchdog while healthy."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        interval = sdnotify.watchdog_interval_s() or 5.0
        while not self._stop.wait(interval):
            if self.healthy():
                sdnotify.notify("WATCHDOG=1")
        self.stop()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        self._stop.set()

    def stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        self.receiver.stop()
        self.scheduler.shutdown(wait=True)
        log.info("stopped")
