"""SEG writer: highdicom BINARY segmentation from CT headers alone, read back mask for mask."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ie_gateway.write import (
    OutputUIDs,
    build_seg,
    new_output_uids,
    structure_mask,
    validate_seg,
)
from ie_gateway.write.seg import seg_mask, segment_color
from tests.write_case import DEMO_STRUCTURES, MODEL, Case, make_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("ct"), seed=6)


@pytest.fixture(scope="module")
def uids() -> OutputUIDs:
    return new_output_uids()


@pytest.fixture(scope="module")
def written(case: Case, uids: OutputUIDs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("out") / "seg.dcm"
    build_seg(case.headers, case.labels, DEMO_STRUCTURES, MODEL, uids).save_as(path)
    return path


@pytest.fixture(scope="module")
def seg(written: Path) -> hd.seg.Segmentation:
    return hd.seg.segread(written)


def test_headers_without_pixel_data_give_the_seg_the_full_ct_gives(case: Case, uids: OutputUIDs,
                                                                   seg: hd.seg.Segmentation) -> None:
    assert all("PixelData" not in h for h in case.headers)  # what the worker reads
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in case.paths)}
    full = [by_uid[str(h.SOPInstanceUID)] for h in case.headers]
    assert all("PixelData" in ds for ds in full)
    from_full = build_seg(full, case.labels, DEMO_STRUCTURES, MODEL, uids)
    assert from_full.PixelData == seg.PixelData
    assert from_full.NumberOfFrames == seg.NumberOfFrames


def test_round_trip_gives_the_same_mask_per_segment(seg: hd.seg.Segmentation, case: Case) -> None:
    for number, structure in enumerate(DEMO_STRUCTURES, start=1):
        assert np.array_equal(
            seg_mask(seg, case.headers, number), structure_mask(case.labels, structure)
        )


def test_external_segment_encloses_the_organs(seg: hd.seg.Segmentation, case: Case) -> None:
    body = seg_mask(seg, case.headers, 1)
    assert body[case.labels > 1].all()


def test_empty_frames_are_omitted(seg: hd.seg.Segmentation, case: Case) -> None:
    occupied = sum(
        int(structure_mask(case.labels, s).any(axis=(1, 2)).sum()) for s in DEMO_STRUCTURES
    )
    assert occupied < len(case.headers) * len(DEMO_STRUCTURES)  # the lungs end above the base
    assert seg.NumberOfFrames == occupied


def test_segments_carry_names_colours_codes_and_the_model(seg: hd.seg.Segmentation) -> None:
    for number, structure in enumerate(DEMO_STRUCTURES, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == structure.name
        assert (
            tuple(description.RecommendedDisplayCIELabValue) == segment_color(structure.color).value
        )
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("demo-thorax", "1")
        assert (
            algorithm.AlgorithmFamilyCodeSequence[0].CodeValue
            == codes.cid7162.ArtificialIntelligence.value
        )
        assert description.segmented_property_category == codes.SCT.AnatomicalStructure
    lung_l = seg.get_segment_description(2).SegmentedPropertyTypeCodeSequence[0]
    assert lung_l.CodeValue == codes.SCT.Lung.value
    assert lung_l.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == codes.SCT.Left.value
    assert seg.get_segment_description(1).segmented_property_type == codes.SCT.EntireBody
    assert seg.get_segment_description(4).segmented_property_type == codes.SCT.Heart


def test_patient_study_uids_and_series_are_as_given(
    seg: hd.seg.Segmentation, case: Case, uids: OutputUIDs
) -> None:
    ct = case.headers[0]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "FrameOfReferenceUID",
    ):
        assert seg[keyword].value == ct[keyword].value, keyword
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (uids.series_uid, uids.sop_uid)
    assert seg.SegmentationType == "BINARY"
    assert "demo-thorax" in seg.SeriesDescription and "v1" in seg.SeriesDescription
    model_version, gateway_version = seg.SoftwareVersions
    assert model_version == "demo-thorax@1"
    assert gateway_version.startswith("ie_gateway ")


def test_every_ct_instance_is_referenced(seg: hd.seg.Segmentation, case: Case) -> None:
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == case.headers[0].SeriesInstanceUID
    referenced = sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence)
    assert referenced == sorted(h.SOPInstanceUID for h in case.headers)


def test_a_rebuild_with_the_stored_uids_is_the_instance_already_written(
        case: Case, uids: OutputUIDs, seg: hd.seg.Segmentation) -> None:
    """What a worker taking over a job writes: the same instance, frame for frame."""
    again = build_seg(case.headers, case.labels, DEMO_STRUCTURES, MODEL, uids)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert again.PixelData == seg.PixelData
    other = build_seg(case.headers, case.labels, DEMO_STRUCTURES, MODEL, new_output_uids())
    assert other.SOPInstanceUID != seg.SOPInstanceUID  # the UIDs come from the caller, not the builder


@pytest.mark.peer
def test_dciodvfy_accepts_the_seg(written: Path) -> None:
    result = subprocess.run(
        ["dciodvfy", str(written)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr
    assert pydicom.dcmread(written).SOPClassUID == pydicom.uid.SegmentationStorage


def test_a_ct_without_type_2_study_attributes_still_gives_a_valid_seg(
    case: Case, tmp_path: Path
) -> None:
    headers = copy.deepcopy(case.headers)  # Dataset(h) would share h's elements with the module's case
    for h in headers:
        del h.AccessionNumber, h.ReferringPhysicianName
    uids = new_output_uids()
    path = tmp_path / "seg.dcm"
    build_seg(headers, case.labels, DEMO_STRUCTURES, MODEL, uids).save_as(path)
    validate_seg(path, headers, case.labels, DEMO_STRUCTURES, uids)
    assert pydicom.dcmread(path, stop_before_pixels=True).AccessionNumber == ""
