"""`ie-gateway commission` over five phantom cases whose true structures are the approved sets,
one of them with a Heart the "clinician" drew 30 mm off: the demo model runs through the node's
own path, the figures must equal an independent computation (SimpleITK, surface-distance), the
degraded case must fail its criterion and be pictured, the PDF must render (poppler's pdftoppm)
and the HTML open in a real browser (Debian chromium). Report files are kept as artefacts in
the test's folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.uid import generate_uid

from ie_gateway.commission.cases import read_case
from ie_gateway.commission.run import RTSTRUCT_FILE, WORK_DIR, work_name
from ie_gateway.config import AgreementSettings
from ie_gateway.demo.phantoms import HEART, make_phantom, write_ct_series
from ie_gateway.errors import CommissionError
from ie_gateway.imaging import SliceGeometry, rasterize_roi
from ie_gateway.qa import drift
from ie_gateway.qa.agreement import StructureFigures, record
from ie_gateway.store import Store
from ie_gateway.write.common import OutputUIDs
from ie_gateway.write.rtstruct import build_rtstruct
from tests.agreement_reference import reference_figures
from tests.keys import DEMO_PUB, sign
from tests.peers import REPO
from tests.web_server import chromium
from tests.write_case import DEMO_STRUCTURES, MODEL

SEEDS = (31, 32, 33, 34, 35)
DEGRADED = "case-33"
SHIFT_MM = 30.0
PIXEL_MM, SLICE_MM = 1.95, 5.0
SLICES = 28  # 140 mm: one sliding window of the demo model (48 slices of 3 mm) per case
CRITERIA = {"Heart": {"dice_min": 0.75, "hd95_max_mm": 15.0}, "Lung_L": {"dice_min": 0.8}}
KEYS = {"case", "structure", "dice", "hd95_mm", "msd_mm", "surface_dice", "volume_diff_pct", "pass"}


@dataclass
class Commissioned:
    cases: Path
    out: Path
    root: Path  # the node's storage.root
    first: subprocess.CompletedProcess[str]
    figures: list[dict[str, Any]]


def approved_set(labels: np.ndarray, ct: list[Path], path: Path) -> None:
    """The phantom's true structures as a clinician's approved set, ROI names in capitals."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
    ds = build_rtstruct(headers, labels, DEMO_STRUCTURES, MODEL, OutputUIDs(generate_uid(), generate_uid()))
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = "20261201", "101010", "PHYSICIAN^APPROVING"
    ds.Manufacturer = "TPS"
    for roi in ds.StructureSetROISequence:
        roi.ROIName = str(roi.ROIName).upper()
    ds.save_as(path, enforce_file_format=True)


def make_cases(folder: Path) -> Path:
    for seed in SEEDS:
        case = folder / f"case-{seed}"
        phantom = make_phantom(seed, slices=SLICES, size=256, pixel_mm=PIXEL_MM, slice_mm=SLICE_MM)
        ct = write_ct_series(phantom, case / "ct", seed=seed)
        labels = phantom.labels.copy()
        if case.name == DEGRADED:  # the clinician's Heart lies 30 mm to the patient's left of the true one
            heart = labels == HEART
            labels[heart] = 1  # External where the heart was
            labels[np.roll(heart, round(SHIFT_MM / PIXEL_MM), axis=2) & (labels == 1)] = HEART
        approved_set(labels, ct, case / "RS-approved")  # no .dcm: recognised by SOP class
        (case / "notes.txt").write_text("not DICOM: ignored\n")
    return folder


