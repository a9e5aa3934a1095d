"""Delivery as a planning system sees it, with real peers: what it accepts, its ROI names,
results held or flagged by the plausibility gate, destinations that hang, admins' actions.

The TPS here is a pynetdicom Storage SCP on loopback supporting only the SOP classes given,
as Eclipse or Monaco support RT Structure Set Storage but not Segmentation Storage.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage

from tests.infer_packages import Pointwise, threshold_model, write_package
from tests.keys import sign
from tests.peers import Node, free_port, storescu, wait_until

pytestmark = pytest.mark.peer


class StoreSCP:
    """A real Storage SCP that keeps what it receives; it supports only ``sop_classes``."""

    def __init__(self, ae_title: str, sop_classes: Sequence[str]) -> None:
        self.port = free_port()
        self.received: list[pydicom.Dataset] = []
        self._ae = AE(ae_title=ae_title)
        for sop_class in sop_classes:
            self._ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server: Any = None

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def start(self) -> StoreSCP:
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def modalities(self) -> list[str]:
        return sorted(str(ds.Modality) for ds in self.received)


class SilentListener:
    """Accepts TCP connections and never says a word: a peer that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self.sock.close()


@pytest.fixture
def rt_only_tps() -> Iterator[StoreSCP]:
    scp = StoreSCP("TPS", [RTStructureSetStorage]).start()
    yield scp
    scp.stop()


@pytest.fixture
def pacs() -> Iterator[StoreSCP]:
    scp = StoreSCP("PACS", [RTStructureSetStorage, SegmentationStorage]).start()
    yield scp
    scp.stop()


def body_model(root: Path) -> Path:
    """`toy-body` 1: label 1 External (empty: the model never calls it), label 2 Lung_L = the body."""
    write_package(root, [threshold_model(3, level=0.25)], name="toy-body", version="1", structures=2,
                  patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0),
                  postprocess={"largest_component": True, "fill_holes": True})
    return root


def misplaced_heart_model(root: Path) -> Path:
    """`toy-heart` 1: External is the body, and the Heart lands in the air around it.

    Windowed HU above 0.25 (soft tissue) is External; below 0.05 (air outside the body) is
    Heart, so the Heart lies wholly outside the chest. model.yaml expects it inside External.
    """
    model = Pointwise(weight=[0.0, 40.0, -40.0], bias=[0.0, -10.0, 2.0])
    folder = write_package(root, [model], name="toy-heart", version="1", structures=2,
                           patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0),
                           postprocess={"largest_component": True, "fill_holes": True})
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["structures"][1]["name"] = "Heart"
    manifest["structures"][1]["expect"] = {"inside": "External", "volume_cc": {"min": 100, "max": 1500}}
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    sign(folder)
    return root


def destination(port: int, ae_title: str = "TPS", **extra: Any) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}


def make_node(node_factory: Any, models: Path, destinations: dict[str, Any], rule: dict[str, Any]) -> Node:
    return node_factory(settings={
        "models_dir": str(models),
        "destinations": destinations,
        "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3, "max_attempts": 50},
        "inference": {"timeout_s": 120},
    }, rules={"rules": [{"name": "thorax", "match": {"Modality": "CT"}, **rule}]})


def transitions(node: Node, job_id: int) -> list[tuple[str, str | None, str | None, float]]:
    """(to state, reason, who, at) of every move of the job, oldest first."""
    with sqlite3.connect(node.root / "index.sqlite3", timeout=5) as db:
        rows = db.execute("SELECT to_state, reason, who, at FROM transitions WHERE job_id = ? ORDER BY rowid",
                          (job_id,)).fetchall()
    return [(r[0], r[1], r[2], float(r[3])) for r in rows]


def attempts_to(node: Node, dest: str) -> int:
    with sqlite3.connect(node.root / "index.sqlite3", timeout=5) as db:
        return int(db.execute("SELECT COUNT(*) FROM attempts a JOIN outbox o ON o.id = a.outbox_id "
                              "WHERE o.destination = ?", (dest,)).fetchone()[0])


def test_seg_refused_at_association_fails_at_once_naming_seg_and_the_rtstruct_arrives(
        node_factory: Any, rt_only_tps: StoreSCP, small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, body_model(tmp_path / "models"),
                     {"TPS": destination(rt_only_tps.port)},
                     {"model": "toy-body", "outputs": ["rtstruct", "seg"], "send_to": ["TPS"]}).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "failed", job
    moves = transitions(node, job["id"])
    assert moves[-1][0] == "failed"
    assert moves[-1][3] - next(t[3] for t in moves if t[0] == "sending") < 10
    assert "TPS does not accept Segmentation Storage (refused at association)" in job["reason"]
    assert "1 other file(s) delivered" in job["reason"]
    assert rt_only_tps.modalities() == ["RTSTRUCT"]
    assert attempts_to(node, "TPS") == 2  # one each: the SEG is not retried
    assert any(e["event"] == "output refused by destination" and "Segmentation" in e["error"]
               for e in node.log_events())


