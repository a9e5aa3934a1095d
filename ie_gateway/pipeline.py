"""The worker: claims series jobs in order of arrival and runs the stages after receipt.

complete ─route─▶ routed ─volume+infer─▶ inferred ─write─▶ sending ─outbox─▶ delivered
   └▶ unrouted        └▶ refused / failed        └▶ failed       └▶ failed (dead letter)

Each stage reads what the previous one stored (index rows, files in the job's folder) and
stores its own output before moving the job on, so a crash repeats at most one stage. This is
the one place that catches broadly: whatever a stage raises parks the job with the reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import GatewayError, VolumeRefused, WriteError
from ie_gateway.infer.manifest import Manifest
from ie_gateway.infer.registry import Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.route import Route, RuleSet, SeriesFacts
from ie_gateway.store import Job, JobState, Store, TransitionError
from ie_gateway.store.outbox import Outbox
from ie_gateway.sync.cases import link_approved
from ie_gateway.volume import VolumeChecks, load_volume
from ie_gateway.write.common import ModelInfo, OutputUIDs, StructureInfo, new_output_uids
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
    return [StructureInfo(label=s.label, name=s.name, color=tuple(s.color), interpreted_type=str(s.interpreted_type),
                          fill_holes=s.postprocess.fill_holes) for s in manifest.structures if s.send]


class Worker:
    """Runs jobs one at a time in a background thread."""

    def __init__(self, cfg: GatewayConfig, store: Store, registry: Registry, runner: InferenceRunner,
                 rules: Callable[[], RuleSet | None], on_queued: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.runner = runner
        self.rules = rules
        self.outbox = Outbox(store.index)
        self.on_queued = on_queued
        self.checks = VolumeChecks(spacing_tolerance_mm=cfg.volume.spacing_tolerance_mm,
                                   min_slices=cfg.volume.min_slices, max_tilt_deg=cfg.volume.max_tilt_deg)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Look for work now (a series completed, an admin replayed a job)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.run_once():
                self._wake.wait(1.0)
                self._wake.clear()

    STAGES: tuple[tuple[JobState, str], ...] = (
        (JobState.INFERRED, "write"), (JobState.COMPLETE, "route"), (JobState.ROUTED, "infer"))

    def run_once(self) -> bool:
        """Advance one job by one stage; False when there was nothing to do."""
        for state, stage in self.STAGES:
            job = self.store.index.next_job(state)
            if job is None:
                continue
            started = time.monotonic()
            structlog.contextvars.bind_contextvars(job=job.id, stage=stage)
            try:
                getattr(self, stage)(job)
            except VolumeRefused as exc:
                self._park(job, JobState.REFUSED, str(exc))
            except (GatewayError, OSError) as exc:
                self._park(job, JobState.FAILED, f"{stage}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the worker loop parks any job that breaks a stage
                log.exception("stage crashed")
                self._park(job, JobState.FAILED, f"{stage}: internal error {type(exc).__name__}: {exc}")
            finally:
                log.info("stage done", seconds=round(time.monotonic() - started, 3))
                structlog.contextvars.unbind_contextvars("job", "stage")
            return True
        return False

    def _park(self, job: Job, state: JobState, reason: str) -> None:
        current = self.store.index.job(job.id).state
        log.warning("job parked", state=state.value, reason=reason, was=current.value)
        try:
            self.store.index.transition(job.id, state, reason=reason)
        except TransitionError:
            log.error("job could not be parked", state=state.value, was=current.value)

    # --- stages -----------------------------------------------------------------------------

    def route(self, job: Job) -> None:
        if job.header.get("Modality") == "RTSTRUCT":
            # a clinician's structure set for a CT we contoured travels with that case (sync)
            ct_job = link_approved(self.store, job)
            if ct_job is not None:
                self.store.index.transition(job.id, JobState.UNROUTED,
                                            reason=f"clinician's structure set, linked to job {ct_job}")
                return
        rules = self.rules()
        if rules is None:
            raise GatewayError("no valid routing rules loaded")
        decision = rules.route(SeriesFacts(header=job.header, calling_ae=job.calling_ae,
                                           called_ae=job.called_ae, instances=job.instances))
        if not decision.routed:
            why = "; ".join(f"{r['rule']}: {', '.join(map(str, r['failed'])) or 'shadowed'}"
                            for r in decision.explanation.for_log())
            log.info("series unrouted", rules=decision.explanation.for_log())
            self.store.index.transition(job.id, JobState.UNROUTED,
                                        reason=f"no rule matched ({why})" if why else "no rules configured")
            return
        routes = []
        for route in decision.routes:
            # resolve now: the job keeps this exact version even if another is activated later
            model = self.registry.resolve(_spec(route))
            routes.append({**_route_dict(route), "version": model.version})
        first = routes[0]
        self.store.index.transition(job.id, JobState.ROUTED, routes=routes, model=first["model"],
                                    model_version=first["version"])
        log.info("series routed", rules=[r["rule"] for r in routes], model=first["model"],
                 version=first["version"])

    def infer(self, job: Job) -> None:
        self.store.index.transition(job.id, JobState.INFERRING)
        folder = self.store.job_dir(job.id)
        started = time.monotonic()
        volume = load_volume(self.store.instance_files(job), self.checks)
        ct_path = folder / CT_FILE
        _write_image(volume.image, ct_path)
        slice_files = [str(p) for p in volume.paths]
        load_s = time.monotonic() - started
        del volume
        results = [self.runner.run(self.registry.resolve(f"{route['model']}@{route['version']}"),
                                   ct_path, folder / labels_file(index))
                   for index, route in enumerate(job.routes)]
        volumes = results[0]["volumes_cc"]  # status shows the first route's model
        self.store.index.update_detail(job.id, slice_files=slice_files,
                                       volumes_cc={k: round(v, 1) for k, v in volumes.items()},
                                       timings_s={"volume": round(load_s, 2), **results[0]["timings_s"]})
        self.store.index.transition(job.id, JobState.INFERRED)
        log.info("inferred", seconds=round(time.monotonic() - started, 2), volume_s=round(load_s, 2),
                 structures=len(volumes))

    def write(self, job: Job) -> None:
        folder = self.store.job_dir(job.id)
        uids = self._output_uids(job)
        # the CT as the volume stage checked it, and its headers in the same slice order
        ct = sitk.ReadImage(str(folder / CT_FILE))
        hu = sitk.GetArrayViewFromImage(ct)
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in job.detail["slice_files"]]
        written: list[str] = []
        qa_png = None
        for index, route in enumerate(job.routes):
            model = self.registry.resolve(f"{route['model']}@{route['version']}")
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / labels_file(index)))).astype(np.uint8)
            structures = structures_of(model.manifest)
            info = ModelInfo(name=model.name, version=model.version)
            # RT-STRUCT first: it is what the planner waits for, so it leaves before the SEG is built
            for kind in sorted(route["outputs"], key=lambda k: k != "rtstruct"):
                out_uids = OutputUIDs(**uids[f"{index}-{kind}"])
                path = folder / f"{kind}-{index}.dcm"
                self._write_output(kind, headers, labels, structures, info, out_uids, path)
                for dest in route["send_to"]:
                    self.outbox.enqueue(job.id, dest, str(path.relative_to(self.store.results)),
                                        out_uids.sop_uid, _sop_class(kind))
                self.on_queued()
                written.append(kind)
            if qa_png is None:
                spacing = tuple(float(s) for s in ct.GetSpacing())
                qa_png = render_qa_png(hu, labels, structures, spacing, info, folder / "qa.png")  # type: ignore[arg-type]
        self.store.index.update_detail(job.id, outputs=written, qa_png=str(qa_png) if qa_png else None)
        self.store.index.transition(job.id, JobState.SENDING)
        log.info("results written", files=len(written))
        self.settle(job.id)  # every file may have been delivered while the later ones were built

    def _output_uids(self, job: Job) -> dict[str, dict[str, str]]:
        """UIDs for every output of the job, generated once and stored before any file exists."""
        stored = job.detail.get("output_uids")
        if stored:
            return stored  # type: ignore[no-any-return]
        uids = {f"{i}-{kind}": asdict(new_output_uids()) for i, route in enumerate(job.routes)
                for kind in route["outputs"]}
        self.store.index.update_detail(job.id, output_uids=uids)
        return uids

    def _write_output(self, kind: str, headers: list[pydicom.Dataset], labels: np.ndarray,
                      structures: list[StructureInfo], info: ModelInfo, uids: OutputUIDs, path: Path) -> None:
        tmp = path.with_suffix(".part")
        if kind == "rtstruct":
            ds = build_rtstruct(headers, labels, structures, info, uids)
            ds.save_as(tmp, enforce_file_format=True)
            validate_rtstruct(tmp, headers, labels, structures, uids)
        elif kind == "seg":
            seg = build_seg(headers, labels, structures, info, uids)
            seg.save_as(tmp)
            validate_seg(tmp, headers, labels, structures, uids)
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
        if counts.get("pending"):
            return
        failures = self.outbox.failures(job_id)
        try:
            if failures:
                dest, _status, error = failures[0]
                self.store.index.transition(job_id, JobState.FAILED, reason=f"delivery to {dest} failed: {error}")
                return
            self.store.index.update_detail(job_id, deliveries=counts.get("delivered", 0))
            self.store.index.transition(job_id, JobState.DELIVERED)
        except TransitionError:
            return  # the worker and the outbox both settle; the other one got there first
        log.info("job delivered", job=job_id, files=counts.get("delivered", 0))


def _spec(route: Route) -> str:
    return f"{route.model}@{route.version}" if route.version else route.model


def _route_dict(route: Route) -> dict[str, Any]:
    return {"rule": route.rule, "model": route.model, "version": route.version,
            "outputs": [str(o) for o in route.outputs], "send_to": list(route.send_to), "sync": route.sync}


def _sop_class(kind: str) -> str:
    return str(pydicom.uid.RTStructureSetStorage if kind == "rtstruct" else pydicom.uid.SegmentationStorage)


def _write_image(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".part.mha")
    sitk.WriteImage(image, str(tmp), useCompression=False)
    tmp.replace(path)

