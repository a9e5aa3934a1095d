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

from ie_gateway.imaging import SliceGeometry, StructureInfo, rasterize_roi
from ie_gateway.qa import agreement
from ie_gateway.qa.agreement import StructureFigures
from ie_gateway.store import Store
from ie_gateway.write.common import ModelInfo, OutputUIDs
from ie_gateway.write.rtstruct import build_rtstruct
from tests.agreement_reference import reference_figures
from tests.peers import REPO, Node, Orthanc, storescu, wait_until
from tests.web_server import admin_page, chromium, loaded, page_text, signed_in

pytestmark = [pytest.mark.peer, pytest.mark.slow]

ERODE_MM = 3.0
TOKEN = "test-admin-token-5f2c"
WINDOW = 2
#: an older version's Heart: two good approvals, then two that clinicians had to redraw
OLD_VERSION_DICE = (0.96, 0.95, 0.78, 0.80)
RULES = {"rules": [{"name": "thorax", "match": {"Modality": "CT"}, "model": "demo-thorax",
                    "outputs": ["rtstruct"], "send_to": ["TPS"]}]}


@dataclass
class Case:
    node: Node
    tps: Orthanc
    ct_job: dict[str, Any]
    draft_job: dict[str, Any]
    rt_job: dict[str, Any]
    ai: pydicom.Dataset
    approved: pydicom.Dataset
    ct_headers: list[pydicom.Dataset]
    workdir: Path


def _ai_rtstruct_at_tps(tps: Orthanc, path: Path) -> pydicom.Dataset:
    [instance] = tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}})
    path.write_bytes(tps.get_bytes(f"/instances/{instance}/file"))
    return pydicom.dcmread(path)


def clinicians_version(ai: pydicom.Dataset, ct_headers: list[pydicom.Dataset], path: Path,
                       approval: str = "APPROVED") -> pydicom.Dataset:
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
    ds.ApprovalStatus = approval
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
        "agreement": {"window": WINDOW, "margin": 0.05},
        "approvals": {"accept_from": ["TPS"]},
    })
    try:
        node.start()
        assert storescu(node.port, small_series).returncode == 0
        [ct_job] = node.wait_state({"delivered", "failed", "refused"}, timeout=600)
        assert ct_job["state"] == "delivered", ct_job
        headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in small_series),
                         key=lambda h: float(h.ImagePositionPatient[2]))
        ai = _ai_rtstruct_at_tps(tps, workdir / "ai.dcm")

        def linked(known: int) -> dict[str, Any] | None:
            rows = [r for r in node.jobs() if r.get("linked_to") == ct_job["id"]]
            return rows[-1] if len(rows) > known and rows[-1]["state"] in {"unrouted", "failed"} else None
        clinicians_version(ai, headers, workdir / "draft.dcm", approval="UNAPPROVED")
        assert storescu(node.port, [workdir / "draft.dcm"], calling="TPS").returncode == 0
        draft_job = wait_until(lambda: linked(0), 120, every=0.5, what="the draft to be linked")
        approved = clinicians_version(ai, headers, workdir / "approved.dcm")
        assert storescu(node.port, [workdir / "approved.dcm"], calling="TPS").returncode == 0
        rt_job = wait_until(lambda: linked(1), 300, every=0.5, what="the approved set to be linked and assessed")
        index = Store(node.root).index
        for case_no, dice in enumerate(OLD_VERSION_DICE, start=1):  # figures of an older version's cases
            agreement.record(index, 900 + case_no, 950 + case_no, {("old-thorax", "1"): [
                StructureFigures("Heart", dice, 4.0, 1.0, 0.8, 600.0, 600.0 * dice)]}, 2.0, at=1.7e9 + case_no)
        yield Case(node, tps, ct_job, draft_job, rt_job, ai, approved, headers, workdir)
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
    rows = json.loads(case.node.cli("agreement", "--model", "demo-thorax@3", "--json").stdout)
    return {r["structure"]: r for r in rows}


