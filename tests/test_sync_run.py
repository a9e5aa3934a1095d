"""Case sync end to end: the node contours a CT from storescu and delivers it to Orthanc; the
sync run anonymises the case and uploads it to a real blob service (Azurite); a clinician's
approved structure set sent later is linked and uploaded on the next run."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import structlog.testing
from azure.storage.blob import ContainerClient
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from ie_gateway.cli import TextProgress
from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.errors import SyncError
from ie_gateway.infer.registry import Registry, registry_for
from ie_gateway.qa.approvals import link_approved
from ie_gateway.store import Job, JobState, Store
from ie_gateway.store.records import ApprovedSet, JobDetail
from ie_gateway.sync.anonymise import Anonymiser
from ie_gateway.sync.blob import container_client
from ie_gateway.sync.run import SyncReport, scheduled_cases, scheduled_models, sync_now
from ie_gateway.sync.updates import publish_version
from ie_gateway.sync.upload import CasesReport, sync_cases
from ie_gateway.vocab import PullStatus
from tests.azurite import azurite_blob  # noqa: F401  (fixture)
from tests.infer_packages import threshold_model, write_package
from tests.keys import DEMO_KEY, DEMO_TRUSTED
from tests.peers import Node, Orthanc, storescu, wait_until
from tests.test_pipeline import toy_models

pytestmark = [pytest.mark.peer, pytest.mark.slow]

KEY = "sync-run-test-key-0123456789"
PLANTED = {
    "PatientName": "PLANTED^SYNC^PERSON",
    "PatientID": "PLANTED-7781",
    "PatientBirthDate": "19360229",
    "InstitutionName": "Planted Royal Infirmary",
    "AccessionNumber": "ACCPLANT4411",
    "ReferringPhysicianName": "PLANTED^REFERRER",
}
PRIVATE_VALUE = "PLANTED-PRIVATE-0099"
REVIEWER = "PLANTED^REVIEWER"
FREE_TEXT_ROI = "PTV Planted 60Gy"
RULES = {"rules": [
    {"name": "research", "match": {"Modality": "CT", "StationName": "RESEARCH"},
     "model": "toy-body", "outputs": ["rtstruct", "seg"], "send_to": ["TPS"], "sync": True},
    {"name": "clinical", "match": {"Modality": "CT"},
     "model": "toy-body", "outputs": ["rtstruct"], "send_to": ["TPS"]},
]}
SETTLED = {"delivered", "failed", "refused", "unrouted"}


@dataclass
class Site:
    """The node, its TPS, the two CTs it contoured, and the test's view of its store."""

    node: Node
    cfg: GatewayConfig
    store: Store
    container: ContainerClient
    synced_ct: list[Path]
    private_ct: list[Path]
    synced_job: Job
    private_job: Job
    needles: list[bytes]


@dataclass
class FirstRuns:
    """A run against a missing container, the detail it left, then the first real run with the
    container and the detail as it left them (later tests add to both: the tests run in any order)."""

    failed: CasesReport
    detail_after_failure: JobDetail
    report: SyncReport
    progress: str
    blobs: dict[str, bytes]
    detail_after_run: JobDetail


def _ct(folder: Path, seed: int, **extra: object) -> list[Path]:
    """20 small slices with planted identifiers in the header and a private tag."""
    phantom = make_phantom(seed, slices=20, size=128, pixel_mm=3.9, slice_mm=5.0)
    paths = write_ct_series(phantom, folder, seed=seed, patient_name=PLANTED["PatientName"],
                            patient_id=PLANTED["PatientID"],
                            extra={**{k: v for k, v in PLANTED.items()
                                      if k not in ("PatientName", "PatientID")}, **extra})
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.private_block(0x0011, "PLANTED", create=True).add_new(0x01, "LO", PRIVATE_VALUE)
        ds.save_as(path)
    return paths


