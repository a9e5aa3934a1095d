"""The plausibility gate on the shipped demo model's expectations, and ROI name files.

The phantom's own label map is a sane result: it must pass. Deliberately wrong ones (sides
swapped, the cord cut to a fifth, the heart moved out of the body) must fail, each with a
reason that names the structure and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from ie_gateway.config import Destination
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.errors import ConfigError
from ie_gateway.imaging import SliceGeometry, StructureInfo, structure_mask
from ie_gateway.infer.manifest import Manifest, load_manifest
from ie_gateway.pipeline import structures_of
from ie_gateway.qa.agreement import match_structures
from ie_gateway.qa.plausibility import Findings, check_result
from ie_gateway.roinames import load_roi_names, site_aliases

REPO = Path(__file__).resolve().parent.parent
EXTERNAL, LUNG_L, LUNG_R, HEART, CORD = 1, 2, 3, 4, 5


@pytest.fixture(scope="module")
def demo() -> Manifest:
    return load_manifest(REPO / "models" / "demo-thorax" / "3")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, SliceGeometry]:
    """A held-out phantom's labels on a 100 x 256² grid covering the usual 50 cm, and its geometry."""
    ph = make_phantom(10003, slices=100, size=256, pixel_mm=1.95, slice_mm=5.0)
    paths = write_ct_series(ph, tmp_path_factory.mktemp("ct"), seed=10003)
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in paths),
                     key=lambda h: float(h.ImagePositionPatient[2]))
    return ph.labels, SliceGeometry.from_headers(headers)


def judge(manifest: Manifest, labels: np.ndarray, geometry: SliceGeometry) -> Findings:
    masks = {s.label: structure_mask(labels, s) for s in structures_of(manifest)}
    return check_result(manifest.structures, masks, geometry)


def test_a_sane_result_passes_every_expectation_of_the_demo_model(
        demo: Manifest, phantom: tuple[np.ndarray, SliceGeometry]) -> None:
    labels, geometry = phantom
    findings = judge(demo, labels, geometry)
    assert findings.reasons == []
    assert findings.empty == []


def test_volumes_are_as_contoured_so_the_external_includes_the_organs_inside_it(
        demo: Manifest, phantom: tuple[np.ndarray, SliceGeometry]) -> None:
    labels, geometry = phantom
    volumes = judge(demo, labels, geometry).volumes_cc
    voxel_cc = 1.95 * 1.95 * 5.0 / 1000
    assert volumes["External"] > (labels == EXTERNAL).sum() * voxel_cc + volumes["Heart"]
    assert volumes["Heart"] == pytest.approx((labels == HEART).sum() * voxel_cc, abs=0.1)


def test_left_and_right_swapped_fail_the_side_checks(
        demo: Manifest, phantom: tuple[np.ndarray, SliceGeometry]) -> None:
    labels, geometry = phantom
    reasons = judge(demo, labels[:, :, ::-1].copy(), geometry).reasons
    assert any(r.startswith("Lung_L: centre") and r.endswith("(expected left)") for r in reasons)
    assert any(r.startswith("Lung_R: centre") and r.endswith("(expected right)") for r in reasons)
    assert any(r.startswith("Heart: centre") for r in reasons)


def test_a_cord_a_fifth_of_its_length_fails_coverage_and_volume_per_cm(
        demo: Manifest, phantom: tuple[np.ndarray, SliceGeometry]) -> None:
    labels, geometry = phantom
    cut = labels.copy()
    cut[20:][cut[20:] == CORD] = EXTERNAL
    reasons = judge(demo, cut, geometry).reasons
    assert any(r.startswith("SpinalCord: on 20% of the slices") for r in reasons), reasons
    assert any(r.startswith("SpinalCord:") and "cc per cm of scan" in r for r in reasons), reasons


def test_a_heart_outside_the_body_fails_inside_external(
        demo: Manifest, phantom: tuple[np.ndarray, SliceGeometry]) -> None:
    labels, geometry = phantom
    moved = labels.copy()
    heart = moved == HEART
    moved[heart] = EXTERNAL
    moved[np.roll(heart, 120, axis=1)] = HEART  # 23 cm towards the table: into the air
    reasons = judge(demo, moved, geometry).reasons
    assert any(r.startswith("Heart:") and "inside External (expected >= 95%)" in r for r in reasons), reasons


def test_an_empty_structure_is_reported_and_fails_its_expectations(
        demo: Manifest, phantom: tuple[np.ndarray, SliceGeometry]) -> None:
    labels, geometry = phantom
    findings = judge(demo, np.where(labels == HEART, EXTERNAL, labels).astype(np.uint8), geometry)
    assert findings.empty == ["Heart"]
    assert "Heart: empty" in findings.reasons


def test_names_file_renames_recolours_and_leaves_out(tmp_path: Path) -> None:
    path = tmp_path / "names.yaml"
    path.write_text("rois:\n  Lung_L: {name: LUNG_LT, color: [1, 2, 3]}\n  Heart: {send: false}\n"
                    "unlisted: drop\n")
    structures = [StructureInfo(2, "Lung_L", (0, 128, 255), "ORGAN"), StructureInfo(4, "Heart", (255, 0, 0), "ORGAN"),
                  StructureInfo(5, "SpinalCord", (255, 255, 0), "ORGAN")]
    out = load_roi_names(path).apply(structures)
    assert [(s.label, s.name, s.color) for s in out] == [(2, "LUNG_LT", (1, 2, 3))]


def test_names_file_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "names.yaml"
    path.write_text("rois:\n  Lung_L: {name: LUNG_LT}\n  Heart: {colour: [1, 2, 3]}\n")
    with pytest.raises(ConfigError) as caught:
        load_roi_names(path, 16)
    assert f"{path}:3: rois.Heart.colour: unknown key" in caught.value.errors[0]
    path.write_text("rois:\n  Lung_L: {name: LUNG_LT}\n  Lung_R: {name: LUNG_LT}\n")
    with pytest.raises(ConfigError, match="several structures would arrive as LUNG_LT"):
        load_roi_names(path, 16)


def test_site_names_become_aliases_for_matching_an_approved_set(tmp_path: Path) -> None:
    """A clinician's approved set comes back under the department's names; agreement matches it
    with the model's structures through the names files of the job's destinations."""
    (tmp_path / "tps-names.yaml").write_text("rois:\n  Lung_L: {name: LUNG_LT}\n  Heart: {send: false}\n")
    (tmp_path / "pacs-names.yaml").write_text("rois:\n  Lung_L: {name: L_LUNG}\n")
    destinations = {
        "TPS": Destination(ae_title="TPS", host="127.0.0.1", port=104, names=tmp_path / "tps-names.yaml"),
        "PACS": Destination(ae_title="PACS", host="127.0.0.1", port=105, names=tmp_path / "pacs-names.yaml"),
        "PLAIN": Destination(ae_title="PLAIN", host="127.0.0.1", port=106),
    }
    aliases = site_aliases(destinations, ["TPS", "PLAIN", "PACS", "TPS"])
    assert aliases == {"Lung_L": ["LUNG_LT", "L_LUNG"]}
    approved = {1: "external", 2: "l_lung", 3: "Heart"}
    assert match_structures(["External", "Lung_L", "Heart", "SpinalCord"], approved, aliases) == {
        "External": 1, "Lung_L": 2, "Heart": 3}
