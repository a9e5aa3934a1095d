"""The worker: claims series jobs in queue order and runs the stages after receipt.

complete ─route─▶ routed ─prepare─▶ prepared ─infer─▶ inferred ─write─▶ writing ─finish─▶ sending ─outbox─▶ delivered
   └▶ unrouted        └▶ refused / failed      └▶ failed   │└▶ failed             └▶ failed    └▶ failed (dead letter)
                                                           └▶ needs_review (plausibility checks failed,
                                                              route `review: hold`; `release` → inferred)

write makes and queues the RT-STRUCTs (what the planning system needs first); finish makes the
SEGs and the QA picture (a held result gets its picture in write, before it is held).
complete (a clinician's structure set on a contoured CT) ─route─▶ assessing ─assess─▶ unrouted

The stages are functions of their inputs in their own modules where they have grown (``plan``
for the output plan, ``assess`` for agreement); the sender settles jobs through the store
(``Outbox.settle``), not through the worker. The assess stage is claimed last, so a CT never
waits behind a comparison that has not started.

Each stage reads what the previous one stored (index rows, files in the job's folder) and
stores its own output before moving the job on, so a crash repeats at most one stage. This is
the one place that catches broadly: whatever a stage raises parks the job with the reason.

The queue order (``Index.queue_order``): a job's priority (high, normal, low; the least urgent
of its rules' and its caller's, set when it is routed) first, then the order in which the
series completed; a job waiting longer than ``worker.max_wait_s`` goes before every newer one.

A worker runs its stages in lanes (``worker.pipeline``), threads that each claim jobs for some
of the stages, so the stages of different jobs overlap: the inference lane runs the model on
one job while the prepare lane loads and checks the next one's volume (at most
``worker.prepare_ahead`` ahead, so the disk is not spent ahead of the model) and the write lane
writes and queues the previous one's RT-STRUCTs; the prepare lane finishes the other results. The inference lane prepares
a volume itself when none is ready, so the model is never idle while a routed job waits. A
ready volume is taken before an unprepared job of higher priority: priority decides the order
in which volumes are prepared, and at most ``prepare_ahead`` wait.

Several workers (on several machines sharing the index and the spool) may run at once: each
claims a job for one stage under a lease that it renews while the stage runs and gives up when
the stage ends. A worker that dies stops renewing; once its lease lapses another worker claims
the job and runs the stage again: a job caught mid-inference starts its inference afresh on
its stored volume, and
one caught mid-write writes its outputs again under the UIDs stored before its first file, so
the planning system receives the same instances, never new ones.
"""

from __future__ import annotations

import errno
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import (
    AgreementError,
    ApprovalRefused,
    ConfigError,
    GatewayError,
    InferenceCrashed,
    InferenceOutOfMemory,
    ModelError,
    StoreError,
    VolumeRefused,
    WriteError,
)
from ie_gateway.files import raise_if_disk_full
from ie_gateway.imaging import (
    Masks,
    SliceGeometry,
    StructureInfo,
    helper_threads,
    make_masks,
    read_headers,
    structures_of,
)
from ie_gateway.infer.registry import ModelVersion, Registry
from ie_gateway.infer.runner import InferenceRunner, runner_for
from ie_gateway.infer.types import InferenceResult
from ie_gateway.log import scrub
from ie_gateway.ops import metrics
from ie_gateway.pictures import render_qa_png
from ie_gateway.plan import CT_FILE, labels_file, not_sent, plan_outputs
from ie_gateway.qa.approvals import link_approved
from ie_gateway.qa.assess import assess_structure_set
from ie_gateway.qa.plausibility import Findings, check_result
from ie_gateway.roinames import load_roi_names
from ie_gateway.route import Route, RuleSet, SeriesFacts
from ie_gateway.store import Job, JobRoute, JobState, OutputKind, ReviewPolicy, Store, TransitionError
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import (
    OutputPlan,
    OutputUIDs,
    PlannedOutput,
    Review,
    StageAttempts,
    output_sop_class,
)
from ie_gateway.vocab import Device, Priority, SegEncoding, Stage
from ie_gateway.volume import VolumeChecks, load_volume
from ie_gateway.write.common import ModelInfo
from ie_gateway.write.rtstruct import build_rtstruct
from ie_gateway.write.seg import build_seg
from ie_gateway.write.validate import validate_rtstruct, validate_seg

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RouteResult:
    """One route's result as the write stage holds it: the label map, the masks both writers
    and the checks measure, and what the checks found."""

    index: int
    route: JobRoute
    model: ModelVersion
    labels: np.ndarray
    masks: Masks
    structures: list[StructureInfo]
    findings: Findings