def _job_of(store: Store, series_uid: str) -> Job:
    [job] = [j for j in store.index.jobs() if j.series_uid == series_uid]
    return job


def _clear_uids(paths: list[Path]) -> list[bytes]:
    found: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds[k].value) for k in ("SOPInstanceUID", "SeriesInstanceUID",
                                             "StudyInstanceUID", "FrameOfReferenceUID") if k in ds}
    return [uid.encode() for uid in found]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, azurite_blob: str) -> Iterator[Site]:  # noqa: F811
    root = tmp_path_factory.mktemp("sync-run")
    container = container_client(azurite_blob, None, f"t{uuid.uuid4().hex[:12]}")
    container.create_container()
    tps = Orthanc(root / "tps").start()
    node = Node(root / "node", rules=RULES, settings={
        "models_dir": str(toy_models(root / "models")),
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
        "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
        "inference": {"timeout_s": 120},
        "approvals": {"accept_from": ["TPS"]},
        "sync": {"enabled": True, "container": container.container_name,
                 "cases_cron": "0 0 1 1 *", "models_cron": "0 0 1 1 *"},
    })
    try:
        node.start()
        synced_ct = _ct(root / "ct-sync", 31, StationName="RESEARCH")
        private_ct = _ct(root / "ct-private", 32)
        assert storescu(node.port, synced_ct).returncode == 0
        assert storescu(node.port, private_ct).returncode == 0
        rows = node.wait_state(SETTLED, timeout=300, count=2)
        assert {r["state"] for r in rows} == {"delivered"}, rows
        cfg = load_config(node.config)
        store = Store(cfg.storage.root)
        synced_job = _job_of(store, str(pydicom.dcmread(synced_ct[0]).SeriesInstanceUID))
        ai = [store.job_dir(synced_job.id) / n for n in ("rtstruct-0.dcm", "seg-0.dcm")]
        needles = [v.encode() for v in (*PLANTED.values(), PRIVATE_VALUE)]
        yield Site(node, cfg, store, container, synced_ct, private_ct, synced_job,
                   _job_of(store, str(pydicom.dcmread(private_ct[0]).SeriesInstanceUID)),
                   needles + _clear_uids(synced_ct + ai))
    finally:
        node.stop()
        tps.stop()
        container.delete_container()


@pytest.fixture(scope="module")
def env(azurite_blob: str) -> Iterator[None]:  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_blob)
        mp.setenv("IE_GATEWAY_ANON_KEY", KEY)
        mp.delenv("CREDENTIALS_DIRECTORY", raising=False)
        yield


@pytest.fixture(scope="module")
def first_runs(site: Site, env: None, azurite_blob: str) -> FirstRuns:  # noqa: F811
    missing = container_client(azurite_blob, None, f"missing{uuid.uuid4().hex[:8]}")
    anonymiser = Anonymiser(KEY.encode(), site.cfg.storage.root / "pseudonyms.sqlite3")
    failed = sync_cases(site.store, missing, anonymiser)
    detail = site.store.index.job(site.synced_job.id).detail
    stream = io.StringIO()
    report = sync_now(site.cfg, site.store, registry_for(site.cfg), progress=TextProgress(stream))
    return FirstRuns(failed, detail, report, stream.getvalue(), _blobs(site.container),
                     site.store.index.job(site.synced_job.id).detail)


def _case_id(job: Job, root: Path) -> str:
    return Anonymiser(KEY.encode(), root / "test-map.sqlite3").uid(job.series_uid)


def _blobs(container: ContainerClient, prefix: str = "cases/") -> dict[str, bytes]:
    return {b.name: container.download_blob(b.name).readall()
            for b in container.list_blobs(name_starts_with=prefix)}


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(DicomBytesIO(data))


