"""Wires the node together: spool recovery, the SCP, the worker, the scheduler, the HTTP
endpoint (health, metrics), signals, systemd.

`ie-gateway serve` builds one Service and calls run(); tests start the same command. A node
plays a role: ``all`` (one VM: everything), ``receiver`` (accepts associations, writes the
spool, completes series) or ``worker`` (claims jobs, runs the models, writes and delivers
results). Receivers and workers on several machines share a PostgreSQL index and a spool on a
network mount; the scheduled tasks that must run once (series completion, retention, disk
pressure, Azure sync) take a lock in the index first, so whichever node gets it runs them.
"""

from __future__ import annotations

import glob
import signal
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from starlette.routing import BaseRoute

from ie_gateway.config import GatewayConfig, InferenceSettings
from ie_gateway.errors import ConfigError
from ie_gateway.infer.registry import registry_for
from ie_gateway.infer.runner import runner_for
from ie_gateway.interop.stow import stow_routes
from ie_gateway.listeners import ListenerProcesses
from ie_gateway.ops import metrics, sdnotify
from ie_gateway.ops.health import Check, Health
from ie_gateway.ops.httpserver import HttpServer, build_app
from ie_gateway.ops.notify import Notifier
from ie_gateway.ops.signals import SignalInbox
from ie_gateway.pipeline import Worker
from ie_gateway.qa import drift
from ie_gateway.receive import Receiver, listen_sockets
from ie_gateway.route import RulesWatcher
from ie_gateway.route.load import rules_loader
from ie_gateway.send import Sender
from ie_gateway.store import Store
from ie_gateway.store.db import node_name
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.space import DiskSpace, disk_space
from ie_gateway.sync.run import scheduled_cases, scheduled_models
from ie_gateway.vocab import Device, Role
from ie_gateway.web import web_routes

log = structlog.get_logger(__name__)


def gpu_device_nodes() -> list[str]:
    """NVIDIA device nodes this process can see (none under systemd's PrivateDevices=yes)."""
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def inference_device(settings: InferenceSettings, nodes: list[str]) -> Device:
    """The device inference will use: the configured one, or for ``auto`` CUDA when torch sees it.

    NVIDIA's driver works through its device ``nodes``: with none, CUDA cannot be available, and
    the node need not import torch (a second or more of start-up) to know it.
    """
    if settings.device is not Device.AUTO:
        return settings.device
    if not nodes:
        return Device.CPU
    import torch  # here, not at the top: the inference itself runs in the child

    return Device.CUDA if torch.cuda.is_available() else Device.CPU


#: PCI vendor of NVIDIA and the display-controller class prefix (VGA 0x0300, 3D 0x0302)
NVIDIA_VENDOR = "0x10de"
DISPLAY_CLASS = "0x03"


def nvidia_pci_gpus(sys_root: Path = Path("/sys")) -> list[str]:
    """PCI addresses of NVIDIA GPUs on this machine, driver loaded or not.

    sysfs lists the card even when no driver is installed and when the unit hides ``/dev``, so
    the node can tell "no GPU" from "a GPU it cannot use".
    """
    found = []
    for device in sorted((sys_root / "bus" / "pci" / "devices").glob("*")):
        try:
            vendor = (device / "vendor").read_text().strip()
            klass = (device / "class").read_text().strip()
        except OSError:
            continue
        if vendor == NVIDIA_VENDOR and klass.startswith(DISPLAY_CLASS):
            found.append(device.name)
    return found


def gpu_unused(settings: InferenceSettings, device: str, nodes: list[str], pci_gpus: Sequence[str]) -> str | None:
    """Why inference runs on the CPU although this machine has an NVIDIA GPU; None otherwise."""
    if device != Device.CPU or not (nodes or pci_gpus):
        return None
    if settings.device is Device.CPU:
        return "inference.device is cpu although this machine has an NVIDIA GPU"
    if not nodes:
        return (
            f"an NVIDIA GPU is on the PCI bus ({', '.join(pci_gpus)}) but no /dev/nvidia* node is visible: "
            "install the driver and load nvidia-uvm at boot, then re-run deploy/install.sh (it writes the "
            "unit's gpu.conf)"
        )
    return "check the NVIDIA driver and that torch is a CUDA build (torch.cuda.is_available())"


