"""Agreement figures (ie_gateway.qa.agreement) and drift alarms (ie_gateway.qa.drift), on masks and a
real index; the whole loop through the node is in test_qa_loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ie_gateway.config import AgreementSettings
from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.imaging import SliceGeometry
from ie_gateway.qa import agreement, drift
from ie_gateway.qa.agreement import StructureFigures, match_structures, measure
from ie_gateway.store import Store
from ie_gateway.write import build_rtstruct, new_output_uids
from tests.agreement_reference import reference_figures
from tests.write_case import DEMO_STRUCTURES, MODEL, make_case

SPACING = (5.0, 1.95, 1.95)


@pytest.fixture(scope="module")
def phantom_labels() -> np.ndarray:
    return make_phantom(12, slices=30, size=256, pixel_mm=SPACING[1], slice_mm=SPACING[0]).labels


def eroded(mask: np.ndarray, mm: float) -> np.ndarray:
    """``mask`` less everything within ``mm`` of its outside, in mm on the anisotropic grid."""
    return ndimage.distance_transform_edt(mask, sampling=SPACING) > mm  # type: ignore[no-any-return]


@pytest.mark.parametrize(("label", "mm"), [(2, 3.0), (3, 2.0), (4, 5.0)])
def test_figures_of_an_eroded_structure_match_a_second_library_within_1_percent(
        phantom_labels: np.ndarray, label: int, mm: float) -> None:
    ai = phantom_labels == label
    approved = eroded(ai, mm)
    node = measure(ai, approved, SPACING, "s", tolerance_mm=2.0)
    ref = reference_figures(ai, approved, SPACING, tolerance_mm=2.0)
    for key, expected in ref.items():
        assert getattr(node, key) == pytest.approx(expected, rel=0.01), key
    assert node.dice < 0.99 and node.hd95_mm is not None and node.hd95_mm >= SPACING[1]
    assert node.volume_diff_pct is not None and node.volume_diff_pct < 0


def test_unchanged_structure_scores_perfectly(phantom_labels: np.ndarray) -> None:
    heart = phantom_labels == 4
    f = measure(heart, heart.copy(), SPACING, "Heart")
    assert (f.dice, f.hd95_mm, f.msd_mm, f.surface_dice, f.volume_diff_pct) == (1.0, 0.0, 0.0, 1.0, 0.0)


def test_deleted_structure_scores_zero_without_distances(phantom_labels: np.ndarray) -> None:
    heart = phantom_labels == 4
    f = measure(heart, np.zeros_like(heart), SPACING, "Heart")
    assert (f.dice, f.hd95_mm, f.msd_mm, f.surface_dice, f.volume_diff_pct) == (0.0, None, None, 0.0, -100.0)


def test_structures_match_by_name_ignoring_case_or_by_a_site_alias() -> None:
    approved = {1: "EXTERNAL", 2: " lung_l ", 3: "LUNG RT", 7: "Heart", 8: "heart", 9: "PTV"}
    matched = match_structures(["External", "Lung_L", "Lung_R", "Heart", "SpinalCord"], approved,
                               aliases={"Lung_R": ["Lung RT"]})
    assert matched == {"External": 1, "Lung_L": 2, "Lung_R": 3, "Heart": 7}


def _figures(name: str, dice: float) -> StructureFigures:
    return StructureFigures(name, dice, 1.0, 0.5, 0.9, 100.0, 100.0 * dice)


def test_a_revised_approval_replaces_its_predecessors_figures(tmp_path: Path) -> None:
    index = Store(tmp_path).index
    agreement.record(index, 1, 10, {("m", "1"): [_figures("Heart", 0.7), _figures("Lung_L", 0.8)]}, 2.0, at=100)
    agreement.record(index, 2, 11, {("m", "1"): [_figures("Heart", 0.9)]}, 2.0, at=200)
    agreement.record(index, 1, 12, {("m", "1"): [_figures("Heart", 0.95)]}, 2.0, at=300)
    rows = agreement.rows(index)
    assert [(r["ct_job"], r["approval_job"], r["structure"], r["dice"]) for r in rows] == [
        (2, 11, "Heart", 0.9), (1, 12, "Heart", 0.95)]
    assert [r["ct_job"] for r in agreement.rows(index, structure="heart", since=250)] == [1]
    assert agreement.rows(index, model="m@2") == []


def test_summary_gives_n_median_and_iqr_per_version_and_structure(tmp_path: Path) -> None:
    index = Store(tmp_path).index
    for case, dice in enumerate([0.80, 0.90, 0.85, 0.95, 1.0], start=1):
        agreement.record(index, case, 100 + case, {("m", "2"): [_figures("Heart", dice)]}, 2.0, at=case)
    agreement.record(index, 9, 109, {("m", "1"): [_figures("Heart", 0.5)]}, 2.0, at=9)
    [v1, v2] = agreement.summary(agreement.rows(index))
    assert (v1["version"], v1["cases"], v1["dice"]["median"]) == ("1", 1, 0.5)
    assert (v2["version"], v2["cases"]) == ("2", 5)
    assert v2["dice"] == {"n": 5, "median": 0.9, "q1": 0.85, "q3": 0.95}
    assert v2["hd95_mm"]["median"] == 1.0


SETTINGS = AgreementSettings(window=5, margin=0.05)


def _series(tmp_path: Path, dice: list[float]) -> Store:
    store = Store(tmp_path)
    for case, value in enumerate(dice, start=1):
        agreement.record(store.index, case, 1000 + case,
                         {("demo", "2"): [_figures("Heart", value), _figures("Lung_L", 0.97)]}, 2.0, at=case)
    return store


def test_degraded_approvals_raise_the_drift_alarm_for_that_structure_only(tmp_path: Path) -> None:
    store = _series(tmp_path, [0.95, 0.94, 0.96, 0.95, 0.93] + [0.80, 0.82, 0.85, 0.79, 0.90])
    heart, lung = drift.states(store.index, SETTINGS)
    assert (heart.structure, heart.alarm, heart.baseline, heart.recent) == ("Heart", True, 0.95, 0.82)
    assert heart.baseline_from == "first 5 cases"
    assert (lung.structure, lung.alarm) == ("Lung_L", False)
    assert "DRIFT" in heart.message() and "Heart" in heart.message()


def test_good_approvals_raise_no_alarm(tmp_path: Path) -> None:
    store = _series(tmp_path, [0.95, 0.94, 0.96, 0.95, 0.93] + [0.93, 0.96, 0.92, 0.94, 0.95])
    assert not any(s.alarm for s in drift.states(store.index, SETTINGS))


def test_too_few_cases_for_two_windows_raise_no_alarm(tmp_path: Path) -> None:
    store = _series(tmp_path, [0.95, 0.94, 0.96, 0.95, 0.93, 0.5, 0.5, 0.5, 0.5])
    heart = drift.states(store.index, SETTINGS)[0]
    assert (heart.alarm, heart.recent) == (False, None)
    assert "too few" in heart.message()


def test_baseline_from_model_yaml_needs_only_one_window(tmp_path: Path) -> None:
    store = _series(tmp_path, [0.90, 0.91, 0.89, 0.90, 0.92])
    heart = drift.states(store.index, SETTINGS, baselines={("demo", "2", "Heart"): 0.97})[0]
    assert (heart.alarm, heart.baseline, heart.baseline_from, heart.recent) == (True, 0.97, "model.yaml", 0.90)


def test_an_approved_structure_left_without_contours_scores_zero(tmp_path: Path) -> None:
    """A clinician who rejects a structure often empties it rather than deleting it: the
    planning system then sends its ROI with no ContourSequence. It is compared as an empty
    structure, not refused (rasterising it used to raise ValueError and stop the assessment)."""
    case = make_case(tmp_path / "ct")
    heart = next(s for s in DEMO_STRUCTURES if s.name == "Heart")
    emptied = np.where(case.labels == heart.label, 0, case.labels).astype(np.uint8)
    approved = build_rtstruct(case.headers, emptied, DEMO_STRUCTURES, MODEL, new_output_uids())
    roi = next(r for r in approved.ROIContourSequence if int(r.ReferencedROINumber) == heart.label)
    assert "ContourSequence" not in roi  # the emptied structure, as a planning system sends it
    ai = tmp_path / "labels.mha"
    sitk.WriteImage(sitk.GetImageFromArray(case.labels.astype(np.uint8)), str(ai))
    route = agreement.ModelContours("demo-thorax", "1", list(DEMO_STRUCTURES), None, ai)
    figures = {f.structure: f for f in agreement.assess(approved, SliceGeometry.from_headers(case.headers), [route])[
        ("demo-thorax", "1")]}
    assert (figures["Heart"].dice, figures["Heart"].hd95_mm, figures["Heart"].volume_diff_pct) == (0.0, None, -100.0)
    assert figures["Lung_L"].dice > 0.98  # the rest compared as before