def model_with_criteria(models: Path) -> Path:
    """A copy of demo-thorax@3 whose model.yaml gives Heart and Lung_L commissioning criteria."""
    package = models / "demo-thorax" / "3"
    shutil.copytree(REPO / "models" / "demo-thorax" / "3", package)
    manifest = yaml.safe_load((package / "model.yaml").read_text())
    for structure in manifest["structures"]:
        if structure["name"] in CRITERIA:
            structure["commissioning"] = CRITERIA[structure["name"]]
    (package / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    sign(package)  # edited: signed again by the demo publisher the test config trusts
    return models


def commission(config: Path, cases: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "ie_gateway.cli",
        "commission",
        "--config",
        str(config),
        "--model",
        "demo-thorax@3",
        "--cases",
        str(cases),
        "--out",
        str(out),
    ]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Commissioned:
    workdir = tmp_path_factory.mktemp("commission")
    cases = make_cases(workdir / "cases")
    config = workdir / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": "var"},
                "routing_file": "routing.yaml",
                "models_dir": str(model_with_criteria(workdir / "models")),
                "trusted_keys": [{"name": "demo", "public_key": str(DEMO_PUB)}],
                "inference": {"device": "cpu", "timeout_s": 600},
            }
        )
    )
    (workdir / "routing.yaml").write_text("rules: []\n")
    out = workdir / "report"
    first = commission(config, cases, out)
    return Commissioned(cases, out, workdir / "var", first, json.loads((out / "figures.json").read_text()))


@pytest.mark.slow
def test_every_case_and_structure_has_its_figures_and_the_degraded_heart_fails(run: Commissioned) -> None:
    assert run.first.returncode == 1, run.first.stderr  # a structure fails its criteria
    assert "structures failing their criteria: Heart; cases not run: 0" in run.first.stderr
    for seed in SEEDS:
        assert f"case-{seed}: Dice External" in run.first.stderr  # progress, one line per case
    assert all(set(row) == KEYS for row in run.figures)
    assert sorted((r["case"], r["structure"]) for r in run.figures) == sorted(
        (f"case-{s}", n) for s in SEEDS for n in ("External", "Lung_L", "Lung_R", "Heart", "SpinalCord")
    )
    heart = {r["case"]: r for r in run.figures if r["structure"] == "Heart"}
    assert heart[DEGRADED]["pass"] is False and heart[DEGRADED]["dice"] < 0.75
    assert all(r["pass"] is True for case, r in heart.items() if case != DEGRADED), heart
    assert {r["pass"] for r in run.figures if r["structure"] == "SpinalCord"} == {None}  # no criteria


@pytest.mark.slow
def test_figures_equal_an_independent_computation_within_1_percent(run: Commissioned) -> None:
    for seed in SEEDS:
        case = read_case(run.cases / f"case-{seed}")
        headers = sorted(
            (pydicom.dcmread(p, stop_before_pixels=True) for p in case.ct_files),
            key=lambda h: float(h.ImagePositionPatient[2]),
        )
        geometry = SliceGeometry.from_headers(headers)
        shape = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
        ai = rois(run.out / WORK_DIR / work_name(case.name) / RTSTRUCT_FILE, geometry, shape)
        approved = rois(case.approved, geometry, shape)
        for row in (r for r in run.figures if r["case"] == case.name):
            name = row["structure"]
            ref = reference_figures(ai[name.casefold()], approved[name.casefold()], (SLICE_MM, PIXEL_MM, PIXEL_MM))
            ref["volume_diff_pct"] = 100 * (ref["volume_approved_cc"] - ref["volume_ai_cc"]) / ref["volume_ai_cc"]
            for figure in ("dice", "hd95_mm", "msd_mm", "surface_dice", "volume_diff_pct"):
                assert row[figure] == pytest.approx(ref[figure], rel=0.01, abs=1e-6), (case.name, name, figure)


def rois(path: Path, geometry: SliceGeometry, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName).casefold() for r in ds.StructureSetROISequence}
    return {names[int(c.ReferencedROINumber)]: rasterize_roi(c, geometry, shape) for c in ds.ROIContourSequence}


@pytest.mark.slow
def test_the_pdf_renders_with_poppler(run: Commissioned, tmp_path: Path) -> None:
    pdftoppm = shutil.which("pdftoppm")
    assert pdftoppm, "pdftoppm (Debian poppler-utils) is needed"
    subprocess.run([pdftoppm, "-png", "-r", "40", str(run.out / "report.pdf"), str(run.out / "page")], check=True)
    pages = sorted(run.out.glob("page-*.png"))
    assert len(pages) >= 1 + 5 + 1  # verdicts, one plot per figure, at least one picture
    for page in pages:
        pixels = np.asarray(Image.open(page).convert("L"))
        assert pixels.std() > 1, page.name  # something is drawn on every page


