"""The output plan: the files a routed job will write, fixed once and read by every later stage.

The first tests check the plan itself; the peer tests run the shipped configuration's shape (a
TPS that takes RT-STRUCT only, a route asking for RT-STRUCT and SEG, sync on) through a node,
Orthanc and Azurite: the case sync uploads exactly the files written, and agreement compares
the RT-STRUCT the TPS received under its own ROI names.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from azure.storage.blob import ContainerClient
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from ie_gateway.config import Destination
from ie_gateway.plan import not_sent, plan_outputs
from ie_gateway.qa import agreement
from ie_gateway.store import JobDetail, JobRoute, OutputKind, Store
from ie_gateway.store.records import OutputPlan
from ie_gateway.sync.blob import container_client
from tests.azurite import azurite_blob  # noqa: F401  (fixture)
from tests.peers import Node, Orthanc, storescu, wait_until
from tests.test_pipeline import toy_models

RT, SEG = OutputKind.RTSTRUCT, OutputKind.SEG
KEY = "result-plan-test-key-0123456789"


def _dest(names: Path | None = None, accepts: tuple[str, ...] = ("rtstruct", "seg")) -> Destination:
    return Destination(ae_title="TPS", host="127.0.0.1", port=104, accepts=list(accepts), names=names)


def _route(*send_to: str, outputs: tuple[OutputKind, ...] = (RT, SEG)) -> JobRoute:
    return JobRoute(rule="r", model="m", version="1", outputs=outputs, send_to=send_to, sync=True)


def test_a_tps_taking_rtstruct_only_gets_one_planned_file_and_the_seg_is_not_sent() -> None:
    destinations = {"TPS": _dest(accepts=("rtstruct",))}
    routes = [_route("TPS")]
    plan = plan_outputs(routes, destinations)
    assert [(o.kind, o.file, o.destinations, o.names_file) for o in plan.outputs] == [
        (RT, "rtstruct-0.dcm", ("TPS",), None)
    ]
    assert not_sent(routes, destinations) == {"TPS": (SEG,)}


def test_destinations_with_the_same_names_share_a_file_and_a_names_file_gets_its_own(tmp_path: Path) -> None:
    names = tmp_path / "names.yaml"
    destinations = {"PACS": _dest(), "ARCHIVE": _dest(), "TPS": _dest(names, accepts=("rtstruct",))}
    plan = plan_outputs([_route("PACS", "TPS", "ARCHIVE", outputs=(SEG, RT))], destinations)
    assert [(o.kind, o.file, o.destinations, o.names_file) for o in plan.outputs] == [
        (RT, "rtstruct-0.dcm", ("PACS", "ARCHIVE"), None),  # RT-STRUCT first, whatever the rule's order
        (RT, "rtstruct-0-TPS.dcm", ("TPS",), str(names)),
        (SEG, "seg-0.dcm", ("PACS", "ARCHIVE"), None),
    ]
    assert len({o.uids.sop_uid for o in plan.outputs} | {o.uids.series_uid for o in plan.outputs}) == 6
    assert plan.delivered_rtstruct(0) == plan.outputs[0]  # the model's own names first
    assert plan.delivered_rtstruct(1) is None


def test_planning_again_keeps_the_uids_of_files_already_planned() -> None:
    destinations = {"TPS": _dest(accepts=("rtstruct",))}
    first = plan_outputs([_route("TPS")], destinations)
    destinations["TPS"] = _dest()  # the TPS takes SEG now
    again = plan_outputs([_route("TPS")], destinations, previous=first)
    assert [o.file for o in again.outputs] == ["rtstruct-0.dcm", "seg-0.dcm"]
    assert again.outputs[0].uids == first.outputs[0].uids
    assert again.outputs[1].uids not in (first.outputs[0].uids,)


def test_the_plan_survives_the_index_and_an_earlier_nodes_uid_keys_become_a_plan(tmp_path: Path) -> None:
    plan = plan_outputs([_route("TPS"), _route("TPS")], {"TPS": _dest(tmp_path / "n.yaml")})
    assert JobDetail.from_json(JobDetail(plan=plan).to_json()).plan == plan

    legacy = json.dumps(
        {
            "output_uids": {
                "0-rtstruct": {"series_uid": "1.2.1", "sop_uid": "1.2.2"},
                "1-seg-TPS": {"series_uid": "1.2.3", "sop_uid": "1.2.4"},
            }
        }
    )
    converted = JobDetail.from_json(legacy).plan
    assert [(o.kind, o.route, o.file, o.uids.sop_uid, o.destinations) for o in converted.outputs] == [
        (RT, 0, "rtstruct-0.dcm", "1.2.2", ()),
        (SEG, 1, "seg-1-TPS.dcm", "1.2.4", ("TPS",)),
    ]
    # the write stage plans such a job again with its destinations, keeping the UIDs
    again = plan_outputs([_route("TPS", outputs=(RT,))], {"TPS": _dest(accepts=("rtstruct",))}, previous=converted)
    assert [(o.file, o.uids.sop_uid, o.destinations) for o in again.outputs] == [("rtstruct-0.dcm", "1.2.2", ("TPS",))]
    assert JobDetail.from_json(None).plan == OutputPlan()


# --- the shipped configuration's shape, end to end ---------------------------------------------


@dataclass
class Site:
    node: Node
    tps: Orthanc
    store: Store
    container: ContainerClient
    ct_job: dict[str, Any]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, small_series: list[Path], azurite_blob: str) -> Iterator[Site]:  # noqa: F811
    root = tmp_path_factory.mktemp("result-plan")
    container = container_client(azurite_blob, None, f"t{uuid.uuid4().hex[:12]}")
    container.create_container()
    names = root / "site-names.yaml"
    names.write_text("rois:\n  External: {name: BODY}\n")
    tps = Orthanc(root / "tps").start()
    node = Node(
        root / "node",
        env={"AZURE_STORAGE_CONNECTION_STRING": azurite_blob, "IE_GATEWAY_ANON_KEY": KEY},
        rules={
            "rules": [
                {
                    "name": "thorax",
                    "match": {"Modality": "CT"},
                    "model": "toy-body",
                    "outputs": ["rtstruct", "seg"],
                    "send_to": ["TPS"],
                    "sync": True,
                }
            ]
        },
        settings={
            "models_dir": str(toy_models(root / "models")),
            "destinations": {
                "TPS": {
                    "ae_title": "TPS",
                    "host": "127.0.0.1",
                    "port": tps.dicom_port,
                    "accepts": ["rtstruct"],
                    "names": str(names),
                }
            },
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
            "inference": {"timeout_s": 120},
            "approvals": {"accept_from": ["TPS"]},
            "sync": {
                "enabled": True,
                "container": container.container_name,
                "cases_cron": "0 0 1 1 *",
                "models_cron": "0 0 1 1 *",
            },
        },
    )
    try:
        node.start()
        assert storescu(node.port, small_series).returncode == 0
        [ct_job] = node.wait_state({"delivered", "failed", "refused"}, timeout=180)
        assert ct_job["state"] == "delivered", ct_job
        yield Site(node, tps, Store(node.root), container, ct_job)
    finally:
        node.stop()
        tps.stop()
        container.delete_container()


@pytest.mark.peer
@pytest.mark.slow
def test_sync_now_uploads_a_case_whose_manifest_lists_exactly_the_files_written(site: Site) -> None:
    job = site.store.index.job(site.ct_job["id"])
    written = [o.file for o in job.detail.plan.outputs]
    assert written == ["rtstruct-0-TPS.dcm"]  # the TPS takes no SEG, and applies its names
    assert sorted(p.name for p in site.store.job_dir(job.id).glob("*.dcm")) == written

    site.node.cli("sync", "now")  # exits non-zero when a case fails
    synced = site.store.index.job(job.id).detail
    assert synced.sync_error is None and synced.synced is not None and synced.synced.ai == 1
    blobs = {b.name: b for b in site.container.list_blobs(name_starts_with=f"cases/{synced.synced.case}/")}
    manifest = json.loads(site.container.download_blob(f"cases/{synced.synced.case}/manifest.json").readall())
    assert [(e["kind"], [s["name"] for s in e["structures"]]) for e in manifest["ai"]] == [("rtstruct", ["BODY"])]
    assert sorted(n.rsplit("/", 1)[1] for n in blobs if "/ai/" in n) == [e["file"] for e in manifest["ai"]]


@pytest.mark.peer
@pytest.mark.slow
def test_agreement_with_a_names_file_destination_compares_the_delivered_rtstruct(site: Site, tmp_path: Path) -> None:
    [instance] = site.tps.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}})
    delivered = pydicom.dcmread(DicomBytesIO(site.tps.get_bytes(f"/instances/{instance}/file")))
    assert [str(r.ROIName) for r in delivered.StructureSetROISequence] == ["BODY"]
    # the clinician approves the structure set as it arrived, untouched
    delivered.SOPInstanceUID = delivered.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    delivered.SeriesInstanceUID = generate_uid()
    delivered.ApprovalStatus = "APPROVED"
    delivered.save_as(tmp_path / "approved.dcm", enforce_file_format=True)
    # without the label map the figures can come only from the RT-STRUCT file the plan delivered
    (site.store.job_dir(site.ct_job["id"]) / "labels-0.mha").unlink()
    assert storescu(site.node.port, [tmp_path / "approved.dcm"], calling="TPS").returncode == 0

    def assessed() -> dict[str, Any] | None:
        rows = [r for r in site.node.jobs() if r.get("linked_to") == site.ct_job["id"]]
        return rows[0] if rows and rows[0]["state"] in {"unrouted", "failed"} else None

    rt_job = wait_until(assessed, 120, every=0.5, what="the approved set to be linked and assessed")
    assert "agreement figures of 1 structures" in rt_job["reason"], rt_job
    [row] = agreement.rows(site.store.index, ct_job=site.ct_job["id"])
    # the AI side is the RT-STRUCT the TPS got, rasterised like the clinician's: identical
    assert (row["structure"], row["dice"], row["hd95_mm"], row["surface_dice"]) == ("External", 1.0, 0.0, 1.0)