def test_delivered_case_is_uploaded_with_ct_ai_and_a_manifest_naming_the_model(
        site: Site, first_runs: FirstRuns, tmp_path: Path) -> None:
    case = _case_id(site.synced_job, tmp_path)
    assert first_runs.report.cases.synced == (site.synced_job.id,)
    blobs = {n: d for n, d in first_runs.blobs.items() if n.startswith(f"cases/{case}/")}
    kinds = [name.split("/")[2] for name in blobs]
    assert (kinds.count("ct"), kinds.count("ai"), kinds.count("manifest.json")) == (20, 2, 1)
    manifest = json.loads(blobs[f"cases/{case}/manifest.json"])
    assert manifest["models"] == [{"name": "toy-body", "version": "1"}]
    assert manifest["counts"] == {"ct": 20, "ai": 2, "approved": 0}
    assert {s["name"] for entry in manifest["ai"] for s in entry["structures"]} == {"External"}
    synced = first_runs.detail_after_run.synced
    assert synced is not None and (synced.case, synced.ct, synced.ai, synced.approved) == (case, 20, 2, 0)


def test_no_planted_identifier_or_clear_uid_in_any_uploaded_byte(
        site: Site, first_runs: FirstRuns) -> None:
    blobs = _blobs(site.container)
    assert len(blobs) >= 23
    for name, data in blobs.items():
        for needle in site.needles:
            assert needle not in data, (name, needle)


