"""The worker: claims series jobs in order of arrival and runs the stages after receipt.

complete ─route─▶ routed ─volume+infer─▶ inferred ─write─▶ sending ─outbox─▶ delivered
   └▶ unrouted        └▶ refused / failed        │└▶ failed      └▶ failed (dead letter)
                                                 └▶ needs_review (plausibility checks failed,
                                                    route `review: hold`; `release` → inferred)

Each stage reads what the previous one stored (index rows, files in the job's folder) and
stores its own output before moving the job on, so a crash repeats at most one stage. This is
the one place that catches broadly: whatever a stage raises parks the job with the reason.

Several workers (on several machines sharing the index and the spool) may run at once: each
claims a job for one stage under a lease that it renews while the stage runs and gives up when
the stage ends. A worker that dies stops renewing; once its lease lapses another worker claims
the job and runs the stage again: a job caught mid-inference starts its inference afresh, and
one caught mid-write writes its outputs again under the UIDs stored before its first file, so
the planning system receives the same instances, never new ones.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog

from ie_gateway import drift, metrics
from ie_gateway.agreement import Bounds, ModelContours, assess_approval
from ie_gateway.approvals import approved_sets, link_approved
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
from ie_gateway.infer.manifest import Manifest
from ie_gateway.infer.registry import ModelVersion, Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.log import scrub
from ie_gateway.plausibility import Findings, check_result
from ie_gateway.roinames import load_roi_names, site_aliases
from ie_gateway.route import Route, RuleSet, SeriesFacts
from ie_gateway.store import Job, JobRoute, JobState, OutboxState, OutputKind, ReviewPolicy, Store, TransitionError
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import Review, StageAttempts
from ie_gateway.volume import VolumeChecks, load_volume
from ie_gateway.write.common import (
    Masks,
    ModelInfo,
    OutputUIDs,
    SliceGeometry,
    StructureInfo,
    new_output_uids,
    structure_mask,
)
from ie_gateway.write.qa import render_qa_png
from ie_gateway.write.rtstruct import build_rtstruct
from ie_gateway.write.seg import build_seg
from ie_gateway.write.validate import validate_rtstruct, validate_seg

log = structlog.get_logger(__name__)

CT_FILE = "ct.mha"


def labels_file(index: int) -> str:
    return f"labels-{index}.mha"


def structures_of(manifest: Manifest) -> list[StructureInfo]:
    """The writers' view of a model's structures."""
    return [
        StructureInfo(
            label=s.label,
            name=s.name,
            color=s.color,
            interpreted_type=str(s.interpreted_type),
            fill_holes=s.postprocess.fill_holes,
        )
        for s in manifest.structures
        if s.send
    ]


class Worker:
    """Runs jobs one at a time in a background thread, each under a lease it renews."""

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
        holder of the job it works on."""
        self.cfg = cfg
        self.node = node
        self.lease_s = cfg.worker.lease_s
        self._held: int | None = None  # the job this worker holds now
        self._stage = ""  # and the stage it runs
        self.store = store
        self.registry = registry
        self.runner = runner
        self.rules = rules
        self.outbox = Outbox(store.index)
        self.on_queued = on_queued
        self.checks = volume_checks(cfg)
        #: a CPU inference process for a job that ran CUDA out of memory (None: not allowed)
        self.cpu_runner: Callable[[], InferenceRunner] | None = (
            (lambda: InferenceRunner(cfg.inference.timeout_s, device="cpu", log_level=cfg.log_level))
            if cfg.inference.cpu_on_oom and cfg.inference.device != "cpu"
            else None
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self.last_tick = time.monotonic()  # health: a loop that stops ticking is stuck

    def start(self) -> None:
        self._thread.start()
        self._renewer.start()

    def wake(self) -> None:
        """Look for work now (a series completed, an admin replayed a job)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._renewer.join(timeout=5)
        held = self._held
        if held is not None:  # still at it as the node stops: interrupted, not crashed
            try:
                self.store.index.end_stage(held, self._stage)
            except StoreError as exc:
                log.warning("stage end not recorded", job=held, error=detail(exc))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.last_tick = time.monotonic()
            try:
                busy = self.run_once()
                failures = 0
            except StoreError as exc:  # the index went away (a restart, the network): wait for it
                failures += 1
                busy = False
                log.warning("index unavailable; the worker waits", error=detail(exc), failures=failures)
            if not busy:
                self._wake.wait(min(1.0 * 2 ** max(failures - 1, 0), 30.0))
                self._wake.clear()

    def _renew_loop(self) -> None:
        """Renew the lease of the job in hand every third of the lease."""
        while not self._stop.wait(self.lease_s / 3):
            held = self._held
            if held is None:
                continue
            try:
                kept = self.store.index.renew(held, self.node, self.lease_s)
            except GatewayError as exc:
                log.warning("lease not renewed", job=held, error=str(exc))
                continue
            if not kept and self._held == held:
                log.error("lease lost: another worker has taken the job over", job=held)

    #: (states a stage takes a job from, the stage); a job claimed while `inferring` is one
    #: whose worker's lease lapsed mid-inference
    STAGES: tuple[tuple[tuple[JobState, ...], str], ...] = (
        ((JobState.INFERRED,), "write"),
        ((JobState.COMPLETE,), "route"),
        ((JobState.ROUTED, JobState.INFERRING), "infer"),
    )

    def run_once(self) -> bool:
        """Claim a job and advance it by one stage; False when there was nothing to do."""
        for states, stage in self.STAGES:
            job = self.store.index.claim(states, self.node, self.lease_s)
            if job is None:
                continue
            self._held, self._stage = job.id, stage
            started = time.monotonic()
            structlog.contextvars.bind_contextvars(job=job.id, stage=stage)
            try:
                self._attempt(job, stage)
            finally:
                self._held = None
                self._release(job.id)
                metrics.STAGE_SECONDS.labels(stage).observe(time.monotonic() - started)
                log.info("stage done", seconds=round(time.monotonic() - started, 3))
                structlog.contextvars.unbind_contextvars("job", "stage")
            return True
        return False

    def _attempt(self, job: Job, stage: str) -> None:
        """Run one stage of a claimed job, counted in the index so that a job that keeps
        killing the node (or its inference process) fails instead of looping; a transient
        failure (full disk, index outage, GPU memory) is retried later, anything else parks it."""
        tries = self.store.index.begin_stage(job.id, stage)
        crashed = False
        try:
            if tries.crashes >= self.cfg.worker.max_crashes:
                self._park(job, JobState.FAILED, crashed_reason(tries.crashes, stage))
                return
            getattr(self, stage)(job)
        except VolumeRefused as exc:
            self._park(job, JobState.REFUSED, str(exc))
        except InferenceCrashed as exc:
            if self._stop.is_set():  # the node stopped its inference process: no fault of the job
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
        """A stage to be run again starts where it started: a job caught inferring is routed."""
        if self.store.index.job(job.id).state is JobState.INFERRING:
            self.store.index.transition(job.id, JobState.ROUTED, reason=reason)

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
        if job.header.get("Modality") == "RTSTRUCT":
            # a clinician's structure set for a CT we contoured travels with that case (sync)
            try:
                ct_job = link_approved(self.store, job, self.cfg.approvals.accept_from)
            except ApprovalRefused as exc:
                log.warning("structure set not linked", reason=str(exc))
                self.store.index.transition(job.id, JobState.UNROUTED, reason=f"clinician's {exc}")
                return
            if ct_job is not None:
                self.store.index.transition(
                    job.id,
                    JobState.UNROUTED,
                    reason=f"clinician's structure set, linked to job {ct_job}" + self._agreement(job.id, ct_job),
                )
                return
        rules = self.rules()
        if rules is None:
            raise GatewayError("no valid routing rules loaded")
        decision = rules.route(
            SeriesFacts(header=job.header, calling_ae=job.calling_ae, called_ae=job.called_ae, instances=job.instances)
        )
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
        # the results' UIDs are fixed now: whichever worker writes them, the TPS gets these instances
        uids = {key: asdict(new_output_uids()) for key in self._uid_keys(routes)}
        self.store.index.transition(
            job.id, JobState.ROUTED, routes=routes, detail=replace(job.detail, output_uids=uids)
        )
        log.info("series routed", rules=[r.rule for r in routes], model=routes[0].model, version=routes[0].version)

    def _agreement(self, rt_job: int, ct_job_id: int) -> str:
        """Figures of the approved set in ``rt_job`` against the AI's contours of ``ct_job_id``;
        what the structure set job's reason should add. A draft gets no figures."""
        approved = approved_sets(self.store, rt_job)
        if not approved:
            return ""
        ct_job = self.store.index.job(ct_job_id)
        settings = self.cfg.agreement
        try:
            contours = [self._contours(ct_job, index, route) for index, route in enumerate(ct_job.routes)]
            aliases = site_aliases(self.cfg.destinations, [d for r in ct_job.routes for d in r.send_to])
            bounds = Bounds(settings.max_contours, settings.max_points)
            rows = assess_approval(
                self.store.index, ct_job, rt_job, approved[-1], contours, settings.tolerance_mm, aliases, bounds
            )
        except (AgreementError, ModelError, ConfigError) as exc:
            log.warning("agreement not computed", ct_job=ct_job.id, reason=str(exc))
            return f"; no agreement figures: {exc}"
        for model in {f"{c.model}@{c.version}" for c in contours}:
            drift.log_alarms(self.store.index, settings, self.cfg.models_dir, model)
        return f"; agreement figures of {rows} structures"

    def _contours(self, ct_job: Job, index: int, route: JobRoute) -> ModelContours:
        """Where route ``index`` of a contoured job left its contours, and what they are."""
        model = self.registry.resolve(route.spec)
        folder = self.store.results / f"job-{ct_job.id}"
        rtstruct = folder / f"rtstruct-{index}.dcm" if OutputKind.RTSTRUCT in route.outputs else None
        return ModelContours(
            model.name, model.version, structures_of(model.manifest), rtstruct, folder / labels_file(index)
        )

    def infer(self, job: Job) -> None:
        if job.state is JobState.INFERRING:  # its worker died mid-inference: start it afresh
            self.store.index.transition(job.id, JobState.ROUTED, reason="taken over: its worker's lease lapsed")
            log.warning("job taken over", was_held_by=job.claimed_by)
        self.store.index.transition(job.id, JobState.INFERRING)
        folder = self.store.job_dir(job.id)
        started = time.monotonic()
        volume = load_volume(self.store.instance_files(job), self.checks)
        ct_path = folder / CT_FILE
        _write_image(volume.image, ct_path)
        slice_files = [str(p) for p in volume.paths]
        load_s = time.monotonic() - started
        del volume
        results = [
            self.segment(self.registry.resolve(route.spec), ct_path, folder / labels_file(index))
            for index, route in enumerate(job.routes)
        ]
        volumes = results[0]["volumes_cc"]  # status shows the first route's model
        self.store.index.update_detail(
            job.id,
            lambda d: replace(
                d,
                slice_files=tuple(slice_files),
                volumes_cc={k: round(v, 1) for k, v in volumes.items()},
                timings_s={"volume": round(load_s, 2), **results[0]["timings_s"]},
            ),
        )
        self.store.index.transition(job.id, JobState.INFERRED)
        log.info(
            "inferred", seconds=round(time.monotonic() - started, 2), volume_s=round(load_s, 2), structures=len(volumes)
        )

    def segment(self, model: ModelVersion, ct_path: Path, labels_path: Path) -> dict[str, Any]:
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
        started = time.monotonic()
        folder = self.store.job_dir(job.id)
        # the CT as the volume stage checked it, and its headers in the same slice order
        ct = sitk.ReadImage(str(folder / CT_FILE))
        hu = sitk.GetArrayViewFromImage(ct)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in job.detail.slice_files]
        geometry = SliceGeometry.from_headers(headers)
        results = []
        for index, route in enumerate(job.routes):
            model = self.registry.resolve(route.spec)
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / labels_file(index)))).astype(np.uint8)
            structures = structures_of(model.manifest)
            # the masks as the writers encode them: what the checks and volumes_cc must measure
            masks = {s.label: structure_mask(labels, s) for s in structures}
            findings = check_result(model.manifest.structures, masks, geometry)
            results.append((index, route, model, labels, masks, structures, findings))
        log.info("result checked", reasons=len(results[0][-1].reasons), seconds=round(time.monotonic() - started, 3))
        first = results[0][-1]
        self.store.index.update_detail(
            job.id, lambda d: replace(d, volumes_cc=first.volumes_cc, empty_structures=tuple(first.empty))
        )
        if all(len(f.empty) == len(f.volumes_cc) for *_, f in results):
            raise WriteError("the model found none of its structures (every one is empty); nothing was sent")
        reasons = [f"{route.model}: {r}" if len(results) > 1 else r for _, route, *_, f in results for r in f.reasons]
        review = job.detail.review
        if reasons and (review is None or review.released_by is None):
            hold = any(route.review is ReviewPolicy.HOLD and f.reasons for _, route, *_, f in results)
            held = Review(reasons=tuple(reasons), policy=ReviewPolicy.HOLD if hold else ReviewPolicy.FLAG)
            self.store.index.update_detail(job.id, lambda d: replace(d, review=held))
            if hold:
                self.store.index.transition(job.id, JobState.NEEDS_REVIEW, reason="needs review: " + "; ".join(reasons))
                log.warning("result held for review", reasons=reasons)
                return
            log.warning("result flagged for review", reasons=reasons)
        written: list[OutputKind] = []
        not_sent: dict[str, list[OutputKind]] = {}
        uids = self._output_uids(job, [key for r in results for key, *_ in self._plan(r[1], r[0], r[5], r[6])])
        qa_png = None
        for index, route, model, labels, masks, structures, findings in results:
            info = ModelInfo(name=model.name, version=model.version, needs_review=bool(reasons))
            for kind in route.outputs:
                refusing = [
                    d
                    for d in route.send_to
                    if d in self.cfg.destinations and kind not in self.cfg.destinations[d].accepts
                ]
                for dest in refusing:
                    not_sent.setdefault(dest, []).append(kind)
            # RT-STRUCT first: it is what the planner waits for, so it leaves before the SEG is built
            for key, stem, kind, dests, out_structures in self._plan(route, index, structures, findings):
                out_uids = OutputUIDs(**uids[key])
                path = folder / f"{stem}.dcm"
                self._write_output(kind, headers, labels, masks, out_structures, info, out_uids, path)
                for dest in dests:
                    self.outbox.enqueue(
                        job.id, dest, str(path.relative_to(self.store.results)), out_uids.sop_uid, _sop_class(kind)
                    )
                self.on_queued()
                written.append(kind)
                log.info("output queued", kind=kind, destinations=dests, seconds=round(time.monotonic() - started, 3))
            if qa_png is None:
                sx, sy, sz = (float(s) for s in ct.GetSpacing())
                qa_png = render_qa_png(hu, labels, structures, (sx, sy, sz), info, folder / "qa.png")
        if not written:
            raise WriteError("no destination takes any output of this job (see each destination's accepts and names)")
        self.store.index.update_detail(
            job.id,
            lambda d: replace(
                d,
                outputs=tuple(written),
                qa_png=str(qa_png) if qa_png else None,
                not_sent={dest: tuple(kinds) for dest, kinds in not_sent.items()},
            ),
        )
        self.store.index.transition(job.id, JobState.SENDING)
        log.info("results written", files=len(written), not_sent=not_sent)
        self.settle(job.id)  # every file may have been delivered while the later ones were built

    def _plan(
        self, route: JobRoute, index: int, structures: list[StructureInfo], findings: Findings
    ) -> list[tuple[str, str, OutputKind, list[str], list[StructureInfo]]]:
        """The files a route's outputs become: (UID key, file stem, kind, destinations, structures),
        RT-STRUCT first.

        Destinations that take the same names share one file; a destination with a `names`
        file gets its own (its ROIs differ, so it is another instance with its own UIDs).
        Empty structures are left out; a file with no structure left is not made.
        """
        plans = []
        present = [s for s in structures if s.name not in findings.empty]
        for kind in sorted(route.outputs, key=lambda k: k is not OutputKind.RTSTRUCT):
            for names, dests in self._groups(route, kind).items():
                out = (
                    load_roi_names(Path(names), self.cfg.destinations[dests[0]].max_roi_name).apply(present)
                    if names
                    else present
                )
                if not out:
                    log.warning("nothing left to send", kind=kind, destinations=dests)
                    continue
                for dest in dests:
                    limit = self.cfg.destinations[dest].max_roi_name if dest in self.cfg.destinations else 64
                    too_long = [s.name for s in out if len(s.name) > limit]
                    if too_long:
                        raise WriteError(
                            f"ROI names {', '.join(too_long)} are longer than {dest}'s max_roi_name "
                            f"{limit}: map them in a names file"
                        )
                suffix = f"-{dests[0]}" if names else ""
                plans.append((f"{index}-{kind}{suffix}", f"{kind}-{index}{suffix}", kind, dests, out))
        return plans

    def _groups(self, route: JobRoute, kind: OutputKind) -> dict[str, list[str]]:
        """The route's destinations that take ``kind``, grouped by the names file they apply
        ("" for none): each group gets one file."""
        groups: dict[str, list[str]] = {}
        for dest in route.send_to:
            cfg = self.cfg.destinations.get(dest)
            if cfg is not None and kind not in cfg.accepts:
                continue
            groups.setdefault(str(cfg.names) if cfg is not None and cfg.names else "", []).append(dest)
        return groups

    def _uid_keys(self, routes: Sequence[JobRoute]) -> list[str]:
        """The UID keys of every file the routes may make (``_plan``'s, before the structures are known)."""
        return [
            f"{index}-{kind}" + (f"-{dests[0]}" if names else "")
            for index, route in enumerate(routes)
            for kind in route.outputs
            for names, dests in self._groups(route, kind).items()
        ]

    def _output_uids(self, job: Job, keys: list[str]) -> dict[str, dict[str, str]]:
        """UIDs for every output file of the job: those fixed when it was routed, and any the
        configuration adds since, generated once and stored before any file exists."""
        stored = dict(job.detail.output_uids)
        missing = [k for k in keys if k not in stored]
        if missing:
            stored.update({k: asdict(new_output_uids()) for k in missing})
            self.store.index.update_detail(job.id, lambda d: replace(d, output_uids=stored), durable=True)
        return stored

    def _write_output(
        self,
        kind: OutputKind,
        headers: Sequence[pydicom.Dataset],
        labels: np.ndarray,
        masks: Masks,
        structures: list[StructureInfo],
        info: ModelInfo,
        uids: OutputUIDs,
        path: Path,
    ) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.part")  # a worker taking over never shares a temp file
        if kind is OutputKind.RTSTRUCT:
            ds = build_rtstruct(headers, labels, structures, info, uids, masks=masks)
            ds.save_as(tmp, enforce_file_format=True)
            validate_rtstruct(tmp, headers, labels, structures, uids, masks=masks)
        elif kind is OutputKind.SEG:
            seg = build_seg(headers, labels, structures, info, uids, masks=masks)
            seg.save_as(tmp)
            validate_seg(tmp, headers, labels, structures, uids, masks=masks)
        else:
            raise WriteError(f"unknown output kind {kind}")
        tmp.replace(path)

    def settle(self, job_id: int) -> None:
        """After a delivery pass: a job whose every row is delivered is done; one with a
        dead-lettered row has failed, with the peer's status as the reason."""
        job = self.store.index.job(job_id)
        if job.state is not JobState.SENDING:
            return
        counts = self.outbox.job_summary(job_id)
        if counts.get(OutboxState.PENDING):
            return
        failures = self.outbox.failures(job_id)
        done = counts.get(OutboxState.DELIVERED, 0)
        try:
            if failures:
                first = failures[0]
                more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
                delivered = f"; {done} other file(s) delivered" if done else ""
                self.store.index.transition(
                    job_id,
                    JobState.FAILED,
                    reason=f"delivery to {first.destination} failed: {scrub(str(first.last_error))}{more}{delivered}",
                )
                return
            self.store.index.update_detail(job_id, lambda d: replace(d, deliveries=done))
            self.store.index.transition(job_id, JobState.DELIVERED)
        except TransitionError:
            return  # the worker and the outbox both settle; the other one got there first
        log.info("job delivered", job=job_id, files=done)


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
    )


def _sop_class(kind: OutputKind) -> str:
    return str(pydicom.uid.RTStructureSetStorage if kind is OutputKind.RTSTRUCT else pydicom.uid.SegmentationStorage)


def _write_image(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part.mha")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=False)
    except RuntimeError as exc:  # a full disk is retried, not the job's fault
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(path.parent, image.GetNumberOfPixels() * image.GetSizeOfPixelComponent(), exc)
        raise
    tmp.replace(path)
