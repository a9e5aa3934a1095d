"""The whole path PACS → node → TPS with real peers: storescu sends, Orthanc is the TPS.

A toy model (a fixed 1×1×1 convolution that labels the body) keeps these tests quick; the
demo model's accuracy is tested in test_demo_model_accuracy.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
import SimpleITK as sitk
from pydicom.filebase import DicomBytesIO

from ie_gateway.write.validate import dice, rasterize_rtstruct
from tests.infer_packages import threshold_model, write_package
from tests.peers import FailingStoreSCP, Node, Orthanc, free_port, storescu, wait_until

pytestmark = pytest.mark.peer


def toy_models(root: Path) -> Path:
    """A models dir with `toy-body` version 1: External where the windowed HU exceeds -500."""
    write_package(root, [threshold_model(2, level=0.25), threshold_model(2, level=0.25)], name="toy-body",
                  version="1", structures=1, patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0),
                  postprocess={"largest_component": True, "fill_holes": True})
    return root


RULES = {"rules": [{"name": "thorax", "match": {"Modality": "CT", "BodyPartExamined": {"one_of": ["CHEST"]}},
                    "model": "toy-body", "outputs": ["rtstruct", "seg"], "send_to": ["TPS"]}]}


def make_node(node_factory: Any, tmp_path: Path, tps_port: int, **delivery: Any) -> Node:
    return node_factory(settings={
        "models_dir": str(toy_models(tmp_path / "models")),
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}},
        "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3, **delivery},
        "inference": {"timeout_s": 120},
    }, rules=RULES)


def orthanc_instances(tps: Orthanc, modality: str) -> list[dict[str, Any]]:
    found = tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": modality}, "Expand": True})
    return list(found)


def result_uids_at(tps: Orthanc) -> list[str]:
    """SOP Instance UIDs of every RT-STRUCT and SEG the TPS holds."""
    return [i["MainDicomTags"]["SOPInstanceUID"]
            for i in orthanc_instances(tps, "RTSTRUCT") + orthanc_instances(tps, "SEG")]


def test_ct_from_storescu_ends_as_rtstruct_and_seg_in_the_tps(node_factory: Any, orthanc: Orthanc,
                                                                small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, tmp_path, orthanc.dicom_port).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed", "refused"}, timeout=180)
    assert job["state"] == "delivered", job
    assert (job["model"], job["model_version"]) == ("toy-body", "1")
    assert Path(job["qa_png"]).is_file()
    [rt] = orthanc_instances(orthanc, "RTSTRUCT")
    [seg] = orthanc_instances(orthanc, "SEG")
    ct_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in small_series]
    for instance in (rt, seg):
        path = tmp_path / f"{instance['ID']}.dcm"
        path.write_bytes(orthanc.get_bytes(f"/instances/{instance['ID']}/file"))
        verify = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr[-2000:]
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == ct_headers[0].StudyInstanceUID
        assert ds.PatientID == ct_headers[0].PatientID
        assert "toy-body" in ds.SeriesDescription
    rt_ds = pydicom.dcmread(tmp_path / f"{rt['ID']}.dcm")
    referenced = {c.ReferencedSOPInstanceUID for c in rt_ds.ReferencedFrameOfReferenceSequence[0]
                  .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    assert referenced == {h.SOPInstanceUID for h in ct_headers}


@pytest.mark.slow
def test_tps_down_then_up_gets_every_result_once_with_the_same_uids(
        node_factory: Any, small_series: list[Path], tmp_path: Path) -> None:
    tps_port = free_port()
    node = make_node(node_factory, tmp_path, tps_port, max_attempts=1000).start()
    assert storescu(node.port, small_series).returncode == 0
    node.wait_state({"sending"}, timeout=180)
    # the node retries against a closed port; give it a few failed attempts before the TPS comes up
    index = node.root / "index.sqlite3"
    wait_until(lambda: _attempts(index) >= 3, 60, what="three failed delivery attempts")
    tps = Orthanc(tmp_path / "tps", dicom_port=tps_port).start()
    try:
        [job] = node.wait_state({"delivered", "failed"}, timeout=120)
        assert job["state"] == "delivered"
        sent = set(_outbox_uids(index))
        assert set(result_uids_at(tps)) == sent
        assert len(sent) == 2
        assert _successes_per_row(index) == {1: 1, 2: 1}  # each file went to the TPS once
    finally:
        tps.stop()


@pytest.mark.slow
def test_kill_9_while_results_wait_for_the_tps_then_restart_delivers_once(
        node_factory: Any, small_series: list[Path], tmp_path: Path) -> None:
    tps_port = free_port()
    node = make_node(node_factory, tmp_path, tps_port, max_attempts=1000).start()
    assert storescu(node.port, small_series).returncode == 0
    node.wait_state({"sending"}, timeout=180)
    index = node.root / "index.sqlite3"
    before = set(_outbox_uids(index))
    node.kill9()
    tps = Orthanc(tmp_path / "tps", dicom_port=tps_port).start()
    try:
        node.start()
        [job] = node.wait_state({"delivered", "failed"}, timeout=120)
        assert job["state"] == "delivered"
        assert sorted(result_uids_at(tps)) == sorted(before)
        assert _successes_per_row(index) == {1: 1, 2: 1}  # the restart sent nothing twice
    finally:
        tps.stop()


@pytest.mark.slow
def test_tps_failure_status_is_retried_then_dead_lettered_and_replayable(
        node_factory: Any, small_series: list[Path], tmp_path: Path) -> None:
    port = free_port()
    full = FailingStoreSCP(tmp_path / "full-tps", port).start()
    tps = None
    try:
        node = make_node(node_factory, tmp_path, port, max_attempts=3).start()
        assert storescu(node.port, small_series).returncode == 0
        [job] = node.wait_state({"failed", "delivered"}, timeout=180)
        assert job["state"] == "failed"
        assert "delivery to TPS failed" in job["reason"] and "0x" in job["reason"]
        # every file (RT-STRUCT and SEG) tried exactly max_attempts times, then dead-lettered
        assert _attempts_per_row(node.root / "index.sqlite3") == {1: 3, 2: 3}
        full.stop()
        tps = Orthanc(tmp_path / "tps", dicom_port=port).start()
        replay = node.cli("send", "--retry", str(job["id"]))
        assert "2 deliveries queued" in replay.stdout
        [job] = node.wait_state({"delivered"}, timeout=60)
        assert len(orthanc_instances(tps, "RTSTRUCT")) == 1
    finally:
        full.stop()
        if tps is not None:
            tps.stop()


def _attempts(index: Path) -> int:
    with sqlite3.connect(index, timeout=5) as db:
        return int(db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0])


def _attempts_per_row(index: Path) -> dict[int, int]:
    with sqlite3.connect(index, timeout=5) as db:
        return dict(db.execute("SELECT outbox_id, COUNT(*) FROM attempts GROUP BY outbox_id").fetchall())


def _successes_per_row(index: Path) -> dict[int, int]:
    """Outbox row → its successful attempts (Orthanc keeps one copy of a resent instance, so
    only the node's own record shows a duplicate delivery)."""
    with sqlite3.connect(index, timeout=5) as db:
        return dict(db.execute("SELECT outbox_id, COUNT(*) FROM attempts WHERE status = 0 GROUP BY outbox_id")
                    .fetchall())


def _outbox_uids(index: Path) -> list[str]:
    with sqlite3.connect(index, timeout=5) as db:
        return [r[0] for r in db.execute("SELECT sop_uid FROM outbox")]


def test_rtstruct_contours_rasterise_back_onto_the_label_map(node_factory: Any, orthanc: Orthanc,
                                                             small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, tmp_path, orthanc.dicom_port).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    folder = node.root / "results" / f"job-{job['id']}"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels-0.mha")))
    [arrived] = orthanc_instances(orthanc, "RTSTRUCT")  # the copy the TPS holds, not the node's
    rt = pydicom.dcmread(DicomBytesIO(orthanc.get_bytes(f"/instances/{arrived['ID']}/file")))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in small_series]
    in_slice_order = sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))
    back = rasterize_rtstruct(rt, in_slice_order)
    assert dice(back == 1, labels == 1) >= 0.98