@dataclass(frozen=True)
class StageClaim:
    """A stage as a lane looks for work: the states it takes a job from, and whether the lane
    takes it only while fewer than ``worker.prepare_ahead`` volumes wait for the model."""

    states: tuple[JobState, ...]
    stage: Stage
    ahead_only: bool = False

    @property
    def after_first_delivery(self) -> bool:
        """Whether the job's queued RT-STRUCTs have their first C-STORE first: the finish
        stage's (the SEG, the QA picture), in whichever lane runs it."""
        return self.stage is Stage.FINISH


#: the prepare lane's ``nice``: it runs beside the model, which should keep the CPU it needs
BACKGROUND_NICENESS = 10
#: how long the finish stage lets a job's RT-STRUCTs go first: their first C-STORE ends well
#: within it (0.1-0.3 s for a 200-slice thorax); a destination that hangs holds the SEG up no longer
RTSTRUCT_HEAD_START_S = 10.0


class Lane:
    """One claim loop of a worker, over some of its stages, in a thread of its own: the lanes
    of a node share nothing but the store (each holds its own job under a lease)."""

    def __init__(self, worker: Worker, name: str, claims: Sequence[StageClaim], niceness: int = 0) -> None:
        """``niceness``: this thread's scheduling priority (Linux ``nice``), for background work
        that should take only the CPU the model and the RT-STRUCTs leave."""
        self.worker = worker
        self.name = name
        self.claims = tuple(claims)
        self.niceness = niceness
        self.held: int | None = None  # the job this lane holds now
        self.stage = ""  # and the stage it runs
        self.last_tick = time.monotonic()  # health: a loop that stops ticking is stuck
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)

    def _loop(self) -> None:
        if self.niceness:
            try:  # a thread's own id: on Linux this lowers this thread only
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
            except OSError as exc:
                log.warning("lane priority not lowered", lane=self.name, error=str(exc))
        failures = 0
        stop = self.worker.stopping
        while not stop.is_set():
            self.last_tick = time.monotonic()
            try:
                busy = self.run_once()
                failures = 0
            except StoreError as exc:  # the index went away (a restart, the network): wait for it
                failures += 1
                busy = False
                log.warning("index unavailable; the worker waits", lane=self.name, error=detail(exc), failures=failures)
            if not busy:
                self.wake.wait(min(1.0 * 2 ** max(failures - 1, 0), 30.0))
                self.wake.clear()

    def run_once(self) -> bool:
        """Claim a job for the first of this lane's stages that has one and advance it by that
        stage; False when there was nothing to do."""
        worker = self.worker
        index = worker.store.index
        for claim in self.claims:
            if claim.ahead_only and len(index.jobs([JobState.PREPARED])) >= worker.cfg.worker.prepare_ahead:
                continue  # enough volumes wait for the model: the disk is not spent ahead of it
            job = index.claim(
                claim.states,
                worker.node,
                worker.lease_s,
                max_wait_s=worker.max_wait_s,
                behind_first_delivery_s=RTSTRUCT_HEAD_START_S if claim.after_first_delivery else None,
            )
            if job is None:
                continue
            self.held, self.stage = job.id, claim.stage
            started = time.monotonic()
            structlog.contextvars.bind_contextvars(job=job.id, stage=claim.stage)
            log.info("stage begun", lane=self.name)
            try:
                worker._attempt(job, claim.stage)
            finally:
                self.held = None
                worker._release(job.id)
                metrics.STAGE_SECONDS.labels(claim.stage).observe(time.monotonic() - started)
                log.info("stage done", lane=self.name, seconds=round(time.monotonic() - started, 3))
                structlog.contextvars.unbind_contextvars("job", "stage")
                worker.wake()  # the job moved on: the lane of its next stage may take it now
            return True
        return False


