"""The clinical QA loop with real peers: storescu sends a CT, the node contours it with the demo
model and delivers to Orthanc (the TPS); the TPS sends back a clinician's approved version in
which Lung_L is eroded by 3 mm and every other structure is left as the AI made it. The node's
agreement figures must match those computed here from the same masks with other libraries.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from scipy import ndimage

from ie_gateway.write.common import ModelInfo, OutputUIDs, SliceGeometry, StructureInfo
from ie_gateway.write.rtstruct import build_rtstruct
from ie_gateway.write.validate import rasterize_roi
from tests.agreement_reference import reference_figures
from tests.peers import REPO, Node, Orthanc, storescu, wait_until

pytestmark = [pytest.mark.peer, pytest.mark.slow]

ERODE_MM = 3.0
RULES = {"rules": [{"name": "thorax", "match": {"Modality": "CT"}, "model": "demo-thorax",
                    "outputs": ["rtstruct"], "send_to": ["TPS"]}]}


@dataclass
class Case:
    node: Node
    tps: Orthanc
    ct_job: dict[str, Any]
    rt_job: dict[str, Any]
    ai: pydicom.Dataset
    approved: pydicom.Dataset
    ct_headers: list[pydicom.Dataset]
    workdir: Path


def _ai_rtstruct_at_tps(tps: Orthanc, path: Path) -> pydicom.Dataset:
    [instance] = tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}})
    path.write_bytes(tps.get_bytes(f"/instances/{instance}/file"))
    return pydicom.dcmread(path)


def clinicians_version(ai: pydicom.Dataset, ct_headers: list[pydicom.Dataset], path: Path) -> pydicom.Dataset:
    """The AI's structure set as a clinician approves it: Lung_L eroded by 3 mm (redrawn), the
    rest untouched, names in the TPS's capitals, approved, in a new series."""
    geometry = SliceGeometry.from_headers(ct_headers)
    shape = (len(ct_headers), int(ct_headers[0].Rows), int(ct_headers[0].Columns))
    spacing = spacing_of(ct_headers)
    numbers = {str(r.ROIName): int(r.ROINumber) for r in ai.StructureSetROISequence}
    contours = {int(c.ReferencedROINumber): c for c in ai.ROIContourSequence}
    lung = rasterize_roi(contours[numbers["Lung_L"]], geometry, shape)
    smaller = ndimage.distance_transform_edt(lung, sampling=spacing) > ERODE_MM
    redrawn = build_rtstruct(ct_headers, smaller.astype(np.uint8) * numbers["Lung_L"],
                             [StructureInfo(numbers["Lung_L"], "Lung_L", (0, 128, 255), "ORGAN")],
                             ModelInfo("tps-edit", "1"), OutputUIDs(generate_uid(), generate_uid()))
    ds = copy.deepcopy(ai)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Manufacturer = "TPS"
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = "20261201", "101010", "PHYSICIAN^APPROVING"
    for roi in ds.StructureSetROISequence:
        roi.ROIName = str(roi.ROIName).upper()  # the TPS's spelling: matched ignoring case
    for item in ds.ROIContourSequence:
        if int(item.ReferencedROINumber) == numbers["Lung_L"]:
            item.ContourSequence = redrawn.ROIContourSequence[0].ContourSequence
    ds.save_as(path, enforce_file_format=True)
    return ds


def spacing_of(headers: list[pydicom.Dataset]) -> tuple[float, float, float]:
    """(z, y, x) mm of an axial series in slice order."""
    dz = abs(float(headers[1].ImagePositionPatient[2]) - float(headers[0].ImagePositionPatient[2]))
    return dz, float(headers[0].PixelSpacing[0]), float(headers[0].PixelSpacing[1])


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, small_series: list[Path]) -> Iterator[Case]:
    workdir = tmp_path_factory.mktemp("qa-loop")
    tps = Orthanc(workdir / "tps").start()
    node = Node(workdir / "node", rules=RULES, settings={
        "models_dir": str(REPO / "models"),
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
        "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
        "inference": {"device": "cpu", "timeout_s": 600},
    })
    try:
        node.start()
        assert storescu(node.port, small_series).returncode == 0
        [ct_job] = node.wait_state({"delivered", "failed", "refused"}, timeout=600)
        assert ct_job["state"] == "delivered", ct_job
        headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in small_series),
                         key=lambda h: float(h.ImagePositionPatient[2]))
        ai = _ai_rtstruct_at_tps(tps, workdir / "ai.dcm")
        approved = clinicians_version(ai, headers, workdir / "approved.dcm")
        assert storescu(node.port, [workdir / "approved.dcm"], calling="TPS").returncode == 0

        def linked() -> dict[str, Any] | None:
            rows = [r for r in node.status() if r.get("linked_to") == ct_job["id"]]
            return rows[0] if rows and rows[0]["state"] in {"unrouted", "failed"} else None
        rt_job = wait_until(linked, 300, every=0.5, what="the approved set to be linked and assessed")
        yield Case(node, tps, ct_job, rt_job, ai, approved, headers, workdir)
    finally:
        node.stop()
        tps.stop()


def _masks(ds: pydicom.Dataset, headers: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    geometry = SliceGeometry.from_headers(headers)
    shape = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    return {names[int(c.ReferencedROINumber)].casefold(): rasterize_roi(c, geometry, shape)
            for c in ds.ROIContourSequence}


def node_figures(case: Case) -> dict[str, dict[str, Any]]:
    rows = json.loads(case.node.cli("agreement", "--json").stdout)
    return {r["structure"]: r for r in rows}


def test_the_approved_set_is_linked_and_its_figures_stored(case: Case) -> None:
    assert case.rt_job["state"] == "unrouted"
    assert "agreement figures of 5 structures" in case.rt_job["reason"], case.rt_job
    figures = node_figures(case)
    assert sorted(figures) == ["External", "Heart", "Lung_L", "Lung_R", "SpinalCord"]
    assert {(r["model"], r["version"], r["cases"]) for r in figures.values()} == {("demo-thorax", "2", 1)}


def test_eroded_lung_and_untouched_heart_match_independent_figures_within_1_percent(case: Case) -> None:
    ai, approved = _masks(case.ai, case.ct_headers), _masks(case.approved, case.ct_headers)
    spacing = spacing_of(case.ct_headers)
    figures = node_figures(case)
    for structure in ("Lung_L", "Heart"):
        ref = reference_figures(ai[structure.casefold()], approved[structure.casefold()], spacing)
        ref["volume_diff_pct"] = 100 * (ref["volume_approved_cc"] - ref["volume_ai_cc"]) / ref["volume_ai_cc"]
        for figure in ("dice", "hd95_mm", "msd_mm", "surface_dice", "volume_diff_pct"):
            got = figures[structure][figure]["median"]
            assert got == pytest.approx(ref[figure], rel=0.01, abs=1e-9), (structure, figure, got, ref[figure])
    lung, heart = figures["Lung_L"], figures["Heart"]
    assert lung["dice"]["median"] < 0.97 and lung["hd95_mm"]["median"] >= 2.0
    assert lung["volume_diff_pct"]["median"] < -3
    assert (heart["dice"]["median"], heart["hd95_mm"]["median"], heart["surface_dice"]["median"]) == (1.0, 0.0, 1.0)


def test_agreement_command_prints_a_table_per_version_and_structure(case: Case) -> None:
    out = case.node.cli("agreement", "--structure", "lung_l").stdout
    [line] = [line for line in out.splitlines() if line.startswith("demo-thorax@2")]
    assert "Lung_L" in line and " 1 " in line
    assert "Heart" not in out