@pytest.mark.slow
def test_the_html_opens_in_chromium_with_verdicts_plots_and_the_degraded_case_pictured(run: Commissioned) -> None:
    from selenium.webdriver.common.by import By

    with chromium() as browser:
        browser.get((run.out / "report.html").as_uri())
        summary = {
            row.find_elements(By.TAG_NAME, "td")[0].text: row.text
            for row in browser.find_elements(By.CSS_SELECTOR, "#summary tr")[1:]
        }
        assert "FAIL" in summary["Heart"] and DEGRADED in summary["Heart"]
        assert "PASS" in summary["Lung_L"] and "no criteria" in summary["SpinalCord"]
        images = browser.find_elements(By.TAG_NAME, "img")
        assert images and all(browser.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "figure.worst figcaption")]
        assert any(c.startswith(f"{DEGRADED} · Heart") and "FAILS" in c for c in captions), captions
        identity = browser.find_element(By.ID, "identity").text
        assert "demo-thorax version 3" in identity and "fold0.pt" in identity
        assert "PHANTOM" not in browser.page_source  # the patient's name is no business of the report
        height = int(browser.execute_script("return document.documentElement.scrollHeight"))
        browser.set_window_size(1366, min(height, 8000))
        browser.save_screenshot(str(run.out / "report-screenshot.png"))


@pytest.mark.slow
def test_the_run_becomes_the_versions_drift_baseline(run: Commissioned) -> None:
    baselines = json.loads((run.root / drift.COMMISSIONED_FILE).read_text())
    heart = sorted(r["dice"] for r in run.figures if r["structure"] == "Heart")
    assert baselines["demo-thorax@3"]["dice"]["Heart"] == pytest.approx(heart[2])
    assert baselines["demo-thorax@3"]["cases"] == len(SEEDS)
    # live cases then compare with it: one case is enough for a declared baseline
    store = Store(run.root)
    record(store.index, 1, 2, {("demo-thorax", "3"): [StructureFigures("Heart", 0.5, 9.0, 3.0, 0.4, 600, 500)]}, 2.0)
    [state] = drift.current(
        store.index, AgreementSettings(window=1), REPO / "models", run.root / drift.COMMISSIONED_FILE
    )
    assert (state.baseline, state.baseline_from, state.alarm) == (pytest.approx(heart[2]), "commissioning", True)


@pytest.mark.slow
def test_a_rerun_skips_the_cases_done_and_runs_the_rest(run: Commissioned) -> None:
    progress = json.loads((run.out / "progress.json").read_text())
    del progress["cases"]["case-35"]
    (run.out / "progress.json").write_text(json.dumps(progress))
    again = commission(run.out.parent / "gateway.yaml", run.cases, run.out)
    assert again.returncode == 1
    assert again.stderr.count("done in an earlier run, skipped") == 4
    assert "case 5/5 case-35: Dice External" in again.stderr
    figures = json.loads((run.out / "figures.json").read_text())
    assert len(figures) == len(run.figures)
    assert [r for r in figures if r["case"] != "case-35"] == [r for r in run.figures if r["case"] != "case-35"]


def test_a_case_folder_needs_exactly_one_approved_set_found_by_sop_class(tmp_path: Path) -> None:
    phantom = make_phantom(3, slices=8, size=32, pixel_mm=10.0, slice_mm=5.0)
    ct = write_ct_series(phantom, tmp_path / "a", seed=3)
    with pytest.raises(CommissionError, match="exactly one approved RT Structure Set, found 0"):
        read_case(tmp_path / "a")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
    draft = build_rtstruct(headers, phantom.labels, DEMO_STRUCTURES, MODEL, OutputUIDs(generate_uid(), generate_uid()))
    draft.save_as(tmp_path / "a" / "draft", enforce_file_format=True)  # UNAPPROVED, as the node writes it
    with pytest.raises(CommissionError, match=r"found 0 approved RT Structure Sets \(1 not approved\)"):
        read_case(tmp_path / "a")
    approved_set(phantom.labels, ct, tmp_path / "a" / "x.bin")
    case = read_case(tmp_path / "a")
    assert (case.name, case.approved.name, len(case.ct_files)) == ("a", "x.bin", 8)