def test_the_approved_set_is_linked_and_its_figures_stored_but_a_draft_gets_none(case: Case) -> None:
    assert case.draft_job["state"] == "unrouted" and "agreement" not in case.draft_job["reason"]
    assert case.rt_job["state"] == "unrouted"
    assert "agreement figures of 5 structures" in case.rt_job["reason"], case.rt_job
    stored = agreement.rows(Store(case.node.root).index, model="demo-thorax@3")
    assert {(r["ct_job"], r["approval_job"]) for r in stored} == {(case.ct_job["id"], case.rt_job["id"])}
    figures = node_figures(case)
    assert sorted(figures) == ["External", "Heart", "Lung_L", "Lung_R", "SpinalCord"]
    assert {(r["model"], r["version"], r["cases"]) for r in figures.values()} == {("demo-thorax", "3", 1)}


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
    [line] = [line for line in out.splitlines() if line.startswith("demo-thorax@3")]
    assert "Lung_L" in line and " 1 " in line
    assert "Heart" not in out


def test_drift_of_a_version_shows_in_status_and_agreement(case: Case) -> None:
    status = case.node.cli("status")
    assert "DRIFT: old-thorax@1 Heart" in status.stderr
    assert "demo-thorax" not in status.stderr  # one case per structure: no alarm
    out = case.node.cli("agreement").stdout
    assert "DRIFT: old-thorax@1 Heart: median Dice of the last cases 0.790, baseline 0.955" in out


# --- the admin's page in a real browser ---------------------------------------------------------

