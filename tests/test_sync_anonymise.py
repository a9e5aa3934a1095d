"""Anonymisation: PS3.15 basic profile, keyed consistent UIDs, date shift, the node-side map."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.errors import SyncError
from ie_gateway.sync.anonymise import (
    AnonymiseOptions,
    Anonymiser,
    BurnedInAnnotation,
    load_key,
)
from ie_gateway.vocab import DateMode
from tests.sync_samples import (
    NESTED_NAME,
    PLANTED,
    PRIVATE_VALUE,
    STUDY_UID,
    make_ct,
    make_rtstruct,
    planted_needles,
)

KEY = b"test-key-0123456789abcdef"


@pytest.fixture()
def ct(tmp_path: Path) -> list[Path]:
    return make_ct(tmp_path / "ct")


def _anonymiser(tmp_path: Path, key: bytes = KEY, **options: object) -> Anonymiser:
    return Anonymiser(key, tmp_path / "node" / "pseudonyms.sqlite", AnonymiseOptions(**options))


def test_planted_identifiers_do_not_occur_in_output_bytes(tmp_path: Path, ct: list[Path]) -> None:
    out = _anonymiser(tmp_path).anonymise_files(ct, tmp_path / "out")
    assert len(out) == len(ct)
    for path in out:
        data = path.read_bytes()
        for needle in planted_needles():
            assert needle not in data, (path.name, needle)


def test_profile_actions_and_identity_attributes(tmp_path: Path, ct: list[Path]) -> None:
    anonymiser = _anonymiser(tmp_path)
    ds = pydicom.dcmread(anonymiser.anonymise_file(ct[0], tmp_path))
    assert ds.PatientID == ds.PatientName.family_name == anonymiser.pseudonym(PLANTED["PatientID"])
    assert ds.PatientBirthDate == ""  # Z, never shifted
    assert ds.AccessionNumber == ""  # Z
    assert ds.ReferringPhysicianName == ""  # Z
    assert ds.InstitutionName == "ANONYMISED"  # X/Z/D -> D
    assert len(ds.OperatorIdentificationSequence) == 0  # X/D on a sequence -> emptied
    assert ds.SecondaryReviewerName == ""  # a person name the table does not list
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert ds.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    original = pydicom.dcmread(ct[0])
    assert ds.PixelData == original.PixelData
    assert str(PRIVATE_VALUE) not in str(ds) and NESTED_NAME not in str(ds)


def test_rtstruct_still_references_the_anonymised_ct(tmp_path: Path, ct: list[Path]) -> None:
    rtstruct = make_rtstruct(ct, tmp_path / "rs.dcm")
    anonymiser = _anonymiser(tmp_path)
    ct_out = [pydicom.dcmread(p) for p in anonymiser.anonymise_files(ct, tmp_path / "ct_out")]
    (rs_path,) = anonymiser.anonymise_files([rtstruct], tmp_path / "rs_out")
    rs = pydicom.dcmread(rs_path)

    ct_uids = {c.SOPInstanceUID for c in ct_out}
    assert ct_uids.isdisjoint({pydicom.dcmread(p).SOPInstanceUID for p in ct})
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    study = frame.RTReferencedStudySequence[0]
    series = study.RTReferencedSeriesSequence[0]
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == ct_uids
    contour_refs = {
        c.ContourImageSequence[0].ReferencedSOPInstanceUID
        for c in rs.ROIContourSequence[0].ContourSequence
    }
    assert contour_refs == ct_uids
    assert series.SeriesInstanceUID == ct_out[0].SeriesInstanceUID
    assert study.ReferencedSOPInstanceUID == ct_out[0].StudyInstanceUID == rs.StudyInstanceUID
    assert frame.FrameOfReferenceUID == rs.FrameOfReferenceUID == ct_out[0].FrameOfReferenceUID
    assert rs.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == rs.FrameOfReferenceUID
    assert study.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"  # standard UIDs are kept
    assert rs.PatientID == ct_out[0].PatientID


def test_uids_are_keyed_hmac_2_25_and_stable(tmp_path: Path) -> None:
    first = _anonymiser(tmp_path).uid(STUDY_UID)
    again = _anonymiser(tmp_path / "other").uid(STUDY_UID)
    other_key = _anonymiser(tmp_path, key=b"another-key-0123456789").uid(STUDY_UID)
    assert first == again != other_key
    assert first.startswith("2.25.") and len(first) <= 64
    assert pydicom.uid.UID(first).is_valid


def test_dates_shift_by_one_per_patient_offset_in_range(tmp_path: Path, ct: list[Path]) -> None:
    anonymiser = _anonymiser(tmp_path, shift_days=(-400, -30))
    outs = [pydicom.dcmread(p) for p in anonymiser.anonymise_files(ct, tmp_path / "out")]
    original = dt.date(2024, 5, 17)
    shifted = {dt.datetime.strptime(d.StudyDate, "%Y%m%d").date() for d in outs}
    assert len(shifted) == 1
    delta = (shifted.pop() - original).days
    assert -400 <= delta <= -30
    assert outs[0].SeriesDate == outs[0].StudyDate == outs[0].ContentDate
    assert outs[0].AcquisitionDateTime == outs[0].StudyDate + "101733.000000"
    assert outs[0].StudyTime == "101500"  # whole-day shifts keep times of day


def test_remove_dates_option_empties_dates_and_omits_113107(tmp_path: Path, ct: list[Path]) -> None:
    anonymiser = _anonymiser(tmp_path, dates=DateMode.REMOVE)
    ds = pydicom.dcmread(anonymiser.anonymise_file(ct[0], tmp_path))
    assert ds.StudyDate == ""  # Z
    assert ds.SeriesDate == "19000101"  # X/D -> dummy
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]


def test_burned_in_annotation_series_is_refused_and_leaves_no_files(tmp_path: Path) -> None:
    ct = make_ct(tmp_path / "ct", slices=3)
    last = pydicom.dcmread(ct[-1])
    last.BurnedInAnnotation = "YES"
    last.save_as(ct[-1])
    with pytest.raises(BurnedInAnnotation):
        _anonymiser(tmp_path).anonymise_files(ct, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_map_back_stays_on_node_and_resolves_pseudonym(tmp_path: Path, ct: list[Path]) -> None:
    anonymiser = _anonymiser(tmp_path)
    anonymiser.anonymise_files(ct, tmp_path / "out")
    map_path = tmp_path / "node" / "pseudonyms.sqlite"
    assert stat.S_IMODE(map_path.stat().st_mode) == 0o600
    pseudonym = anonymiser.pseudonym(PLANTED["PatientID"])
    assert anonymiser._map.lookup(pseudonym) == [(PLANTED["PatientID"], STUDY_UID)]


def test_retain_keeps_named_attributes(tmp_path: Path, ct: list[Path]) -> None:
    rtstruct = make_rtstruct(ct, tmp_path / "rs.dcm")
    plain = pydicom.dcmread(_anonymiser(tmp_path).anonymise_file(rtstruct, tmp_path))
    assert plain.StructureSetROISequence[0].ROIName == ""
    kept = _anonymiser(tmp_path, retain=frozenset({"ROIName"})).anonymise_file(
        rtstruct, tmp_path / "kept"
    )
    assert pydicom.dcmread(kept).StructureSetROISequence[0].ROIName == "Heart"


def test_load_key_from_env_or_systemd_credential(tmp_path: Path) -> None:
    assert load_key({"IE_GATEWAY_ANON_KEY": "k" * 32}) == b"k" * 32
    (tmp_path / "anon-key").write_bytes(b"c" * 32 + b"\n")
    assert load_key({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == b"c" * 32
    with pytest.raises(SyncError, match="IE_GATEWAY_ANON_KEY"):
        load_key({})
    with pytest.raises(SyncError, match="at least 16"):
        load_key({"IE_GATEWAY_ANON_KEY": "short"})


@pytest.mark.peer
@pytest.mark.parametrize("dates", list(DateMode))
def test_anonymised_ct_still_verifies_with_dciodvfy(tmp_path: Path, dates: DateMode) -> None:
    phantom = make_phantom(5, slices=1, size=32, pixel_mm=8.0)
    (src,) = write_ct_series(phantom, tmp_path / "ct", seed=5, extra={"InstitutionName": "X"})
    out = _anonymiser(tmp_path, dates=dates).anonymise_file(src, tmp_path / "out")
    result = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert result.returncode == 0 and errors == []


def test_same_input_and_key_give_identical_bytes(tmp_path: Path, ct: list[Path]) -> None:
    """Upload skips blobs by MD5, so a re-run must reproduce every anonymised byte."""
    first = _anonymiser(tmp_path).anonymise_file(ct[0], tmp_path / "a")
    second = _anonymiser(tmp_path / "later").anonymise_file(ct[0], tmp_path / "b")
    assert first.name == second.name
    assert first.read_bytes() == second.read_bytes()