def test_outputs_go_only_where_they_are_accepted(node_factory: Any, rt_only_tps: StoreSCP, pacs: StoreSCP,
                                                 small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, body_model(tmp_path / "models"),
                     {"TPS": destination(rt_only_tps.port, accepts=["rtstruct"]),
                      "PACS": destination(pacs.port, "PACS", accepts=["rtstruct", "seg"])},
                     {"model": "toy-body", "outputs": ["rtstruct", "seg"], "send_to": ["TPS", "PACS"]}).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    assert rt_only_tps.modalities() == ["RTSTRUCT"]
    assert pacs.modalities() == ["RTSTRUCT", "SEG"]
    assert job["not_sent"] == {"TPS": ["seg"]}
    # one RT-STRUCT instance serves both: same names, same file
    assert rt_only_tps.received[0].SOPInstanceUID == next(
        ds.SOPInstanceUID for ds in pacs.received if ds.Modality == "RTSTRUCT")


def test_a_hanging_destination_does_not_delay_another(node_factory: Any, pacs: StoreSCP,
                                                      small_series: list[Path], tmp_path: Path) -> None:
    silent = SilentListener()
    try:
        node = make_node(node_factory, body_model(tmp_path / "models"),
                         {"HUNG": destination(silent.port, "HUNG", connect_timeout_s=60),
                          "PACS": destination(pacs.port, "PACS")},
                         {"model": "toy-body", "outputs": ["rtstruct", "seg"], "send_to": ["HUNG", "PACS"]}).start()
        assert storescu(node.port, small_series).returncode == 0
        wait_until(lambda: len(pacs.received) == 2, 180, what="both results at the PACS")
        # the hung peer's first attempt is still waiting for its association's answer
        assert attempts_to(node, "HUNG") == 0
        assert pacs.modalities() == ["RTSTRUCT", "SEG"]
    finally:
        silent.close()


def test_site_names_rename_and_empty_structures_are_left_out(
        node_factory: Any, rt_only_tps: StoreSCP, small_series: list[Path], tmp_path: Path) -> None:
    names = tmp_path / "site-names.yaml"
    names.write_text("rois:\n  Lung_L: {name: LUNG_LT, color: [1, 2, 3]}\n")
    node = make_node(node_factory, body_model(tmp_path / "models"),
                     {"TPS": destination(rt_only_tps.port, accepts=["rtstruct"], names=str(names),
                                         max_roi_name=16)},
                     {"model": "toy-body", "outputs": ["rtstruct"], "send_to": ["TPS"]}).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    assert job["empty_structures"] == ["External"]
    [rt] = rt_only_tps.received
    assert [str(r.ROIName) for r in rt.StructureSetROISequence] == ["LUNG_LT"]
    assert [int(v) for v in rt.ROIContourSequence[0].ROIDisplayColor] == [1, 2, 3]
    assert len(rt.ROIContourSequence[0].ContourSequence) > 0


def test_a_local_name_too_long_for_the_tps_is_a_check_config_error_with_file_and_line(
        node_factory: Any, tmp_path: Path) -> None:
    names = tmp_path / "site-names.yaml"
    names.write_text("rois:\n  Lung_L: {name: LUNG_LT}\n  SpinalCord: {name: SPINAL_CORD_PRV_5MM}\n")
    node = make_node(node_factory, body_model(tmp_path / "models"),
                     {"TPS": destination(free_port(), names=str(names), max_roi_name=16)},
                     {"model": "toy-body", "outputs": ["rtstruct"], "send_to": ["TPS"]})
    result = node.cli("check-config", check=False)
    assert result.returncode != 0
    assert f"{names}:3: rois.SpinalCord.name:" in result.stderr
    assert "at most 16" in result.stderr


def test_an_implausible_result_is_held_with_its_reason_and_release_sends_it_marked(
        node_factory: Any, rt_only_tps: StoreSCP, small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, misplaced_heart_model(tmp_path / "models"),
                     {"TPS": destination(rt_only_tps.port, accepts=["rtstruct"])},
                     {"model": "toy-heart", "outputs": ["rtstruct"], "send_to": ["TPS"]}).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"needs_review", "delivered", "failed"}, timeout=180)
    assert job["state"] == "needs_review", job
    assert "Heart: 0% inside External" in job["reason"]
    assert job["review"]["policy"] == "hold"
    assert job["volumes_cc"]["External"] > 0 and job["volumes_cc"]["Heart"] > 0
    assert rt_only_tps.received == []
    assert not (node.root / "results" / f"job-{job['id']}" / "rtstruct-0.dcm").exists()
    assert Path(job["qa_png"]).is_file()  # made before the gate held it: the reviewer can look

    node.cli("release", str(job["id"]))
    [job] = node.wait_state({"delivered", "failed"}, timeout=60)
    assert job["state"] == "delivered", job
    [rt] = rt_only_tps.received
    assert rt.StructureSetLabel == "NEEDS REVIEW"
    assert rt.SeriesDescription.startswith("NEEDS REVIEW: ")
    released = [t for t in transitions(node, job["id"]) if t[0] == "inferred" and t[2]]
    assert len(released) == 1 and released[0][1].startswith("released by ")


