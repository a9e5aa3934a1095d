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
        listening: Callable[[], bool],
        worker_alive: Callable[[], bool],
        worker_last_tick: Callable[[], float],
        scheduler_running: Callable[[], bool],
        space: Callable[[], DiskSpace],
        inference_timeout_s: float,
    ) -> None:
        self.store = store
        self.listening = listening
        self.worker_alive = worker_alive
        self.worker_last_tick = worker_last_tick
        self.scheduler_running = scheduler_running
        self.space = space
        self.stuck_after_s = inference_timeout_s + PROGRESS_MARGIN_S

    def checks(self) -> list[Check]:
        listener, *progress = self._restart_checks()
        return [listener, self._index(), self._disk(), *progress]

    def _restart_checks(self) -> list[Check]:
        return [self._listener(), self._worker(), self._inferring(), self._scheduler()]

    def ready(self) -> bool:
        return all(c.ok for c in self.checks())

    def watchdog_ok(self) -> bool:
        """What the systemd watchdog vouches for: every check a restart would cure passes. (It
        skips the index write test, which may wait on a busy database.)"""
        return all(c.ok for c in self._restart_checks())

    def _listener(self) -> Check:
        ok = self.listening()
        return Check("listener", ok, "accepting" if ok else "the DICOM listener is not accepting", True)

    def _index(self) -> Check:
        try:
            with self.store.index.tx():  # BEGIN IMMEDIATE: takes the write lock, writes nothing
                pass
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
        if not self.worker_alive():
            return Check("worker", False, "the worker thread has stopped", True)
        quiet = time.monotonic() - self.worker_last_tick()
        if quiet > self.stuck_after_s:
            return Check("worker", False, f"the worker loop has not ticked for {quiet:.0f} s", True)
        return Check("worker", True, "ticking", True)

    def _inferring(self) -> Check:
        now = time.time()
        since = self.store.index.query(
            "SELECT j.id, MAX(t.at) FROM jobs j JOIN transitions t ON t.job_id = j.id AND t.to_state = ? "
            "WHERE j.state = ? GROUP BY j.id",
            (JobState.INFERRING.value, JobState.INFERRING.value),
        )
        stuck = [(int(r[0]), now - float(r[1])) for r in since if now - float(r[1]) > self.stuck_after_s]
        if stuck:
            job_id, seconds = stuck[0]
            return Check("inference", False, f"job {job_id} inferring for {seconds:.0f} s, past its time limit", True)
        return Check("inference", True, "no job past its time limit", True)

    def _scheduler(self) -> Check:
        ok = self.scheduler_running()
        return Check("scheduler", ok, "running" if ok else "the scheduler has stopped", True)