def test_uploaded_rtstruct_references_the_uploaded_ct(site: Site, first_runs: FirstRuns,
                                                      tmp_path: Path) -> None:
    case = _case_id(site.synced_job, tmp_path)
    blobs = {n: d for n, d in first_runs.blobs.items() if n.startswith(f"cases/{case}/")}
    cts = [_dataset(data) for name, data in blobs.items() if "/ct/" in name]
    [rt] = [ds for name, data in blobs.items() if "/ai/" in name
            and (ds := _dataset(data)).Modality == "RTSTRUCT"]
    referenced = {c.ReferencedSOPInstanceUID for c in rt.ReferencedFrameOfReferenceSequence[0]
                  .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    assert referenced == {ct.SOPInstanceUID for ct in cts}
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == cts[0].FrameOfReferenceUID
    assert rt.StudyInstanceUID == cts[0].StudyInstanceUID and rt.PatientID == cts[0].PatientID


def test_second_run_uploads_nothing(site: Site, first_runs: FirstRuns) -> None:
    etags = {b.name: b.etag for b in site.container.list_blobs()}
    again = sync_now(site.cfg, site.store, registry_for(site.cfg))
    assert (again.cases.synced, again.cases.blobs, again.cases.failed) == ((), 0, {})
    assert {b.name: b.etag for b in site.container.list_blobs()} == etags


def test_case_whose_rule_says_no_sync_is_not_uploaded(site: Site, first_runs: FirstRuns,
                                                      tmp_path: Path) -> None:
    job = site.store.index.job(site.private_job.id)
    assert job.state is JobState.DELIVERED and job.routes[0].sync is False
    assert job.detail.synced is None
    assert not _blobs(site.container, f"cases/{_case_id(job, tmp_path)}/")


def test_failed_case_is_recorded_with_its_reason_and_retried_next_run(
        site: Site, first_runs: FirstRuns) -> None:
    assert list(first_runs.failed.failed) == [site.synced_job.id]
    reason = first_runs.detail_after_failure.sync_error
    assert reason and "container" in reason and "does not exist" in reason
    assert first_runs.detail_after_failure.synced is None
    detail = site.store.index.job(site.synced_job.id).detail
    assert detail.sync_error is None and detail.synced is not None


def test_progress_bar_ends_each_case_at_100_percent(first_runs: FirstRuns) -> None:
    lines = first_runs.progress.split("\n")
    assert lines[-1] == ""
    assert lines[0].startswith("\rcase 1/1 ") and lines[0].rstrip().endswith("MiB")
    assert " 100% " in lines[0].rsplit("\r", 1)[1]


def _clinicians_copy(ai_rtstruct: Path, path: Path, approval: str, series_uid: str) -> Path:
    """The clinician's version of the AI structure set, as a TPS would export it."""
    ds = pydicom.dcmread(ai_rtstruct)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Manufacturer = "TPS"
    ds.ApprovalStatus = approval
    ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = "20260101", "101010", REVIEWER
    ds.StructureSetROISequence[0].ROIName = "external"  # the clinician's spelling
    extra = pydicom.Dataset()
    extra.ROINumber = 99
    extra.ReferencedFrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    extra.ROIName = FREE_TEXT_ROI
    extra.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence.append(extra)
    ds.save_as(path, enforce_file_format=True)
    return path


def _sent_job(site: Site, path: Path) -> Job:
    """Send ``path`` to the node as the TPS; the job that holds it, once it has settled."""
    assert storescu(site.node.port, [path], calling="TPS").returncode == 0
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    def settled() -> Job | None:
        rows = site.store.index.db.query("SELECT job_id FROM instances WHERE sop_uid = ?", (sop_uid,))
        job = site.store.index.job(int(rows[0][0])) if rows else None
        return job if job is not None and job.state.value in SETTLED else None
    return wait_until(settled, 60, every=0.2, what="the structure set's job to settle")  # type: ignore[no-any-return]


def test_node_own_structure_set_sent_back_is_not_linked(site: Site, first_runs: FirstRuns) -> None:
    rt_job = _sent_job(site, site.store.job_dir(site.synced_job.id) / "rtstruct-0.dcm")
    assert link_approved(site.store, rt_job) is None
    entries = site.store.index.job(site.synced_job.id).detail.approved
    assert all(entry.job != rt_job.id for entry in entries)
    assert site.store.index.job(rt_job.id).detail.linked_to is None


def test_approved_revision_of_a_draft_is_linked_and_uploaded_under_approved_without_the_draft(
        site: Site, first_runs: FirstRuns, tmp_path: Path) -> None:
    ai = site.store.job_dir(site.synced_job.id) / "rtstruct-0.dcm"
    series_uid = generate_uid()
    draft = _clinicians_copy(ai, tmp_path / "draft.dcm", "UNAPPROVED", series_uid)
    draft_job = _sent_job(site, draft)
    # until the worker's route stage calls it for RTSTRUCT series; a second call is a no-op
    assert link_approved(site.store, draft_job, ["TPS"]) == site.synced_job.id
    assert site.store.index.job(draft_job.id).detail.approval == "UNAPPROVED"
    assert sync_now(site.cfg, site.store, registry_for(site.cfg)).cases.synced == ()

    approved = _clinicians_copy(ai, tmp_path / "approved.dcm", "APPROVED", series_uid)
    rt_job = _sent_job(site, approved)
    assert rt_job.id != draft_job.id  # the revision came after the series completed
    assert link_approved(site.store, rt_job, ["TPS"]) == site.synced_job.id
    entries = site.store.index.job(site.synced_job.id).detail.approved
    assert ApprovedSet(job=rt_job.id, approval="APPROVED", instances=1) in entries
    assert ApprovedSet(job=draft_job.id, approval="UNAPPROVED", instances=1) in entries
    assert site.store.index.job(rt_job.id).detail.linked_to == site.synced_job.id

    report = sync_now(site.cfg, site.store, registry_for(site.cfg))
    assert report.cases.synced == (site.synced_job.id,)
    assert report.cases.blobs == 2  # the approved set and the new manifest; CT and AI are there
    case = _case_id(site.synced_job, tmp_path)
    blobs = _blobs(site.container, f"cases/{case}/")
    [(name, data)] = [(n, d) for n, d in blobs.items() if "/approved/" in n]
    uploaded = _dataset(data)
    assert uploaded.ApprovalStatus == "APPROVED"
    ct_uids = {_dataset(d).SOPInstanceUID for n, d in blobs.items() if "/ct/" in n}
    contour_refs = {image.ReferencedSOPInstanceUID for roi in uploaded.ROIContourSequence
                    for contour in roi.ContourSequence for image in contour.ContourImageSequence}
    assert contour_refs and contour_refs <= ct_uids
    for needle in [*site.needles, REVIEWER.encode(), FREE_TEXT_ROI.encode(),
                   *_clear_uids([draft, approved])]:
        assert needle not in data and needle not in blobs[f"cases/{case}/manifest.json"], needle
    manifest = json.loads(blobs[f"cases/{case}/manifest.json"])
    assert manifest["counts"]["approved"] == 1
    assert manifest["approved"] == [{"file": name.rsplit("/", 1)[1], "approval": "APPROVED",
                                     "structures": [{"number": 1, "name": "external"}],
                                     "other_rois": 1}]
    synced = site.store.index.job(site.synced_job.id).detail.synced
    assert synced is not None and synced.approved == 1


def test_sync_now_without_configuration_says_what_is_missing(
        site: Site, monkeypatch: pytest.MonkeyPatch, azurite_blob: str) -> None:  # noqa: F811
    registry = registry_for(site.cfg)
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "IE_GATEWAY_ANON_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IE_GATEWAY_ANON_KEY", KEY)
    with pytest.raises(SyncError, match="sync is not configured: no blob storage configured: "
                                        "set AZURE_STORAGE_CONNECTION_STRING"):
        sync_now(site.cfg, site.store, registry)
    monkeypatch.delenv("IE_GATEWAY_ANON_KEY")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_blob)
    with pytest.raises(SyncError, match="sync is not configured: no anonymisation key: set "
                                        "IE_GATEWAY_ANON_KEY") as no_key:
        sync_now(site.cfg, site.store, registry)
    assert "\n" not in str(no_key.value)
    disabled = site.cfg.model_copy(update={"sync": site.cfg.sync.model_copy(update={"enabled": False})})
    with pytest.raises(SyncError, match="sync is disabled: set sync.enabled: true"):
        sync_now(disabled, site.store, registry)


