"""Is the node ready to take data and making progress? One test for `/readyz` and the watchdog.

`/readyz` fails when any check fails: a load balancer or monitoring then sends senders
elsewhere and pages someone. The systemd watchdog restarts the service only for the checks a
restart can cure (a listener, worker or scheduler that stopped, or a job stuck inferring past
its time limit); a full disk or an unwritable index make the node unready but are not fixed by
restarting it, so they do not trip the watchdog.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ie_gateway.errors import StoreError
from ie_gateway.store import Store
from ie_gateway.store.space import DiskSpace
from ie_gateway.store.states import JobState

# A stage may run up to the inference time limit; past it plus this the worker counts as stuck.
PROGRESS_MARGIN_S = 60.0


@dataclass(frozen=True)
class Check:
    """One readiness check: its name, whether it passed, a line an admin can act on."""

    name: str
    ok: bool
    detail: str
    restart_helps: bool


class Health:
    """The checks of one running node, read from its parts (no background thread of its own)."""

    def __init__(
        self,
        store: Store,
        *,
        listening: Callable[[], bool] | None,
        worker_alive: Callable[[], bool] | None,
        worker_last_tick: Callable[[], float],
        scheduler_running: Callable[[], bool],
        space: Callable[[], DiskSpace],
        inference_timeout_s: float,
        node: str | None = None,
    ) -> None:
        """``listening`` None: this node has no DICOM listener (a worker); ``worker_alive``
        None: no worker (a receiver). ``node``: judge only the jobs this node holds."""
        self.store = store
        self.node = node
        self.listening = listening
        self.worker_alive = worker_alive
        self.worker_last_tick = worker_last_tick
        self.scheduler_running = scheduler_running
        self.space = space
        self.stuck_after_s = inference_timeout_s + PROGRESS_MARGIN_S
        #: lines fixed at start-up (e.g. where inference runs), shown after the live checks
        self.extra: list[Check] = []

    def checks(self) -> list[Check]:
        listener = [self._listener()] if self.listening is not None else []
        return [*listener, self._index(), self._disk(), *self._progress_checks(), *self.extra]

    def _restart_checks(self) -> list[Check]:
        return [*([self._listener()] if self.listening is not None else []), *self._progress_checks()]

    def _progress_checks(self) -> list[Check]:
        worker = [self._worker(), self._inferring()] if self.worker_alive is not None else []
        return [*worker, self._scheduler()]

    def ready(self) -> bool:
        return all(c.ok for c in self.checks())

    def watchdog_ok(self) -> bool:
        """What the systemd watchdog vouches for: every check a restart would cure passes. (It
        skips the index write test, which may wait on a busy database.)"""
        return all(c.ok for c in self._restart_checks())

    def _listener(self) -> Check:
        assert self.listening is not None
        ok = self.listening()
        return Check("listener", ok, "accepting" if ok else "the DICOM listener is not accepting", True)

    def _index(self) -> Check:
        try:
            self.store.index.check_writable()
        except StoreError as exc:
            return Check("index", False, f"index not writable: {exc}", False)
        return Check("index", True, "writable", False)

    def _disk(self) -> Check:
        space = self.space()
        mb = 2**20
        if space.below_reserve:
            return Check(
                "disk",
                False,
                f"{space.free_bytes // mb} MiB free, below the reserve of "
                f"{space.reserve_bytes // mb} MiB: new associations are refused",
                False,
            )
        return Check("disk", True, f"{space.free_bytes // mb} MiB free", False)

    def _worker(self) -> Check:
        assert self.worker_alive is not None
        if not self.worker_alive():
            return Check("worker", False, "the worker thread has stopped", True)
        quiet = time.monotonic() - self.worker_last_tick()
        if quiet > self.stuck_after_s:
            return Check("worker", False, f"the worker loop has not ticked for {quiet:.0f} s", True)
        return Check("worker", True, "ticking", True)

    def _inferring(self) -> Check:
        now = time.time()
        try:
            mine = [
                j for j in self.store.index.jobs([JobState.INFERRING]) if self.node is None or j.claimed_by == self.node
            ]
            since = [(j.id, self.store.index.entered_at(j.id, JobState.INFERRING)) for j in mine]
        except StoreError:  # the index check says so; a restart would not bring the index back
            return Check("inference", True, "not checked: the index cannot be read", True)
        stuck = [(job_id, now - at) for job_id, at in since if at is not None and now - at > self.stuck_after_s]
        if stuck:
            job_id, seconds = stuck[0]
            return Check("inference", False, f"job {job_id} inferring for {seconds:.0f} s, past its time limit", True)
        return Check("inference", True, "no job past its time limit", True)

    def _scheduler(self) -> Check:
        ok = self.scheduler_running()
        return Check("scheduler", ok, "running" if ok else "the scheduler has stopped", True)
