"""AI-result metadata (IHE AI Results) in every output, and the LABELMAP SEG (Supplement 243).

Each output says which model (name@version) made it and on which node: contributing equipment,
software versions, the RT-STRUCT's ROI generation algorithm and the SEG's algorithm
identification. Read back with pydicom and highdicom, checked with dciodvfy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless

from ie_gateway.store.records import LABEL_MAP_SEGMENTATION_STORAGE
from ie_gateway.vocab import SegEncoding
from ie_gateway.write import (
    ModelInfo,
    OutputUIDs,
    build_rtstruct,
    build_seg,
    new_output_uids,
    structure_mask,
    validate_seg,
)
from ie_gateway.write.seg import seg_mask, segment_numbers
from tests.write_case import DEMO_STRUCTURES, Case, make_case

MODEL = ModelInfo(name="demo-thorax", version="3", node="IE_GATEWAY_RT")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("ct"), seed=8, slices=40)


@pytest.fixture(scope="module")
def written(case: Case, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three outputs of one case: RT-STRUCT, BINARY SEG, LABELMAP SEG."""
    out = tmp_path_factory.mktemp("out")
    paths = {"rtstruct": out / "rt.dcm", "binary": out / "binary.dcm", "labelmap": out / "labelmap.dcm"}
    ds = build_rtstruct(case.headers, case.labels, DEMO_STRUCTURES, MODEL, new_output_uids())
    ds.save_as(paths["rtstruct"], enforce_file_format=True)
    for encoding in SegEncoding:
        seg = build_seg(case.headers, case.labels, DEMO_STRUCTURES, MODEL, new_output_uids(), encoding=encoding)
        seg.save_as(paths[encoding])
    return paths


def _our_equipment(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The contributing equipment item that names the model (the SEG also names the CT's scanner
    and highdicom)."""
    [item] = [e for e in ds.ContributingEquipmentSequence if "demo-thorax" in e.get("ManufacturerModelName", "")]
    return item


@pytest.mark.parametrize("kind", ["rtstruct", "binary", "labelmap"])
def test_contributing_equipment_names_the_model_and_the_node(written: dict[str, Path], kind: str) -> None:
    ds = pydicom.dcmread(written[kind])
    item = _our_equipment(ds)
    assert item.ManufacturerModelName == "demo-thorax@3"
    assert item.StationName == "IE_GATEWAY_RT"
    assert item.SoftwareVersions[0] == "demo-thorax@3"
    assert item.SoftwareVersions[1].startswith("ie_gateway ")
    [purpose] = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", "109102")  # Processing Equipment
    assert "demo-thorax@3" in item.ContributionDescription
    assert "ContributionDateTime" in item
    assert ds.SoftwareVersions[0] == "demo-thorax@3"


def test_rtstruct_rois_are_automatic_and_name_the_model(written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["rtstruct"])
    for roi in ds.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription == "AI model demo-thorax@3"
        [algorithm] = roi.ROIDerivationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("demo-thorax", "3")
        [family] = algorithm.AlgorithmFamilyCodeSequence
        assert hd.sr.CodedConcept.from_dataset(family) == codes.cid7162.ArtificialIntelligence
    assert {o.ReferencedROINumber for o in ds.RTROIObservationsSequence} == {s.label for s in DEMO_STRUCTURES}


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_every_segment_identifies_the_algorithm(written: dict[str, Path], kind: str) -> None:
    seg = hd.seg.segread(written[kind])
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert (algorithm[0].AlgorithmName, algorithm[0].AlgorithmVersion) == ("demo-thorax", "3")


def test_labelmap_seg_reads_back_as_the_painted_label_map(written: dict[str, Path], case: Case) -> None:
    seg = hd.seg.segread(written["labelmap"])
    assert seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert seg.SegmentationType == "LABELMAP"
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    numbers = segment_numbers(case.labels, DEMO_STRUCTURES, None)
    for number in range(1, len(DEMO_STRUCTURES) + 1):
        assert np.array_equal(seg_mask(seg, case.headers, number), numbers == number)


def test_labelmap_keeps_the_organs_and_gives_the_external_the_rest_of_the_body(case: Case) -> None:
    numbers = segment_numbers(case.labels, DEMO_STRUCTURES, None)
    external, organs = DEMO_STRUCTURES[0], DEMO_STRUCTURES[1:]
    assert external.interpreted_type == "EXTERNAL"
    for number, organ in enumerate(organs, start=2):
        assert np.array_equal(numbers == number, case.labels == organ.label)
    in_organs = np.isin(case.labels, [o.label for o in organs])
    assert np.array_equal(numbers == 1, structure_mask(case.labels, external) & ~in_organs)


def test_labelmap_seg_passes_the_node_validation(written: dict[str, Path], case: Case) -> None:
    ds = pydicom.dcmread(written["labelmap"])
    uids = OutputUIDs(ds.SeriesInstanceUID, ds.SOPInstanceUID)
    validate_seg(written["labelmap"], case.headers, case.labels, DEMO_STRUCTURES, uids)


def test_labelmap_seg_is_a_fraction_of_the_binary_seg(written: dict[str, Path]) -> None:
    binary, labelmap = written["binary"].stat().st_size, written["labelmap"].stat().st_size
    assert labelmap * 5 < binary, (labelmap, binary)


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["rtstruct", "binary"])
def test_dciodvfy_accepts_the_ai_metadata(written: dict[str, Path], kind: str) -> None:
    result = subprocess.run(["dciodvfy", str(written[kind])], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr, result.stderr
