"""Shadow mode with real peers: a CT matches a live route (demo-thorax@3 to the TPS) and a shadow
route (`deliver: false`, a version 4 of the same model) after it. Orthanc as the TPS must receive
the live RT-STRUCT and nothing of version 4; when the clinician's approved set comes back, both
versions get agreement figures, and the agreement page shows the shadow version's beside the
live one's.
"""

from __future__ import annotations

import shutil
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pydicom
import pytest
import yaml

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.qa import agreement
from ie_gateway.store import Store
from tests.keys import sign
from tests.peers import REPO, Node, Orthanc, storescu, wait_until
from tests.test_qa_loop import clinicians_version
from tests.web_server import admin_page

pytestmark = [pytest.mark.peer, pytest.mark.slow]

RULES = {
    "rules": [
        {
            "name": "live",
            "match": {"Modality": "CT"},
            "model": "demo-thorax@3",
            "outputs": ["rtstruct"],
            "send_to": ["TPS"],
            "continue": True,
        },
        {
            "name": "shadow",
            "match": {"Modality": "CT"},
            "model": "demo-thorax@4",
            "outputs": ["rtstruct"],
            "send_to": ["TPS"],
            "deliver": False,
        },
    ]
}


def models_with_a_shadow_version(models: Path) -> Path:
    """demo-thorax 3 and a 4 with the same folds (a candidate to try in shadow)."""
    for version in ("3", "4"):
        shutil.copytree(REPO / "models" / "demo-thorax" / "3", models / "demo-thorax" / version)
    manifest = yaml.safe_load((models / "demo-thorax" / "4" / "model.yaml").read_text())
    manifest["version"] = "4"
    (models / "demo-thorax" / "4" / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    sign(models / "demo-thorax" / "4")  # a new version is published signed, as the node requires
    return models


def test_a_shadow_route_sends_nothing_and_gathers_agreement_beside_the_live_one(tmp_path: Path) -> None:
    # 28 slices of 5 mm: one sliding window of the demo model per route
    ct = write_ct_series(make_phantom(41, slices=28, size=256, pixel_mm=1.95, slice_mm=5.0), tmp_path / "ct", seed=41)
    tps = Orthanc(tmp_path / "tps").start()
    node = Node(
        tmp_path / "node",
        rules=RULES,
        settings={
            "models_dir": str(models_with_a_shadow_version(tmp_path / "models")),
            "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
            "inference": {"device": "cpu", "timeout_s": 600},
            "approvals": {"accept_from": ["TPS"]},
        },
    )
    try:
        node.start()
        assert storescu(node.port, ct).returncode == 0
        [job] = node.wait_state({"delivered", "failed", "refused"}, timeout=600)
        assert job["state"] == "delivered", job
        assert [(r["model"], r["version"], r["deliver"]) for r in job_routes(node, job["id"])] == [
            ("demo-thorax", "3", True),
            ("demo-thorax", "4", False),
        ]
        # the TPS holds the live version's RT-STRUCT only; the shadow one stayed on the node
        [instance] = tps.get_post("/tools/find", {"Level": "Instance", "Query": {}})
        ai_path = tmp_path / "ai.dcm"
        ai_path.write_bytes(tps.get_bytes(f"/instances/{instance}/file"))
        ai = pydicom.dcmread(ai_path)
        assert ai.SoftwareVersions[0] == "demo-thorax@3", ai.SoftwareVersions  # h27: name@version
        shadow_file = Store(node.root).results / f"job-{job['id']}" / "rtstruct-1.dcm"
        assert shadow_file.is_file() and pydicom.dcmread(shadow_file).SOPInstanceUID != ai.SOPInstanceUID

        headers = sorted(
            (pydicom.dcmread(p, stop_before_pixels=True) for p in ct), key=lambda h: float(h.ImagePositionPatient[2])
        )
        clinicians_version(ai, headers, tmp_path / "approved.dcm")
        assert storescu(node.port, [tmp_path / "approved.dcm"], calling="TPS").returncode == 0
        wait_until(
            lambda: len(agreement.rows(Store(node.root).index)) >= 10,
            300,
            every=0.5,
            what="agreement figures of both versions",
        )
        rows = agreement.rows(Store(node.root).index)
        assert {(r["model_version"], r["structure"]) for r in rows} == {
            (v, s) for v in ("3", "4") for s in ("External", "Lung_L", "Lung_R", "Heart", "SpinalCord")
        }
        assert tps.get("/statistics")["CountInstances"] == 1  # still only the live result

        with admin_page(node.config, None) as base, urllib.request.urlopen(f"{base}/agreement", timeout=30) as rsp:
            page = rsp.read().decode()
        assert "<td>demo-thorax@3</td><td>live</td>" in page
        assert "<td>demo-thorax@4</td><td>shadow</td>" in page
    finally:
        node.stop()
        tps.stop()


def job_routes(node: Node, job_id: int) -> list[dict[str, object]]:
    return [asdict(r) for r in Store(node.root).index.job(job_id).routes]
