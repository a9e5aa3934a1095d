"""Wires the node together: spool recovery, the SCP, the worker, the scheduler, signals, systemd.

`ie-gateway serve` builds one Service and calls run(); tests start the same command.
"""

from __future__ import annotations

import functools
import signal
import threading
from datetime import datetime
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from ie_gateway import sdnotify
from ie_gateway.config import GatewayConfig
from ie_gateway.infer.registry import Probe, Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.pipeline import Worker
from ie_gateway.receive import Receiver
from ie_gateway.route import RulesWatcher, RuleSet, load_rules
from ie_gateway.send import Sender
from ie_gateway.store import Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.sync.run import scheduled_cases, scheduled_models

log = structlog.get_logger(__name__)


def registry_for(cfg: GatewayConfig, probe: Probe | None = None) -> Registry:
    """The model registry of a node: packages in models_dir, activation state beside the index;
    ``probe`` (an inference runner's ``verify``) loads and runs a package after its checksums."""
    return Registry(cfg.models_dir, cfg.storage.root / "models-state.json", probe)


def runner_for(cfg: GatewayConfig) -> InferenceRunner:
    """The inference child of a node (or of a CLI command that verifies models)."""
    device = None if cfg.inference.device == "auto" else cfg.inference.device
    return InferenceRunner(cfg.inference.timeout_s, device=device, log_level=cfg.log_level)


def model_exists(registry: Registry, name: str, version: str | None) -> bool:
    """Whether routing may name this model (any installed version when none is pinned)."""
    versions = registry.versions(name)
    return version in versions if version is not None else bool(versions)


def rules_loader(cfg: GatewayConfig, registry: Registry) -> functools.partial[RuleSet]:
    return functools.partial(load_rules, destinations=set(cfg.destinations),
                             model_exists=functools.partial(model_exists, registry))


class Service:
    """The running node."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.storage.root)
        # verification loads models in the inference child, under its time limit
        self.runner = runner_for(cfg)
        self.registry = registry_for(cfg, self.runner.verify)
        self.rules = RulesWatcher(cfg.routing_file, rules_loader(cfg, self.registry))
        self.receiver = Receiver(cfg.node, self.store)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.worker = Worker(cfg, self.store, self.registry, self.runner, lambda: self.rules.current,
                             on_queued=self.deliver_soon)
        self.sender = Sender(cfg.destinations, cfg.delivery, Outbox(self.store.index), self.store.results,
                             on_settled=self.worker.settle)
        self._stop = threading.Event()

    def start(self) -> None:
        """Recover the spool, load the rules, then listen and schedule; returns once ready."""
        self.store.recover()
        self.reload_rules(force=True)
        if self.rules.current is None and self.rules.last_error is not None:
            raise self.rules.last_error
        s = self.scheduler
        s.add_job(self.sweep, "interval", seconds=self.cfg.series.sweep_every_s, id="stability-sweep")
        s.add_job(self.sender.deliver_due, "interval", seconds=self.cfg.delivery.every_s, id="outbox")
        s.add_job(self.reload_rules, "interval", seconds=2, id="rules-watch")
        s.add_job(self.purge, "interval", hours=1, id="retention", next_run_time=datetime.now())
        if self.cfg.sync.enabled:
            s.add_job(scheduled_cases, CronTrigger.from_crontab(self.cfg.sync.cases_cron),
                      args=(self.cfg, self.store), id="sync-cases")
            s.add_job(scheduled_models, CronTrigger.from_crontab(self.cfg.sync.models_cron),
                      args=(self.cfg, self.registry), id="sync-models")
        s.start()
        self.worker.start()
        self.receiver.start()
        sdnotify.notify("READY=1\nSTATUS=receiving")
        log.info("ready", ae_title=self.cfg.node.ae_title, port=self.receiver.port)

    def sweep(self) -> None:
        """Complete series that have been quiet long enough, and hand them to the worker."""
        if self.store.complete_quiet(self.cfg.series.stable_after_s):
            self.worker.wake()

    def purge(self) -> None:
        """Retention: free the spool of series that ended long enough ago."""
        r = self.cfg.retention
        self.store.purge_expired(r.unrouted_days, r.finished_days, sync_enabled=self.cfg.sync.enabled)

    def deliver_soon(self) -> None:
        """Run the outbox now rather than at its next interval."""
        job = self.scheduler.get_job("outbox")
        if job is not None:
            job.modify(next_run_time=datetime.now(job.next_run_time.tzinfo if job.next_run_time else None))

    def reload_rules(self, force: bool = False) -> None:
        """Take a changed rules file if it validates; otherwise keep the rules in force."""
        previous_error = self.rules.last_error
        new = self.rules.poll(force=force)
        if new is not None:
            log.info("routing rules loaded", rules=len(new.rules))
            self.worker.wake()
        elif self.rules.last_error is not None and self.rules.last_error is not previous_error:
            log.error("routing rules refused; the previous rules stay in force",
                      errors=self.rules.last_error.errors)

    def healthy(self) -> bool:
        """What the watchdog vouches for: scheduler, worker and listener are alive."""
        return self.scheduler.running and self.worker.alive() and self.receiver.listening

    def run(self) -> None:
        """Start, then block until SIGTERM/SIGINT; SIGHUP reloads the rules."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.reload_rules(force=True))
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
        self.worker.stop()
        self.runner.close()
        log.info("stopped")