def report_inference_device(settings: InferenceSettings, nodes: list[str], pci_gpus: Sequence[str] = ()) -> Device:
    """Log where inference runs; warn when ``auto`` chose the CPU although an NVIDIA GPU is there
    (device ``nodes`` or a card on the PCI bus: a driver or torch build problem, or a unit that
    hides the devices). Returns the device."""
    device = inference_device(settings, nodes)
    metrics.INFERENCE_DEVICE.labels(device).set(1)
    log.info("inference device", device=device, setting=settings.device, gpu_device_nodes=nodes)
    unused = gpu_unused(settings, device, nodes, pci_gpus)
    if unused is not None and settings.device is Device.AUTO:
        log.warning(
            "inference falls back to the CPU although a GPU is present",
            gpu_device_nodes=nodes,
            pci_gpus=list(pci_gpus),
            what_to_do=unused,
        )
    return device


def device_check(settings: InferenceSettings, device: str, nodes: list[str], pci_gpus: Sequence[str]) -> Check:
    """The `/readyz` line on where inference runs. It never makes the node unready (the CPU
    works, slowly) but says when a GPU sits unused, for monitoring to pick up."""
    unused = gpu_unused(settings, device, nodes, pci_gpus)
    detail = f"{device}" + (f"; GPU present but unused: {unused}" if unused else "")
    return Check("inference_device", True, detail, False)