class Worker:
    """Runs jobs in background lanes, each job's stage under a lease that is renewed."""

    def __init__(
        self,
        cfg: GatewayConfig,
        store: Store,
        registry: Registry,
        runner: InferenceRunner,
        rules: Callable[[], RuleSet | None],
        on_queued: Callable[[], None] = lambda: None,
        node: str = "local",
    ) -> None:
        """``node``: this worker's name in the index (host:pid), which `status` shows as the
        holder of the jobs it works on."""
        self.cfg = cfg
        self.node = node
        self.lease_s = cfg.worker.lease_s
        self.max_wait_s = cfg.worker.max_wait_s
        self.store = store
        self.registry = registry
        self.runner = runner
        self.rules = rules
        self.outbox = Outbox(store.index)
        self.on_queued = on_queued
        self.checks = volume_checks(cfg)
        #: a CPU inference process for a job that ran CUDA out of memory (None: not allowed)
        self.cpu_runner: Callable[[], InferenceRunner] | None = (
            (lambda: runner_for(cfg, cpu=True))
            if cfg.inference.cpu_on_oom and cfg.inference.device is not Device.CPU
            else None
        )
        self.stopping = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._stage_runs: dict[Stage, Callable[[Job], None]] = {
            Stage.ROUTE: self.route,
            Stage.PREPARE: self.prepare,
            Stage.INFER: self.infer,
            Stage.WRITE: self.write,
            Stage.FINISH: self.finish,
            Stage.ASSESS: self.assess,
        }
        self.serial = Lane(self, "all", [StageClaim(states, stage) for states, stage in self.STAGES])
        self.lanes = self._pipelined_lanes() if cfg.worker.pipeline else [self.serial]
        #: (job, model) pairs whose warm-up was asked for, kept while the job is receiving
        self._warmed: set[tuple[int, str]] = set()
        self._to_warm: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._warmer = threading.Thread(target=self._warm_loop, name="warm-up", daemon=True)

    #: (states a stage takes a job from, the stage), in the order one lane doing every stage
    #: looks for work (``worker.pipeline: false``, and :meth:`run_once`); a job claimed while
    #: `inferring` is one whose worker's lease lapsed mid-inference
    STAGES: tuple[tuple[tuple[JobState, ...], Stage], ...] = (
        ((JobState.INFERRED,), Stage.WRITE),
        ((JobState.WRITING,), Stage.FINISH),
        ((JobState.COMPLETE,), Stage.ROUTE),
        ((JobState.PREPARED, JobState.INFERRING), Stage.INFER),
        ((JobState.ROUTED,), Stage.PREPARE),
        ((JobState.ASSESSING,), Stage.ASSESS),  # last: a CT never waits behind a comparison
    )

    def _pipelined_lanes(self) -> list[Lane]:
        """The inference lane keeps the model busy (it prepares a volume itself only when none
        is ready); the write lane takes a label map as soon as it is stored and does nothing
        but the RT-STRUCTs, so nothing else the node does delays them; the prepare lane routes,
        keeps up to ``worker.prepare_ahead`` volumes ready, finishes the results (SEGs, QA
        picture) once the RT-STRUCTs' first C-STORE has ended, and assesses last, at a lower CPU
        priority: on a CPU node the model's threads slow down badly when a core is taken from
        them, so that work fills the gaps instead."""
        infer = StageClaim((JobState.PREPARED, JobState.INFERRING), Stage.INFER)
        return [
            Lane(self, "infer", [infer, StageClaim((JobState.ROUTED,), Stage.PREPARE)]),
            Lane(self, "write", [StageClaim((JobState.INFERRED,), Stage.WRITE)]),
            Lane(
                self,
                "prepare",
                [
                    StageClaim((JobState.COMPLETE,), Stage.ROUTE),
                    StageClaim((JobState.ROUTED,), Stage.PREPARE, ahead_only=True),
                    StageClaim((JobState.WRITING,), Stage.FINISH),
                    StageClaim((JobState.ASSESSING,), Stage.ASSESS),
                ],
                niceness=BACKGROUND_NICENESS,
            ),
        ]

    @property
    def last_tick(self) -> float:
        """When the least recently ticking lane last did (health: a stuck loop stops ticking)."""
        return min(lane.last_tick for lane in self.lanes)

    def start(self) -> None:
        for lane in self.lanes:
            lane.thread.start()
        self._renewer.start()
        self._warmer.start()

    def wake(self) -> None:
        """Look for work now (a series completed, an admin replayed a job, a stage ended)."""
        for lane in self.lanes:
            lane.wake.set()

    def warm_up(self) -> None:
        """Have the models that the rules give the series still arriving verified now, in the
        inference child (its start, torch's import, the model's load and probe), so that routing
        a series when it completes waits for none of it. Without this, the first series after a
        start paid 5-7 s in its route stage, after its quiet period, on a 2-core machine.

        The rules see the first instance's header, as they will when the series completes; a rule
        on ``instances`` that matches only later warms its model then. Best effort: a model that
        fails is the route stage's to report. A node that receives nothing its rules route
        starts no inference child."""
        rules = self.rules()
        if rules is None or self.stopping.is_set():
            return
        receiving = [j for j in self.store.index.jobs([JobState.RECEIVING]) if j.header.modality != "RTSTRUCT"]
        ids = {job.id for job in receiving}
        self._warmed = {key for key in self._warmed if key[0] in ids}
        for job in receiving:
            for route in rules.route(_facts(job)).routes:
                key = (job.id, _spec(route))
                if key not in self._warmed:
                    self._warmed.add(key)
                    self._to_warm.put(key)

    def _warm_loop(self) -> None:
        """Verify the models :meth:`warm_up` asks for, one at a time, until the worker stops."""
        while (asked := self._to_warm.get()) is not None and not self.stopping.is_set():
            job_id, spec = asked
            try:
                self.registry.resolve(spec)
            except (ModelError, ConfigError) as exc:
                log.info("model warm-up failed; the route stage will say why", job=job_id, model=spec, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - top of the warm-up thread: it must go on
                log.error("model warm-up failed", job=job_id, model=spec, error=detail(exc))

    def stop(self) -> None:
        self.stopping.set()
        self._to_warm.put(None)
        self.wake()
        for lane in self.lanes:
            lane.thread.join(timeout=30)
        self._renewer.join(timeout=5)
        if self._warmer.is_alive():
            self._warmer.join(timeout=30)  # a probe in the inference child, before it is closed
        for lane in self.lanes:
            held = lane.held
            if held is not None:  # still at it as the node stops: interrupted, not crashed
                try:
                    self.store.index.end_stage(held, lane.stage)
                except StoreError as exc:
                    log.warning("stage end not recorded", job=held, error=detail(exc))

    def alive(self) -> bool:
        return all(lane.thread.is_alive() for lane in self.lanes)

    def run_once(self) -> bool:
        """Claim a job for any stage and advance it by one stage, in this thread; False when
        there was nothing to do."""
        return self.serial.run_once()

    def _renew_loop(self) -> None:
        """Renew the lease of each lane's job in hand every third of the lease."""
        while not self.stopping.wait(self.lease_s / 3):
            for lane in self.lanes:
                held = lane.held
                if held is None:
                    continue
                try:
                    kept = self.store.index.renew(held, self.node, self.lease_s)
                except GatewayError as exc:
                    log.warning("lease not renewed", job=held, error=str(exc))
                    continue
                if not kept and lane.held == held:
                    log.error("lease lost: another worker has taken the job over", job=held)

    def _attempt(self, job: Job, stage: Stage) -> None:
        """Run one stage of a claimed job, counted in the index so that a job that keeps
        killing the node (or its inference process) fails instead of looping; a transient
        failure (full disk, index outage, GPU memory) is retried later, anything else parks it."""
        tries = self.store.index.begin_stage(job.id, stage)
        crashed = False
        try:
            if tries.crashes >= self.cfg.worker.max_crashes:
                self._park(job, JobState.FAILED, crashed_reason(tries.crashes, stage))
                return
            self._stage_runs[stage](job)
        except VolumeRefused as exc:
            self._park(job, JobState.REFUSED, str(exc))
        except InferenceCrashed as exc:
            if self.stopping.is_set():  # the node stopped its inference process: no fault of the job
                self._back_to_start(job, f"{stage}: interrupted as the node stopped")
            else:
                crashed = True
                self._after_crash(job, stage, tries, exc)
        except (StoreError, InferenceOutOfMemory, OSError) as exc:
            if not transient(exc):
                self._park(job, JobState.FAILED, f"{stage}: {detail(exc)}")
            else:
                self._retry_later(job, stage, tries, exc)
        except GatewayError as exc:
            self._park(job, JobState.FAILED, f"{stage}: {detail(exc)}")
        except Exception as exc:
            log.exception("stage crashed")
            self._park(job, JobState.FAILED, f"{stage}: internal error {type(exc).__name__}: {detail(exc)}")
        finally:
            self.store.index.end_stage(job.id, stage, crashed=crashed)

    def _after_crash(self, job: Job, stage: str, tries: StageAttempts, exc: InferenceCrashed) -> None:
        """Our inference process died under this job: the job is run again, until it has done
        so ``max_crashes`` times."""
        crashes = tries.crashes + 1
        if crashes >= self.cfg.worker.max_crashes:
            self._park(job, JobState.FAILED, f"{crashed_reason(crashes, stage)} (last: {detail(exc)})")
            return
        log.warning("stage crashed its process; the job runs again", crashes=crashes, reason=str(exc))
        self._back_to_start(job, f"{stage}: {detail(exc)}; running it again")

    def _retry_later(self, job: Job, stage: str, tries: StageAttempts, exc: Exception) -> None:
        """Back off: the job keeps its place and no worker claims it before the wait is over."""
        settings = self.cfg.worker
        what = f"{stage}: {transient_reason(exc)}"
        if tries.attempts >= settings.max_retries:
            self._park(job, JobState.FAILED, f"{what}; gave up after {tries.attempts} tries")
            return
        wait = min(settings.retry_cap_s, settings.retry_base_s * 2 ** (tries.attempts - 1))
        wait *= random.uniform(0.8, 1.0)  # jitter: workers that failed together do not retry together
        reason = f"{what}; retry {tries.attempts} of {settings.max_retries - 1} in {wait:.0f} s"
        log.warning("transient failure; the job is retried", reason=reason)
        try:
            self._back_to_start(job, reason)
            self.store.index.defer(job.id, self.store.index.db.now() + wait, reason)
        except StoreError as exc2:  # the index is away: the lease lapses and the job is claimed again
            log.warning("retry not recorded", error=detail(exc2))

    def _back_to_start(self, job: Job, reason: str) -> None:
        """A stage to be run again starts where it started: a job caught inferring goes back to
        its stored volume."""
        if self.store.index.job(job.id).state is JobState.INFERRING:
            self.store.index.transition(job.id, JobState.PREPARED, reason=reason)

    def _release(self, job_id: int) -> None:
        try:
            self.store.index.release(job_id, self.node)
        except GatewayError as exc:  # the lease lapses by itself
            log.warning("lease not released", error=str(exc))

    def _park(self, job: Job, state: JobState, reason: str) -> None:
        log.warning("job parked", state=state.value, reason=reason)
        try:
            self.store.index.transition(job.id, state, reason=reason)
        except TransitionError as exc:
            log.error("job could not be parked", state=state.value, error=str(exc))

    # --- stages -----------------------------------------------------------------------------

    def route(self, job: Job) -> None:
        if job.header.modality == "RTSTRUCT":
            # a clinician's structure set for a CT we contoured travels with that case (sync);
            # its agreement figures wait for the assess stage, behind every CT
            try:
                ct_job = link_approved(self.store, job, self.cfg.approvals.accept_from)
            except ApprovalRefused as exc:
                log.warning("structure set not linked", reason=str(exc))
                self.store.index.transition(job.id, JobState.UNROUTED, reason=f"clinician's {exc}")
                return
            if ct_job is not None:
                self.store.index.transition(
                    job.id, JobState.ASSESSING, reason=f"clinician's structure set, linked to job {ct_job}"
                )
                return
        rules = self.rules()
        if rules is None:
            raise ConfigError(["no valid routing rules loaded: fix the routing file (check-config says where)"])
        decision = rules.route(_facts(job))
        if not decision.routed:
            why = "; ".join(
                f"{r['rule']}: {', '.join(map(str, r['failed'])) or 'shadowed'}"  # type: ignore[call-overload]  # for_log's values are plain JSON; 'failed' is a list
                for r in decision.explanation.for_log()
            )
            log.info("series unrouted", rules=decision.explanation.for_log())
            self.store.index.transition(
                job.id, JobState.UNROUTED, reason=f"no rule matched ({why})" if why else "no rules configured"
            )
            return
        # resolve now: the job keeps this exact version even if another is activated later
        routes = [_job_route(route, self.registry.resolve(_spec(route)).version) for route in decision.routes]
        # the result files and their UIDs are fixed now: whichever worker writes them, the TPS
        # gets these instances
        plan = plan_outputs(routes, self.cfg.destinations)
        priority = self._priority(job, routes)
        self.store.index.transition(
            job.id, JobState.ROUTED, routes=routes, detail=replace(job.detail, plan=plan), priority=priority
        )
        log.info(
            "series routed",
            rules=[r.rule for r in routes],
            model=routes[0].model,
            version=routes[0].version,
            priority=priority.value,
        )

    def _priority(self, job: Job, routes: Sequence[JobRoute]) -> Priority:
        """The most urgent of the matched rules' priorities, unless the caller is listed as
        low (a commissioning run, a retrieve): then low, whatever the rules say."""
        callers = self.cfg.node.allowed_callers
        if any(c.ae_title == job.calling_ae and c.priority is Priority.LOW for c in callers):
            return Priority.LOW
        return Priority.highest(*(r.priority for r in routes))

    def assess(self, job: Job) -> None:
        """Agreement figures (and the drift check) of a linked clinician's structure set."""
        ct_job = job.detail.linked_to
        if ct_job is None:
            raise AgreementError("structure set job is not linked to a CT job")
        outcome = assess_structure_set(self.cfg, self.store, self.registry, job.id, ct_job)
        self.store.index.transition(
            job.id, JobState.UNROUTED, reason=f"clinician's structure set, linked to job {ct_job}{outcome}"
        )

    def prepare(self, job: Job) -> None:
        """Load and check the series and store it in the job's folder as the volume the
        inference child reads, so the model never waits for the disk or the checks."""
        started = time.monotonic()
        volume = load_volume(self.store.instance_files(job), self.checks)
        _write_image(volume.image, self.store.job_dir(job.id) / CT_FILE)
        slice_files = self.store.spool_relative(volume.paths)
        self.store.keep_geometry(job.id, volume.geometry)
        load_s = round(time.monotonic() - started, 2)
        self.store.index.update_detail(
            job.id, lambda d: replace(d, slice_files=slice_files, timings_s={"volume": load_s})
        )
        self.store.index.transition(job.id, JobState.PREPARED)
        log.info("volume prepared", seconds=load_s)

    def infer(self, job: Job) -> None:
        if job.state is JobState.INFERRING:  # its worker died mid-inference: start it afresh
            self.store.index.transition(job.id, JobState.PREPARED, reason="taken over: its worker's lease lapsed")
            log.warning("job taken over", was_held_by=job.claimed_by)
        folder = self.store.job_dir(job.id)
        ct_path = folder / CT_FILE
        if not ct_path.exists() or not job.detail.slice_files:
            self.store.index.transition(job.id, JobState.ROUTED, reason="its stored volume is missing: prepared again")
            return
        self.store.index.transition(job.id, JobState.INFERRING)
        started = time.monotonic()
        results = [
            self.segment(self.registry.resolve(route.spec), ct_path, folder / labels_file(index))
            for index, route in enumerate(job.routes)
        ]
        # volumes_cc waits for the write stage, which measures the structures as contoured
        self.store.index.update_detail(job.id, lambda d: replace(d, timings_s={**d.timings_s, **results[0].timings_s}))
        self.store.index.transition(job.id, JobState.INFERRED)
        log.info("inferred", seconds=round(time.monotonic() - started, 2), structures=len(results[0].volumes_cc))

    def segment(self, model: ModelVersion, ct_path: Path, labels_path: Path) -> InferenceResult:
        """The runner's segmentation; CUDA out of memory is tried once on the CPU where
        ``inference.cpu_on_oom`` allows (slower, but the case gets its contours)."""
        try:
            return self.runner.run(model, ct_path, labels_path)
        except InferenceOutOfMemory as exc:
            if self.cpu_runner is None:
                raise
            log.warning("CUDA out of memory; running the job on the CPU", error=str(exc))
            with self.cpu_runner() as cpu:
                return cpu.run(model, ct_path, labels_path)

    def write(self, job: Job) -> None:
        """The RT-STRUCTs, each stored and queued (the sender woken) as soon as the checks
        pass; the rest of the results wait for the finish stage, so nothing the planning system
        does not need first delays them. A result held for review gets its QA picture first."""
        started = time.monotonic()
        headers, geometry, results, reasons = self._results(job, started)
        first = results[0].findings
        self.store.index.update_detail(
            job.id, lambda d: replace(d, volumes_cc=first.volumes_cc, empty_structures=tuple(first.empty))
        )
        if all(len(r.findings.empty) == len(r.findings.volumes_cc) for r in results):
            raise WriteError("the model found none of its structures (every one is empty); nothing was sent")
        review = job.detail.review
        if reasons and (review is None or review.released_by is None):
            hold = any(r.route.review is ReviewPolicy.HOLD and r.findings.reasons for r in results)
            held = Review(reasons=tuple(reasons), policy=ReviewPolicy.HOLD if hold else ReviewPolicy.FLAG)
            self.store.index.update_detail(job.id, lambda d: replace(d, review=held))
            if hold:
                self._qa_picture(job, results[0])  # a held result is judged by looking at it
                self.store.index.transition(job.id, JobState.NEEDS_REVIEW, reason="needs review: " + "; ".join(reasons))
                log.warning("result held for review", reasons=reasons)
                return
            log.warning("result flagged for review", reasons=reasons)
        for result, output in self._planned(job, results):
            if output.kind is OutputKind.RTSTRUCT:
                self._write_and_queue(job, headers, geometry, result, output, flagged=bool(reasons))
        self.store.index.transition(job.id, JobState.WRITING)
        log.info("rtstructs queued", seconds=round(time.monotonic() - started, 3))

    def finish(self, job: Job) -> None:
        """The rest of the results after the RT-STRUCTs: the SEGs, then the QA picture."""
        started = time.monotonic()
        headers, geometry, results, reasons = self._results(job, started)
        planned = self._planned(job, results)
        written = {
            output.file
            for result, output in planned
            if self._structures_for(result, output)
            and (
                output.kind is OutputKind.RTSTRUCT  # the write stage wrote and queued it
                or self._write_and_queue(job, headers, geometry, result, output, flagged=bool(reasons))
            )
        }
        if not written:
            raise WriteError("no destination takes any output of this job (see each destination's accepts and names)")
        self._qa_picture(job, results[0])
        sent = not_sent(job.routes, self.cfg.destinations)
        self.store.index.update_detail(
            job.id,
            lambda d: replace(
                d,
                # what was written, in the plan's order: a file with no structure left is not
                plan=OutputPlan(tuple(o for _, o in planned if o.file in written)),
                outputs=tuple(o.kind for _, o in planned if o.file in written),
                not_sent=sent,
            ),
        )
        self.store.index.transition(job.id, JobState.SENDING)
        log.info("results written", files=len(written), not_sent=sent, seconds=round(time.monotonic() - started, 3))
        self.outbox.settle(job.id)  # every file may have been delivered while the later ones were built

    def _results(
        self, job: Job, started: float
    ) -> tuple[list[pydicom.Dataset], SliceGeometry, list[RouteResult], list[str]]:
        """The CT's headers (in the slice order the prepare stage stored: the writers copy the
        patient and study from them and reference every slice), the geometry the volume was
        checked with, each route's label map, masks and findings, and the reasons a reviewer
        would read."""
        folder = self.store.job_dir(job.id)
        paths = self.store.slice_paths(job)
        # read while the label maps are checked: header parsing is Python, the masks mostly numpy
        reading = helper_threads().submit(read_headers, paths)
        geometry = self.store.geometry(job)
        results = [self._checked(folder, index, route, geometry) for index, route in enumerate(job.routes)]
        headers = reading.result()
        log.info(
            "result checked", reasons=len(results[0].findings.reasons), seconds=round(time.monotonic() - started, 3)
        )
        reasons = [
            f"{r.route.model}: {why}" if len(results) > 1 else why for r in results for why in r.findings.reasons
        ]
        return headers, geometry, results, reasons

    def _planned(self, job: Job, results: Sequence[RouteResult]) -> list[tuple[RouteResult, PlannedOutput]]:
        """Each planned file with the result of its route, in the plan's order."""
        plan = self._plan(job)
        return [(result, output) for result in results for output in plan.of_route(result.index)]

    def _structures_for(self, result: RouteResult, output: PlannedOutput) -> list[StructureInfo]:
        """The structures a planned file holds, under its destinations' names (none: the model
        found none of them)."""
        present = [s for s in result.structures if s.name not in result.findings.empty]
        return self._named(output, present)

    def _write_and_queue(
        self,
        job: Job,
        headers: Sequence[pydicom.Dataset],
        geometry: SliceGeometry,
        result: RouteResult,
        output: PlannedOutput,
        flagged: bool,
    ) -> bool:
        """Write one planned file and queue it for its destinations, waking the sender at once;
        False when none of its structures is left to send."""
        info = ModelInfo(
            name=result.model.name, version=result.model.version, needs_review=flagged, node=self.cfg.node.ae_title
        )
        out_structures = self._structures_for(result, output)
        if not out_structures:
            log.warning("nothing left to send", kind=output.kind, destinations=output.destinations)
            return False
        path = self.store.job_dir(job.id) / output.file
        self._write_output(
            output.kind,
            headers,
            geometry,
            result.labels,
            result.masks,
            out_structures,
            info,
            output.uids,
            path,
            output.encoding,
        )
        for dest in output.destinations if result.route.deliver else ():  # a shadow route's files stay here
            self.outbox.enqueue(
                job.id,
                dest,
                str(path.relative_to(self.store.results)),
                output.uids.sop_uid,
                output_sop_class(output.kind, output.encoding),
            )
        self.on_queued()
        log.info("output queued", kind=output.kind, destinations=output.destinations)
        return True

    def _qa_picture(self, job: Job, shown: RouteResult) -> None:
        """The QA picture of a route's contours over the CT as the prepare stage stored it."""
        folder = self.store.job_dir(job.id)
        ct = sitk.ReadImage(str(folder / CT_FILE))
        sx, sy, sz = (float(v) for v in ct.GetSpacing())
        qa_png = render_qa_png(
            sitk.GetArrayViewFromImage(ct),
            shown.labels,
            shown.structures,
            (sx, sy, sz),
            ModelInfo(shown.model.name, shown.model.version),
            folder / "qa.png",
        )
        self.store.index.update_detail(job.id, lambda d: replace(d, qa_png=str(qa_png.relative_to(self.store.results))))
        log.info("qa picture made")

    def _checked(self, folder: Path, index: int, route: JobRoute, geometry: SliceGeometry) -> RouteResult:
        """Route ``index``'s label map, its structures' masks as the writers encode them, and
        the plausibility findings measured on those masks."""
        model = self.registry.resolve(route.spec)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / labels_file(index)))).astype(np.uint8, copy=False)
        structures = structures_of(model.manifest)
        masks = make_masks(labels, structures)
        findings = check_result(model.manifest.structures, masks, geometry)
        return RouteResult(index, route, model, labels, masks, structures, findings)

    def _plan(self, job: Job) -> OutputPlan:
        """The job's output plan. A job routed by an earlier version of the node kept only its
        files' UIDs: it is planned again under the destinations in force, with those UIDs."""
        plan = job.detail.plan
        if plan.outputs and all(o.destinations for o in plan.outputs):
            return plan
        replanned = plan_outputs(job.routes, self.cfg.destinations, previous=plan)
        self.store.index.update_detail(job.id, lambda d: replace(d, plan=replanned))
        return replanned

    def _named(self, output: PlannedOutput, present: list[StructureInfo]) -> list[StructureInfo]:
        """The structures of one planned file under its destinations' names, each name checked
        against every destination's ``max_roi_name``."""
        dests = output.destinations
        limits = {d: self.cfg.destinations[d].max_roi_name if d in self.cfg.destinations else 64 for d in dests}
        out = load_roi_names(Path(output.names_file), limits[dests[0]]).apply(present) if output.names_file else present
        for dest, limit in limits.items():
            too_long = [s.name for s in out if len(s.name) > limit]
            if too_long:
                raise WriteError(
                    f"ROI names {', '.join(too_long)} are longer than {dest}'s max_roi_name {limit}: map them in a names file"
                )
        return out

    def _write_output(
        self,
        kind: OutputKind,
        headers: Sequence[pydicom.Dataset],
        geometry: SliceGeometry,
        labels: np.ndarray,
        masks: Masks,
        structures: list[StructureInfo],
        info: ModelInfo,
        uids: OutputUIDs,
        path: Path,
        encoding: SegEncoding = SegEncoding.BINARY,
    ) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.part")  # a worker taking over never shares a temp file
        if kind is OutputKind.RTSTRUCT:
            ds = build_rtstruct(headers, labels, structures, info, uids, masks=masks, geometry=geometry)
            ds.save_as(tmp, enforce_file_format=True)
            validate_rtstruct(tmp, headers, labels, structures, uids, masks=masks, geometry=geometry)
        elif kind is OutputKind.SEG:
            seg = build_seg(headers, labels, structures, info, uids, masks=masks, encoding=encoding)
            seg.save_as(tmp)
            validate_seg(tmp, headers, labels, structures, uids, masks=masks)
        else:
            raise WriteError(f"unknown output kind {kind}")
        tmp.replace(path)