@pytest.fixture(scope="module")
def page(case: Case) -> Iterator[str]:
    with admin_page(case.node.config, TOKEN) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    """The whole page as a PNG artefact beside the test's files."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1366, max(768, height))
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1366, 900)
    return path


def test_jobs_list_shows_every_job_and_filters_by_state(case: Case, page: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{page}/jobs")
    rows = browser.find_elements(By.CSS_SELECTOR, "table tr td:first-child a")
    jobs = {j["id"] for j in case.node.jobs()}  # the sets the tests below send too, when they ran first
    assert {r.text for r in rows} == {str(j) for j in jobs}
    assert {case.ct_job["id"], case.draft_job["id"], case.rt_job["id"]} <= jobs
    assert "DRIFT: old-thorax@1 Heart" in browser.find_element(By.CSS_SELECTOR, ".banner").text
    screenshot(browser, case.workdir, "jobs")
    browser.find_element(By.LINK_TEXT, "delivered (1)").click()
    wait_until(lambda: "state=delivered" in browser.current_url and loaded(browser), 60, what="the filtered list")
    states = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "table .state")]
    assert states == ["delivered"]


def test_job_page_shows_qa_picture_volumes_figures_and_deliveries(case: Case, page: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{page}/jobs/{case.ct_job['id']}")
    image = browser.find_element(By.ID, "qa")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100
    text = browser.find_element(By.TAG_NAME, "main").text
    for expected in ("Heart", "Lung_L", "demo-thorax@3", "TPS", "delivered"):
        assert expected in text
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1366
    screenshot(browser, case.workdir, "job")


def test_agreement_page_plots_each_structure_of_each_version(case: Case, page: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{page}/agreement")
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    titles = sorted(c.find_element(By.TAG_NAME, "h3").text for c in cards)
    assert titles == sorted(["External · demo-thorax@3", "Heart · demo-thorax@3", "Lung_L · demo-thorax@3",
                             "Lung_R · demo-thorax@3", "SpinalCord · demo-thorax@3", "Heart · old-thorax@1 DRIFT"])
    old = next(c for c in cards if "old-thorax" in c.text)
    assert len(old.find_elements(By.CSS_SELECTOR, "svg.trend circle")) == len(OLD_VERSION_DICE)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1366
    screenshot(browser, case.workdir, "agreement")


def test_no_patient_name_id_or_birth_date_on_any_page(case: Case, page: str, browser: Any,
                                                      small_series: list[Path]) -> None:
    ct = pydicom.dcmread(small_series[0], stop_before_pixels=True)
    needles = [str(ct.PatientName), str(ct.PatientID), str(ct.PatientBirthDate), str(ct.SeriesInstanceUID),
               "PHYSICIAN^APPROVING"]
    for path in ("/jobs", f"/jobs/{case.ct_job['id']}", f"/jobs/{case.draft_job['id']}",
                 f"/jobs/{case.rt_job['id']}", "/failures", "/models",
                 "/agreement", "/login"):
        browser.get(page + path)
        source = browser.page_source
        assert not [n for n in needles if n in source], path
    screenshot(browser, case.workdir, "login")


def _post(url: str, data: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.parse
    import urllib.request

    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_action_buttons_refuse_a_request_without_the_token(case: Case, page: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    retry = f"{page}/jobs/{case.ct_job['id']}/retry"
    assert _post(retry, {})[0] == 403
    assert _post(retry, {}, {"Authorization": "Bearer wrong"})[0] == 403
    assert _post(retry, {"csrf": "guess"})[0] == 403
    # the right token from another site's page is refused too
    assert _post(retry, {}, {"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"})[0] == 403
    # with the token the action runs: this delivered job has nothing to replay, and says so
    code, body = _post(retry, {}, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 409 and "no dead-lettered deliveries" in body

    # in the browser: signed in, the form's CSRF value lets the action through; a stale one does not
    browser.get(f"{page}/login")
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    signed_in(browser)
    valid = browser.find_element(By.CSS_SELECTOR, "meta[name=csrf]").get_attribute("content")
    for value, expected in (("stale", "CSRF value is missing or stale"), (valid, "no dead-lettered deliveries")):
        browser.execute_script(SUBMIT_FORM, retry, value)
        wait_until(lambda: "/retry" in browser.current_url and page_text(browser, "main"), 60,
                   what="the action's answer")
        assert expected in page_text(browser, "main")
        browser.get(f"{page}/jobs")


SUBMIT_FORM = ("const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
               "const i = document.createElement('input'); i.name = 'csrf'; i.value = arguments[1];"
               "f.appendChild(i); document.body.appendChild(f); f.submit();")


# --- whose approvals count (these send more sets; the checks above hold with or without them) ---------


def refused_set(case: Case, name: str, calling: str, reason_part: str) -> dict[str, Any]:
    assert storescu(case.node.port, [case.workdir / name], calling=calling).returncode == 0
    return wait_until(lambda: next((r for r in case.node.jobs()
                                    if r["state"] == "unrouted" and reason_part in (r["reason"] or "")), None),
                      120, every=0.5, what=f"the set in {name} to be kept unlinked")


def test_an_approved_set_from_a_caller_that_is_not_a_planning_system_is_kept_but_not_linked(case: Case) -> None:
    clinicians_version(case.ai, case.ct_headers, case.workdir / "stranger.dcm")
    row = refused_set(case, "stranger.dcm", "STORESCU", "accept_from")
    assert row["reason"] == (f"clinician's structure set from STORESCU not linked to job {case.ct_job['id']}: "
                             "approvals.accept_from does not list that caller")
    assert row.get("linked_to") is None and row["instances"] == 1
    stored = agreement.rows(Store(case.node.root).index, ct_job=case.ct_job["id"])
    assert {r["approval_job"] for r in stored} == {case.rt_job["id"]}


def test_an_approved_set_of_another_patient_is_kept_but_not_linked(case: Case) -> None:
    ds = clinicians_version(case.ai, case.ct_headers, case.workdir / "other-patient.dcm")
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(case.workdir / "other-patient.dcm", enforce_file_format=True)
    row = refused_set(case, "other-patient.dcm", "TPS", "its patient")
    assert row["reason"] == (f"clinician's structure set not linked to job {case.ct_job['id']}: its patient is "
                             "not the contoured CT's")
    assert "SOMEONE-ELSE" not in case.node.log_text()