def test_with_review_flag_an_implausible_result_is_sent_marked(
        node_factory: Any, rt_only_tps: StoreSCP, small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, misplaced_heart_model(tmp_path / "models"),
                     {"TPS": destination(rt_only_tps.port, accepts=["rtstruct"])},
                     {"model": "toy-heart", "outputs": ["rtstruct"], "send_to": ["TPS"], "review": "flag"}).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"needs_review", "delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    assert job["review"]["policy"] == "flag"
    assert any("Heart" in r for r in job["review"]["reasons"])
    [rt] = rt_only_tps.received
    assert rt.StructureSetLabel == "NEEDS REVIEW"
    assert "NEEDS REVIEW" in rt.SeriesDescription


@pytest.mark.slow
def test_reroute_after_a_rules_fix_routes_an_unrouted_job_and_records_who(
        node_factory: Any, rt_only_tps: StoreSCP, small_series: list[Path], tmp_path: Path) -> None:
    node = make_node(node_factory, body_model(tmp_path / "models"),
                     {"TPS": destination(rt_only_tps.port, accepts=["rtstruct"])},
                     {"model": "toy-body", "outputs": ["rtstruct"], "send_to": ["TPS"]})
    rules = yaml.safe_load((node.workdir / "routing.yaml").read_text())
    rules["rules"][0]["match"] = {"Modality": "MR"}
    (node.workdir / "routing.yaml").write_text(yaml.safe_dump(rules))
    node.start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"unrouted"}, timeout=60)
    rules["rules"][0]["match"] = {"Modality": "CT"}
    (node.workdir / "routing.yaml").write_text(yaml.safe_dump(rules))
    wait_until(lambda: sum(e["event"] == "routing rules loaded" for e in node.log_events()) >= 2, 20,
               what="the fixed rules in force")
    node.cli("reroute", str(job["id"]))
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    assert rt_only_tps.modalities() == ["RTSTRUCT"]
    moves = transitions(node, job["id"])
    [(to, reason, who, _at)] = [t for t in moves if t[2]]
    assert to == "complete" and reason == f"rerouted by {who}"


def test_an_scu_error_is_a_failed_attempt_and_dead_letters_after_max_attempts(
        rt_only_tps: StoreSCP, tmp_path: Path) -> None:
    from ie_gateway.config import DeliverySettings, Destination
    from ie_gateway.send import Sender
    from ie_gateway.store import Store
    from ie_gateway.store.outbox import Outbox
    from ie_gateway.vocab import OutboxState

    store = Store(tmp_path / "var")
    job, _ = store.index.add_instance(sop_uid="1.2.3.1", sop_class="1.2.840.10008.5.1.4.1.1.2",
                                      transfer_syntax="1.2.840.10008.1.2.1", study_uid="1.2.3",
                                      series_uid="1.2.3.0", path="ct.dcm", size=1, calling_ae="PACS",
                                      called_ae="IE_GATEWAY", header=dict)
    garbage = store.job_dir(job) / "rtstruct-0.dcm"
    garbage.write_bytes(b"not a DICOM file")  # pynetdicom raises when it reads it
    outbox = Outbox(store.index)
    outbox.enqueue(job, "TPS", str(garbage.relative_to(store.results)), "1.2.3.4", str(RTStructureSetStorage))
    sender = Sender({"TPS": Destination(ae_title="TPS", host="127.0.0.1", port=rt_only_tps.port)},
                    DeliverySettings(base_s=0.01, cap_s=0.01, max_attempts=2), outbox, store.results)
    try:
        for _ in range(2):
            wait_until(lambda: outbox.due_destinations(), 60, what="the row due again")
            [future] = sender.deliver_due()
            assert future.result(timeout=30) == 0
    finally:
        sender.close()
    [failed] = outbox.failures(job)
    dest, status, error = failed.destination, failed.last_status, failed.last_error
    assert dest == "TPS" and status is None and error, error
    assert error.startswith("TPS: ") and "internal error" not in error, error
    assert outbox.job_summary(job) == {OutboxState.FAILED: 1}


def test_a_model_name_too_long_for_the_tps_and_not_mapped_is_a_check_config_error(
        node_factory: Any, tmp_path: Path) -> None:
    node = make_node(node_factory, body_model(tmp_path / "models"),
                     {"TPS": destination(free_port(), max_roi_name=5)},
                     {"model": "toy-body", "outputs": ["rtstruct"], "send_to": ["TPS"]})
    result = node.cli("check-config", check=False)
    assert result.returncode == 2
    assert "rules.thorax: toy-body@1 sends ROI 'External' (8 characters) to TPS, whose max_roi_name is 5" \
        in result.stderr