class Service:
    """The running node. Its HTTP endpoint carries health, metrics and the admin's page, and
    ``extra_routes`` beside them."""

    def __init__(self, cfg: GatewayConfig, extra_routes: Sequence[BaseRoute] = (), role: Role = Role.ALL) -> None:
        self.cfg = cfg
        self.role = role
        self.node = node_name()
        self.store = Store.for_settings(cfg.storage)
        if role is not Role.ALL and not self.store.index.shared:
            raise ConfigError(
                [
                    (
                        f"--role {role.value} shares the index with other nodes: set storage.index to a "
                        "postgresql:// URL (an SQLite index belongs to one node, --role all)"
                    )
                ]
            )
        # verification loads models in the inference child, under its time limit
        self.runner = runner_for(cfg) if role.works else None
        self.registry = registry_for(cfg, self.runner.verify if self.runner is not None else None)
        self.rules = RulesWatcher(cfg.routing_file, rules_loader(cfg, self.registry))
        self.receiver: Receiver | None = None
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.worker = (
            Worker(
                cfg,
                self.store,
                self.registry,
                self.runner,
                lambda: self.rules.current,
                on_queued=self.deliver_soon,
                node=self.node,
            )
            if self.runner is not None
            else None
        )
        self.sender = (
            Sender(
                cfg.destinations,
                cfg.delivery,
                Outbox(self.store.index),
                self.store.results,
                node=self.node,
                after_pass=self.worker.wake,
            )
            if self.worker is not None
            else None
        )
        if role.receives:
            reports = self.sender.commitments if self.sender is not None else None
            self.receiver = Receiver(
                cfg.node, self.store, space=self.space, limits=cfg.limits, commitment_reports=reports
            )
        # node.listener_processes > 1: more processes accept associations on the same ports
        several = self.receiver is not None and cfg.node.listener_processes > 1
        self.listeners = ListenerProcesses(cfg) if several else None
        worker = self.worker
        receiver = self.receiver
        listeners = self.listeners
        self.health = Health(
            self.store,
            listening=(
                (lambda: receiver.listening and (listeners is None or listeners.alive()))
                if receiver is not None
                else None
            ),
            worker_alive=worker.alive if worker is not None else None,
            worker_last_tick=(lambda: worker.last_tick) if worker is not None else float,
            scheduler_running=lambda: bool(self.scheduler.running),
            space=self.space,
            inference_timeout_s=cfg.inference.timeout_s,
            node=self.node if self.store.index.shared else None,
        )
        self.collector = metrics.NodeCollector(
            self.store,
            self.space,
            self.active_models,
            drift=lambda: drift.gauge_values(
                self.store.index, cfg.agreement, cfg.models_dir, cfg.storage.root / drift.COMMISSIONED_FILE
            ),
        )
        stow = stow_routes(cfg, self.store) if role.receives else []
        routes = [*web_routes(cfg, self.store, self.registry), *stow, *extra_routes]
        self.http = HttpServer(cfg.http, build_app(self.health, routes)) if cfg.http.enabled else None
        self.notifier = Notifier(cfg, self.store.index) if cfg.notify else None
        self._collecting = False

    def space(self) -> DiskSpace:
        """Free space under storage.root against storage.reserve, measured now."""
        return disk_space(self.cfg.storage.root, self.cfg.storage.reserve)

    def active_models(self) -> list[metrics.ModelVersionLevel]:
        return [metrics.ModelVersionLevel(n, v) for n, v in self.registry.active_versions().items()]

    def start(self) -> None:
        """Recover the spool, load the rules, then listen and schedule; returns once ready."""
        if self.role.receives:
            with self.store.index.singleton("spool-recovery") as mine:
                if mine:
                    self.store.recover()
        if self.role.works:
            self.reload_rules(force=True)
            if self.rules.current is None and self.rules.last_error is not None:
                raise self.rules.last_error
        metrics.REGISTRY.register(self.collector)
        self._collecting = True
        if self.http is not None:  # first: a port in use stops the start before anything runs
            self.http.start()
        s = self.scheduler
        if self.role.receives:
            s.add_job(
                self._once("series-completion", self.sweep),
                "interval",
                seconds=self.cfg.series.sweep_every_s,
                id="stability-sweep",
            )
        if self.receiver is not None:  # this host's temp folder: every receiving node its own
            s.add_job(
                self.receiver.remove_abandoned_receipts,
                "interval",
                seconds=min(60.0, self.cfg.node.network_timeout_s),
                id="abandoned-receipts",
                next_run_time=datetime.now(),
            )
        if self.worker is not None:
            # each worker's own inference child: not one node at a time
            s.add_job(self.worker.warm_up, "interval", seconds=self.cfg.series.sweep_every_s, id="warm-up")
        if self.sender is not None:
            s.add_job(self.sender.deliver_due, "interval", seconds=self.cfg.delivery.every_s, id="outbox")
            s.add_job(self.reload_rules, "interval", seconds=2, id="rules-watch")
        s.add_job(
            self._once("retention", self.purge), "interval", hours=1, id="retention", next_run_time=datetime.now()
        )
        s.add_job(self._once("disk-pressure", self.relieve_pressure), "interval", seconds=10, id="disk-pressure")
        if self.cfg.sync.enabled:
            s.add_job(
                self._once("sync-cases", scheduled_cases),
                CronTrigger.from_crontab(self.cfg.sync.cases_cron),
                args=(self.cfg, self.store),
                id="sync-cases",
            )
            s.add_job(
                self._once("sync-models", scheduled_models),
                CronTrigger.from_crontab(self.cfg.sync.models_cron),
                args=(self.cfg, self.registry),
                id="sync-models",
            )
        s.start()
        if self.notifier is not None:
            self.notifier.start()
        if self.worker is not None:
            nodes, pci_gpus = gpu_device_nodes(), nvidia_pci_gpus()
            device = report_inference_device(self.cfg.inference, nodes, pci_gpus)
            self.health.extra.append(device_check(self.cfg.inference, device, nodes, pci_gpus))
            self.worker.start()
        # the extra listener processes first: once the main process answers, every listener does
        shared = None
        if self.listeners is not None:  # one socket per port, which every listener process accepts from
            shared = listen_sockets(self.cfg.node)
            self.listeners.start(shared)
        if self.receiver is not None:
            self.receiver.start(shared)
        sdnotify.notify("READY=1\nSTATUS=" + ("receiving" if self.receiver is not None else "working"))
        log.info(
            "ready",
            role=self.role.value,
            node=self.node,
            index=self.store.index.db.where,
            ae_title=self.cfg.node.ae_title,
            port=self.receiver.port if self.receiver is not None else None,
            listener_processes=self.cfg.node.listener_processes if self.receiver is not None else None,
        )

    def _once(self, name: str, task: Callable[..., Any]) -> Callable[..., None]:
        """``task`` run only while this node holds the index's lock ``name``: one node at a time."""

        def run(*args: Any) -> None:
            with self.store.index.singleton(name) as mine:
                if mine:
                    task(*args)

        run.__name__ = f"{name} (one node at a time)"
        return run

    def sweep(self) -> None:
        """Complete series that have been quiet long enough, and hand them to the worker."""
        if self.store.complete_quiet(self.cfg.series.stable_after_s) and self.worker is not None:
            self.worker.wake()

    def purge(self) -> None:
        """Retention: free the spool of series that ended long enough ago."""
        r = self.cfg.retention
        self.store.purge_expired(r.unrouted_days, r.finished_days, sync_enabled=self.cfg.sync.enabled)

    def relieve_pressure(self) -> None:
        """Below the disk reserve: purge delivered series, oldest first, until back above it."""
        space = self.space()
        if not space.below_reserve:
            return
        log.warning("disk below reserve", free_mb=space.free_bytes // 2**20, reserve_mb=space.reserve_bytes // 2**20)
        purged = self.store.purge_for_space(lambda: not self.space().below_reserve, sync_enabled=self.cfg.sync.enabled)
        after = self.space()
        if after.below_reserve:
            log.error(
                "disk still below reserve; new associations stay refused",
                purged=purged,
                free_mb=after.free_bytes // 2**20,
                reserve_mb=after.reserve_bytes // 2**20,
                what_to_do="free space under storage.root or act on failed and held jobs",
            )

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
            if self.worker is not None:
                self.worker.wake()
        elif self.rules.last_error is not None and self.rules.last_error is not previous_error:
            log.error("routing rules refused; the previous rules stay in force", errors=self.rules.last_error.errors)

    def healthy(self) -> bool:
        """What the watchdog vouches for: the checks of /readyz that a restart would cure. Never
        raises: the main loop that pings the watchdog must not die of a failing check."""
        try:
            return self.health.watchdog_ok()
        except Exception:  # top of the watchdog loop: no ping, and a line saying why
            log.exception("health check failed")
            return False

    def run(self) -> None:
        """Start, then serve until SIGTERM/SIGINT; SIGHUP reloads the rules. The signals are
        read here, in the main loop, from a SignalInbox (see ops/signals.py for why), between
        the watchdog's pings."""
        inbox = SignalInbox([signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
        self.start()
        interval = sdnotify.watchdog_interval_s() or 5.0
        next_ping = time.monotonic()
        while True:
            if time.monotonic() >= next_ping:
                if self.healthy():
                    sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + interval
            received = inbox.wait(max(0.0, next_ping - time.monotonic()))
            if signal.SIGHUP in received:
                self.reload_rules(force=True)
            stops = [s for s in received if s is not signal.SIGHUP]
            if stops:
                log.info("stopping", signal=stops[0].name)
                break
        self.stop()

    def stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self.http is not None:
            self.http.stop()
        if self._collecting:
            metrics.REGISTRY.unregister(self.collector)
            self._collecting = False
        if self.receiver is not None:
            self.receiver.stop()
        if self.listeners is not None:
            self.listeners.stop()
        self.scheduler.shutdown(wait=True)
        if self.sender is not None:
            self.sender.close()
        if self.worker is not None:
            self.worker.stop()
        if self.runner is not None:
            self.runner.close()
        if self.notifier is not None:  # last: it tells what the worker and the outbox settled
            self.notifier.stop()
        log.info("stopped")