def crashed_reason(crashes: int, stage: str) -> str:
    return f"crashed the node {crashes} times at {stage}"


def detail(exc: BaseException) -> str:
    """An exception's first line for a job's reason or a log line: secrets blanked, UIDs hashed."""
    return scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0][:500])


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, also where a library re-raised it with its own message (pydicom's
    writer wraps an OSError in a new one without the errno: the original is its cause)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def transient(exc: Exception) -> bool:
    """Whether a failure may pass by itself: a full disk, an index that went away, GPU memory."""
    if isinstance(exc, OSError):
        return _disk_full(exc)
    if isinstance(exc, TransitionError):
        return False  # the job moved under us: not a matter of waiting
    return isinstance(exc, (StoreError, InferenceOutOfMemory))


def transient_reason(exc: Exception) -> str:
    """A transient failure in our words, with its scrubbed detail."""
    if isinstance(exc, OSError):
        return "disk full (no space left on device)"
    if isinstance(exc, InferenceOutOfMemory):
        return f"GPU out of memory ({detail(exc)})"
    return f"index unavailable ({detail(exc)})"


def volume_checks(cfg: GatewayConfig) -> VolumeChecks:
    """gateway.yaml's ``volume:`` checks and ``limits:`` as the volume stage takes them."""
    return VolumeChecks(
        spacing_tolerance_mm=cfg.volume.spacing_tolerance_mm,
        min_slices=cfg.volume.min_slices,
        max_tilt_deg=cfg.volume.max_tilt_deg,
        max_rows=cfg.limits.max_rows,
        max_columns=cfg.limits.max_columns,
        max_slices=cfg.limits.max_slices,
        max_instance_bytes=cfg.limits.max_instance_mb * 2**20,
        max_volume_bytes=cfg.limits.max_series_gb * 2**30,
    )


def _facts(job: Job) -> SeriesFacts:
    """What the rules see of a job's series (the warm-up asks them while it arrives, the route
    stage when it is complete)."""
    return SeriesFacts(header=job.header, calling_ae=job.calling_ae, called_ae=job.called_ae, instances=job.instances)


def _spec(route: Route) -> str:
    return f"{route.model}@{route.version}" if route.version else route.model


def _job_route(route: Route, version: str) -> JobRoute:
    """A matched rule's order as the job keeps it: with the model version resolved."""
    return JobRoute(
        rule=route.rule,
        model=route.model,
        version=version,
        outputs=tuple(route.outputs),
        send_to=tuple(route.send_to),
        sync=route.sync,
        review=ReviewPolicy(route.review),
        priority=Priority(route.priority),
        deliver=route.deliver,
        seg_encoding=SegEncoding(route.seg_encoding),
    )


def _write_image(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part.mha")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=False)
    except RuntimeError as exc:  # a full disk is retried, not the job's fault
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(path.parent, image.GetNumberOfPixels() * image.GetSizeOfPixelComponent(), exc)
        raise
    tmp.replace(path)
