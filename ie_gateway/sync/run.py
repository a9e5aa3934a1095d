"""One sync run: upload anonymised cases, pull published model versions.

A case is a delivered CT job whose route says ``sync: true``: its CT series, the node's AI
outputs (RT-STRUCT, SEG) and the clinicians' approved structure sets linked to it
(``cases.link_approved``), each anonymised into a scratch folder under the storage root and
uploaded as ``cases/<pseudonymous series UID>/``. The outcome is kept in the job's detail
(``synced``, or ``sync_error`` with the reason) for ``ie-gateway status``. A case is due again
when the set of approved structure sets linked to it has changed since its last upload; the
idempotent upload then sends only the new blobs and the manifest. One case's failure is
recorded and the run goes on; the case is retried by the next run.

The scheduler calls ``scheduled_cases`` / ``scheduled_models``; ``ie-gateway sync now`` calls
``sync_now``. Two runs of the same kind never overlap (a lock file under the storage root).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pydicom
import structlog
from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import SyncError
from ie_gateway.infer.registry import Registry
from ie_gateway.log import drop_patient_data
from ie_gateway.store import Index, Job, JobState, Store
from ie_gateway.sync import anonymise, blob
from ie_gateway.sync.anonymise import AnonymiseOptions, Anonymiser, DateMode
from ie_gateway.sync.cases import APPROVED, approved_entries, approved_files
from ie_gateway.sync.updates import PullResult, pull_updates

log = structlog.get_logger(__name__)

SCRATCH_DIR = "sync-scratch"
PSEUDONYM_MAP = "pseudonyms.sqlite3"
MODEL_STAGING_DIR = "model-staging"
MANIFEST_SCHEMA = 1

CaseProgress = Callable[[str, int, int], None]
"""Called with (what, bytes done, bytes total) while a case uploads; see ``TextProgress``."""


@dataclass(frozen=True)
class CasesReport:
    """What a case sync did: job ids uploaded, failed (with reasons), blob and byte counts."""

    synced: tuple[int, ...] = ()
    failed: dict[int, str] = field(default_factory=dict)
    blobs: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class SyncReport:
    """Both halves of ``sync_now``."""

    cases: CasesReport
    models: list[PullResult]

    def summary(self) -> str:
        """Lines for the admin who ran ``ie-gateway sync now``."""
        c = self.cases
        mib = c.bytes / 2**20
        lines = [f"cases: {len(c.synced)} uploaded ({c.blobs} blobs, {mib:.1f} MiB), "
                 + f"{len(c.failed)} failed"]
        lines += [f"  job {job}: {reason}" for job, reason in sorted(c.failed.items())]
        lines.append(f"models: {len(self.models)} new version(s)")
        lines += [f"  {r.name}@{r.version}: {r.status.value}" + (f" ({r.reason})" if r.reason else "")
                  for r in self.models]
        return "\n".join(lines)


class TextProgress:
    """A one-line text progress bar on a stream (stderr): ``case 1/3 [#####-----] 48% 1.2/2.5 MiB``.

    Redraws only when the whole percentage changes and ends each case's line when it completes.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self._stream = stream or sys.stderr
        self._width = width
        self._last: tuple[str, int] | None = None

    def __call__(self, what: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if self._last == (what, percent):
            return
        self._last = (what, percent)
        filled = self._width * percent // 100
        bar = "#" * filled + "-" * (self._width - filled)
        end = "\n" if done >= total else ""
        self._stream.write(f"\r{what} [{bar}] {percent:3d}% "
                           f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB{end}")
        self._stream.flush()


# --- cases ---------------------------------------------------------------------------------


def cases_due(store: Store) -> list[Job]:
    """Delivered jobs with a ``sync: true`` route, not uploaded as they now stand, whose files
    retention has not purged."""
    return [job for job in store.index.jobs([JobState.DELIVERED])
            if any(route.get("sync") for route in job.routes) and not job.detail.get("purged")
            and _changed_since_upload(job)]


def _changed_since_upload(job: Job) -> bool:
    synced = job.detail.get("synced")
    if synced is None:
        return True
    return sorted(synced.get("approved_jobs", [])) != _approved_jobs(job)


def _approved_jobs(job: Job) -> list[int]:
    return sorted(int(entry["job"]) for entry in approved_entries(job))


def sync_cases(store: Store, container: ContainerClient, anonymiser: Anonymiser, *,
               progress: CaseProgress | None = None) -> CasesReport:
    """Anonymise and upload every case that is due; record each outcome in its job's detail.

    A case that fails (anonymisation refused, storage error) is logged with its job id,
    recorded as ``sync_error`` and left for the next run. Raises SyncError when another case
    sync holds the lock.
    """
    scratch = store.root / SCRATCH_DIR
    synced: list[int] = []
    failed: dict[int, str] = {}
    blobs = size = 0
    with _exclusive(store.root / "sync-cases.lock", "case sync"):
        shutil.rmtree(scratch, ignore_errors=True)  # left by a run that was killed
        due = cases_due(store)
        log.info("case sync started", cases=len(due))
        for number, job in enumerate(due, 1):
            what = f"case {number}/{len(due)} (job {job.id})"
            step = functools.partial(progress, what) if progress else None
            try:
                record = sync_case(store, container, anonymiser, job, scratch / f"job-{job.id}",
                                   progress=step)
            except (SyncError, AzureError, OSError) as exc:
                reason = _scrubbed(f"{type(exc).__name__}: {exc}".splitlines()[0])
                log.warning("case sync failed", job=job.id, reason=reason)
                _set_detail(store.index, job.id, {"sync_error": reason})
                failed[job.id] = reason
                continue
            finally:
                shutil.rmtree(scratch / f"job-{job.id}", ignore_errors=True)
            synced.append(job.id)
            blobs += record["blobs_uploaded"]
            size += record["bytes_uploaded"]
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("case sync done", synced=len(synced), failed=len(failed), blobs=blobs, bytes=size)
    return CasesReport(tuple(synced), failed, blobs, size)


def sync_case(store: Store, container: ContainerClient, anonymiser: Anonymiser, job: Job,
              workdir: Path, *, progress: blob.ProgressCallback | None = None) -> dict[str, Any]:
    """Anonymise one case into ``workdir`` and upload it; record and return its ``synced``."""
    approved_ids = _approved_jobs(job)
    outputs = ai_outputs(store, job)
    sources = {
        "ct": [Path(p) for p in job.detail["slice_files"]],
        "ai": [output.path for output in outputs],
        "approved": approved_files(store, job),
    }
    anonymised = {kind: anonymiser.anonymise_files(paths, workdir / kind)
                  for kind, paths in sources.items() if paths}
    case_id = anonymiser.uid(job.series_uid)
    manifest = case_manifest(case_id, outputs, sources, anonymised)
    report = blob.upload_case(container, case_id, anonymised, manifest, progress=progress)
    record = {
        "case": case_id,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **{kind: len(anonymised.get(kind, [])) for kind in blob.CASE_KINDS},
        "approved_jobs": approved_ids,
        "blobs_uploaded": report.uploaded,
        "bytes_uploaded": report.bytes,
    }
    _set_detail(store.index, job.id, {"synced": record}, drop=("sync_error",))
    log.info("case synced", job=job.id, ct=record["ct"], ai=record["ai"],
             approved=record["approved"], blobs=report.uploaded, bytes=report.bytes)
    return record


@dataclass(frozen=True)
class AIOutput:
    """One result file of a ``sync: true`` route and the model version that made it."""

    path: Path
    kind: str
    model: str
    version: str


def ai_outputs(store: Store, job: Job) -> list[AIOutput]:
    """The result files of the job's ``sync: true`` routes (the worker's ``<kind>-<route>.dcm``)."""
    folder = store.job_dir(job.id)
    return [AIOutput(folder / f"{kind}-{index}.dcm", kind, route["model"], route["version"])
            for index, route in enumerate(job.routes) if route.get("sync")
            for kind in route["outputs"]]


def case_manifest(case_id: str, outputs: list[AIOutput], sources: dict[str, list[Path]],
                  anonymised: dict[str, list[Path]]) -> dict[str, Any]:
    """What a reader of the case needs, without identifiers and without timestamps (a re-run
    must produce the same bytes, or the upload would see a changed manifest).

    Structure names come from the node's outputs (the model's names); ROI names in the
    anonymised files are emptied by the profile. Of a clinician's set only the ROIs named as
    the model names them are listed (their number and name); other, free-text ROI names are
    only counted, as they may carry anything.
    """
    first = pydicom.dcmread(anonymised["ct"][0], stop_before_pixels=True)
    ai = [_ai_entry(output, dst) for output, dst in
          zip(outputs, anonymised.get("ai", []), strict=True)]
    known = {s["name"].lower() for entry in ai for s in entry["structures"]}
    approved = [_approved_entry(src, dst, known) for src, dst in
                zip(sources["approved"], anonymised.get("approved", []), strict=True)]
    return {
        "schema": MANIFEST_SCHEMA,
        "case": case_id,
        "patient": str(first.PatientID),
        "study": str(first.StudyInstanceUID),
        "deidentification": anonymise.DEIDENTIFICATION_METHOD,
        "models": _unique_dicts({"name": o.model, "version": o.version} for o in outputs),
        "counts": {kind: len(anonymised.get(kind, [])) for kind in blob.CASE_KINDS},
        "ai": ai,
        "approved": approved,
    }


def _ai_entry(output: AIOutput, dst: Path) -> dict[str, Any]:
    return {"file": dst.name, "kind": output.kind, "model": output.model,
            "version": output.version, "structures": _structures(output.path)}


def _approved_entry(src: Path, dst: Path, known: set[str]) -> dict[str, Any]:
    structures = _structures(src)
    named = [s for s in structures if s["name"].lower() in known]
    return {"file": dst.name, "approval": APPROVED, "structures": named,
            "other_rois": len(structures) - len(named)}


def _structures(path: Path) -> list[dict[str, Any]]:
    """(number, name) of each ROI of an RT-STRUCT or segment of a SEG, from the original file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "StructureSetROISequence" in ds:
        return [{"number": int(r.ROINumber), "name": str(r.ROIName)}
                for r in ds.StructureSetROISequence]
    return [{"number": int(s.SegmentNumber), "name": str(s.SegmentLabel)}
            for s in ds.get("SegmentSequence", [])]


def _unique_dicts(items: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    return [dict(t) for t in dict.fromkeys(tuple(sorted(i.items())) for i in items)]


def _scrubbed(text: str) -> str:
    """A reason fit for status and logs: UID-shaped text (file names of the spool) hashed."""
    return str(drop_patient_data(None, "", {"reason": text})["reason"])


def _set_detail(index: Index, job_id: int, items: dict[str, Any],
                drop: tuple[str, ...] = ()) -> None:
    """Merge ``items`` into a job's detail and remove the ``drop`` keys, in one transaction."""
    with index.tx() as db:
        row = db.execute("SELECT detail FROM jobs WHERE id = ?", (job_id,)).fetchone()
        detail = {k: v for k, v in json.loads(row[0] or "{}").items() if k not in drop}
        detail.update(items)
        db.execute("UPDATE jobs SET detail = ? WHERE id = ?", (json.dumps(detail), job_id))


@contextlib.contextmanager
def _exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an advisory lock on ``path``; SyncError at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SyncError(f"another {what} is running (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- models --------------------------------------------------------------------------------


def sync_models(container: ContainerClient, staging_dir: Path, registry: Registry,
                policy: dict[str, str]) -> list[PullResult]:
    """Pull every published model version the registry does not have (see ``updates``)."""
    with _exclusive(staging_dir.parent / "sync-models.lock", "model pull"):
        return pull_updates(container, staging_dir, registry, installed_versions(registry),
                            policy)


def installed_versions(registry: Registry) -> set[tuple[str, str]]:
    """(name, version) of every package folder, verified or not: a broken installed version
    must be repaired by an admin, not overwritten by a pull."""
    folder = registry.models_dir
    names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return {(name, version) for name in names for version in registry.versions(name)}


# --- wiring --------------------------------------------------------------------------------


def open_container(cfg: GatewayConfig) -> ContainerClient:
    """The configured container: a connection string from the environment or systemd
    credential, else ``account_url`` with an Azure identity. SyncError says what is missing."""
    if not cfg.sync.enabled:
        raise SyncError("sync is disabled: set sync.enabled: true in gateway.yaml")
    try:
        return blob.container_client(None, cfg.sync.account_url, cfg.sync.container,
                                     cfg.sync.authority_host, cfg.sync.api_version)
    except SyncError as exc:
        raise SyncError(f"sync is not configured: {exc}") from exc


def make_anonymiser(cfg: GatewayConfig) -> Anonymiser:
    """The node's anonymiser: key from the environment or systemd credential, the pseudonym
    map beside the index, dates per ``sync.date_shift``."""
    try:
        key = anonymise.load_key()
    except SyncError as exc:
        raise SyncError(f"sync is not configured: {exc}") from exc
    return Anonymiser(key, cfg.storage.root / PSEUDONYM_MAP,
                      AnonymiseOptions(dates=DateMode(cfg.sync.date_shift)))


def sync_cases_now(cfg: GatewayConfig, store: Store, *,
                   progress: CaseProgress | None = None) -> CasesReport:
    """Case sync with the node's configuration."""
    container = open_container(cfg)  # first: it says when sync is disabled
    return sync_cases(store, container, make_anonymiser(cfg), progress=progress)


def sync_models_now(cfg: GatewayConfig, registry: Registry) -> list[PullResult]:
    """Model pull with the node's configuration."""
    return sync_models(open_container(cfg), cfg.storage.root / MODEL_STAGING_DIR, registry,
                       dict(cfg.sync.activation))


def sync_now(cfg: GatewayConfig, store: Store, registry: Registry, *,
             progress: CaseProgress | None = None) -> SyncReport:
    """Upload due cases, then pull new model versions. SyncError (one line) when sync is not
    configured or storage cannot be reached; a single case's failure is in the report."""
    cases = sync_cases_now(cfg, store, progress=progress)
    return SyncReport(cases, sync_models_now(cfg, registry))


def scheduled_cases(cfg: GatewayConfig, store: Store) -> None:
    """The scheduler's case sync: a run that cannot start is logged, and the next one tries."""
    try:
        sync_cases_now(cfg, store)
    except SyncError as exc:
        log.error("case sync not run", reason=_scrubbed(str(exc)))


def scheduled_models(cfg: GatewayConfig, registry: Registry) -> None:
    """The scheduler's model pull; refused versions are logged by ``updates``."""
    try:
        sync_models_now(cfg, registry)
    except SyncError as exc:
        log.error("model pull not run", reason=_scrubbed(str(exc)))
