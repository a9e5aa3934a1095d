"""Upload of anonymised cases to a real blob service (Azurite): no identifiers, idempotent,
resumable, manifest last."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from azure.storage.blob import ContainerClient

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.errors import SyncError
from ie_gateway.sync.anonymise import AnonymiseOptions, Anonymiser
from ie_gateway.sync.blob import container_client, load_connection_string, upload_case
from tests.azurite import azurite_blob  # noqa: F401  (fixture)
from tests.sync_samples import PRIVATE_VALUE, make_rtstruct

pytestmark = pytest.mark.peer

KEY = b"blob-test-key-0123456789"
PLANTED = {
    "PatientName": "PLANTED^NAME",
    "PatientID": "PLANTED-ID-5521",
    "PatientBirthDate": "19380229",
    "InstitutionName": "Planted General Infirmary",
    "AccessionNumber": "ACCPLANT771",
}


class Interrupted(Exception):
    """Raised from the progress callback to stop an upload half way, as a crash would."""


@pytest.fixture()
def container(azurite_blob: str) -> Iterator[ContainerClient]:  # noqa: F811
    client = container_client(azurite_blob, None, f"t{uuid.uuid4().hex[:12]}")
    client.create_container()
    yield client
    client.delete_container()


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[Path]], list[bytes]]:
    """A small synthetic CT with planted identifiers and an RT-STRUCT on it, anonymised."""
    root = tmp_path_factory.mktemp("case")
    phantom = make_phantom(7, slices=6, size=64, pixel_mm=6.0)
    ct = write_ct_series(
        phantom, root / "ct", seed=7, patient_name=PLANTED["PatientName"],
        patient_id=PLANTED["PatientID"],
        extra={k: v for k, v in PLANTED.items() if k not in ("PatientName", "PatientID")},
    )
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.private_block(0x0011, "PLANTED", create=True).add_new(0x01, "LO", PRIVATE_VALUE)
        ds.save_as(path)
    original = pydicom.dcmread(ct[0])
    needles = [v.encode() for v in PLANTED.values()] + [
        PRIVATE_VALUE.encode(), original.StudyInstanceUID.encode(),
        original.SOPInstanceUID.encode(), original.FrameOfReferenceUID.encode(),
    ]
    rtstruct = make_rtstruct(ct, root / "rs.dcm")
    anonymiser = Anonymiser(KEY, root / "node" / "map.sqlite", AnonymiseOptions())
    files = {
        "ct": anonymiser.anonymise_files(ct, root / "anon" / "ct"),
        "ai": anonymiser.anonymise_files([rtstruct], root / "anon" / "ai"),
    }
    return files, needles


def _manifest(files: dict[str, list[Path]]) -> dict[str, object]:
    first = pydicom.dcmread(files["ct"][0], stop_before_pixels=True)
    return {"model": {"name": "demo-thorax", "version": "1"}, "structures": ["Heart"],
            "patient": str(first.PatientID), "study": str(first.StudyInstanceUID)}


def _blobs(container: ContainerClient) -> dict[str, bytes]:
    return {b.name: container.download_blob(b.name).readall() for b in container.list_blobs()}


def test_no_planted_identifier_in_any_uploaded_byte(container: ContainerClient, case) -> None:
    files, needles = case
    upload_case(container, "case1", files, _manifest(files))
    blobs = _blobs(container)
    assert len(blobs) == len(files["ct"]) + len(files["ai"]) + 1
    for name, data in blobs.items():
        for needle in needles:
            assert needle not in data, (name, needle)


def test_uploaded_rtstruct_references_uploaded_ct(container: ContainerClient, case) -> None:
    files, _ = case
    upload_case(container, "case1", files, _manifest(files))
    blobs = _blobs(container)
    ct_uids = {
        pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID
        for name, data in blobs.items() if "/ct/" in name
    }
    (rs_name,) = [n for n in blobs if "/ai/" in n]
    rs = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blobs[rs_name]))
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID
            for c in rs.ROIContourSequence[0].ContourSequence}
    assert refs == ct_uids


def test_layout_and_manifest_lists_every_file(container: ContainerClient, case) -> None:
    files, _ = case
    report = upload_case(container, "case1", files, _manifest(files))
    names = {b.name for b in container.list_blobs()}
    expected = {f"cases/case1/ct/{p.stem}.dcm" for p in files["ct"]}
    expected |= {f"cases/case1/ai/{p.stem}.dcm" for p in files["ai"]}
    assert names == expected | {"cases/case1/manifest.json"}
    manifest = json.loads(container.download_blob("cases/case1/manifest.json").readall())
    assert manifest["model"] == {"name": "demo-thorax", "version": "1"}
    assert len(manifest["files"]["ct"]) == len(files["ct"])
    size = sum(p.stat().st_size for ps in files.values() for p in ps)
    assert report.uploaded == len(names) and report.skipped == 0 and report.bytes > size


def test_rerun_uploads_nothing_new(container: ContainerClient, case) -> None:
    files, _ = case
    upload_case(container, "case1", files, _manifest(files))
    etags = {b.name: b.etag for b in container.list_blobs()}
    again = upload_case(container, "case1", files, _manifest(files))
    assert (again.uploaded, again.bytes) == (0, 0)
    assert again.skipped == len(etags)
    assert {b.name: b.etag for b in container.list_blobs()} == etags


def test_interrupted_upload_resumes_with_only_the_rest(container: ContainerClient, case) -> None:
    files, _ = case
    calls = []

    def die_after_two(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:  # the initial call, then two finished blobs
            raise Interrupted

    with pytest.raises(Interrupted):
        upload_case(container, "case1", files, _manifest(files), progress=die_after_two,
                    max_concurrency=1)
    before = {b.name: b.etag for b in container.list_blobs()}
    assert "cases/case1/manifest.json" not in before  # no manifest: the case is incomplete
    total_files = len(files["ct"]) + len(files["ai"])
    assert 2 <= len(before) <= 3 < total_files  # two finished, at most one more in flight

    resumed = upload_case(container, "case1", files, _manifest(files))
    assert resumed.uploaded == total_files - len(before) + 1  # the rest, then the manifest
    assert resumed.skipped == len(before)
    after = {b.name: b.etag for b in container.list_blobs()}
    assert {n: after[n] for n in before} == before  # the first two were not sent again


def test_changed_file_is_reuploaded_with_new_manifest(container: ContainerClient, case,
                                                      tmp_path: Path) -> None:
    files, _ = case
    upload_case(container, "case1", files, _manifest(files))
    changed = tmp_path / files["ai"][0].name
    ds = pydicom.dcmread(files["ai"][0])
    ds.StructureSetLabel = "APPROVED"
    ds.save_as(changed)
    report = upload_case(container, "case1", {"ct": files["ct"], "ai": [changed]},
                         _manifest(files))
    assert report.uploaded == 2  # the changed RT-STRUCT and the manifest


def test_progress_reports_monotonic_bytes_to_total(container: ContainerClient, case) -> None:
    files, _ = case
    seen: list[tuple[int, int]] = []
    upload_case(container, "case1", files, _manifest(files), progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done)
    assert seen[-1][0] == seen[-1][1] > 0


def test_missing_container_is_a_sync_error(azurite_blob: str, case) -> None:  # noqa: F811
    files, _ = case
    client = container_client(azurite_blob, None, "does-not-exist")
    with pytest.raises(SyncError, match="does-not-exist"):
        upload_case(client, "case1", files, _manifest(files))


def test_unsafe_case_id_is_refused(container: ContainerClient, case) -> None:
    files, _ = case
    with pytest.raises(SyncError, match="case id"):
        upload_case(container, "../x", files, _manifest(files))


def test_connection_string_from_env_or_systemd_credential(tmp_path: Path) -> None:
    assert load_connection_string({"AZURE_STORAGE_CONNECTION_STRING": "A=1"}) == "A=1"
    (tmp_path / "storage-connection-string").write_text("B=2\n")
    assert load_connection_string({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "B=2"
    assert load_connection_string({}) is None


def test_no_storage_configured_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SyncError, match="AZURE_STORAGE_CONNECTION_STRING"):
        container_client(None, None, "cases")