def test_published_model_version_is_pulled_once_and_activated_by_policy(
        site: Site, first_runs: FirstRuns, env: None, tmp_path: Path,
        azurite_blob: str) -> None:  # noqa: F811
    container = container_client(azurite_blob, None, f"m{uuid.uuid4().hex[:12]}")
    container.create_container()
    try:
        package = write_package(tmp_path / "publish", [threshold_model(2)], name="toy-pull",
                                version="7", structures=1)
        publish_version(container, package, key=DEMO_KEY)
        cfg = site.cfg.model_copy(update={"sync": site.cfg.sync.model_copy(
            update={"container": container.container_name, "activation": {"toy-pull": "auto"}})})
        registry = Registry(tmp_path / "models", tmp_path / "models-state.json", keys=DEMO_TRUSTED)
        first = sync_now(cfg, site.store, registry)
        assert [(r.name, r.version, r.status) for r in first.models] == [
            ("toy-pull", "7", PullStatus.ACTIVE)]
        assert registry.active("toy-pull") == "7"
        assert sync_now(cfg, site.store, registry).models == []
    finally:
        container.delete_container()


def test_scheduled_runs_log_instead_of_raising_when_sync_cannot_start(site: Site) -> None:
    disabled = site.cfg.model_copy(update={"sync": site.cfg.sync.model_copy(update={"enabled": False})})
    before = site.store.index.job(site.synced_job.id).detail
    with structlog.testing.capture_logs() as logs:
        scheduled_cases(disabled, site.store)  # a SyncError escaping would fail the test
        scheduled_models(disabled, registry_for(site.cfg))
    errors = [(e["event"], e["log_level"]) for e in logs if e["log_level"] == "error"]
    assert errors == [("case sync not run", "error"), ("model pull not run", "error")]
    assert all("sync is disabled" in e["reason"] for e in logs if e["log_level"] == "error")
    assert site.store.index.job(site.synced_job.id).detail == before
