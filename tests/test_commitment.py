"""Storage commitment (PS3.4 Annex J) with real peers, both ways.

As a receiver: a pynetdicom SCU stores with dcmtk's storescu, then asks the node to commit; the
node commits what is in its spool and names what is not. As a sender: Orthanc is the Storage
Commitment SCP of the TPS; it reports on a new association to the node, and the job is
delivered only once every file is committed, or failed with the file and the reason named.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from ie_gateway import reactor
from ie_gateway.interop.commitment import COMMITMENT_INSTANCE, STORAGE_COMMITMENT
from tests.peers import Node, Orthanc, free_port, storescu, wait_until
from tests.test_pipeline import RULES, orthanc_instances, toy_models

pytestmark = pytest.mark.peer


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
    return item


class CommitmentSCU:
    """A pynetdicom SCU that asks for commitment and keeps the report it gets on its association."""

    def __init__(self, port: int) -> None:
        self.reports: list[tuple[int, Dataset]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_requested_context(STORAGE_COMMITMENT)
        # guarded as the node's own associations are: pynetdicom's pause can lose a fast response
        self.assoc = reactor.associate(
            ae, "127.0.0.1", port, ae_title="IE_GATEWAY", evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)]
        )
        assert self.assoc.is_established

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        with self.lock:
            self.reports.append((int(event.event_type), event.event_information))
        return 0x0000, None

    def ask(self, info: Dataset) -> int:
        status, _ = self.assoc.send_n_action(info, 1, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
        return int(status.Status)

    def report(self) -> tuple[int, Dataset]:
        return wait_until(
            lambda: self.reports[0] if self.reports else None,
            60,  # type: ignore[no-any-return]
            what="the commitment report",
        )


def test_the_node_commits_only_what_is_in_its_spool(node: Node, small_series: list[Path]) -> None:
    stored = small_series[:2]
    assert storescu(node.port, stored, calling="PACS").returncode == 0
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in stored]
    unknown, wrong_class = generate_uid(), headers[1].SOPInstanceUID
    info = Dataset()
    info.TransactionUID = generate_uid()
    info.ReferencedSOPSequence = [
        _ref(headers[0].SOPClassUID, headers[0].SOPInstanceUID),
        _ref(headers[1].SOPClassUID, headers[1].SOPInstanceUID),
        _ref(headers[0].SOPClassUID, unknown),
        _ref(str(pydicom.uid.RTStructureSetStorage), wrong_class),
    ]
    scu = CommitmentSCU(node.port)
    try:
        assert scu.ask(info) == 0x0000
        event_type, report = scu.report()
    finally:
        scu.assoc.release()
    assert event_type == 2  # some failed
    assert report.TransactionUID == info.TransactionUID
    committed = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence}
    assert committed == {(h.SOPClassUID, h.SOPInstanceUID) for h in headers}
    failed = {(i.ReferencedSOPInstanceUID, int(i.FailureReason)) for i in report.FailedSOPSequence}
    assert failed == {(unknown, 0x0112), (wrong_class, 0x0119)}  # no such instance; class conflict


def test_a_malformed_commitment_request_is_refused(node: Node) -> None:
    info = Dataset()
    info.TransactionUID = "1.2.3.a"  # not a UID
    info.ReferencedSOPSequence = [_ref("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")]
    scu = CommitmentSCU(node.port)
    try:
        assert scu.ask(info) == 0x0115  # invalid argument value
    finally:
        scu.assoc.release()
    assert scu.reports == []


DELETE_ON_STORE = "function OnStoredInstance(instanceId, tags, metadata, origin)\n  Delete(instanceId)\nend\n"


def commitment_setup(
    node_factory: Any, tmp_path: Path, *, forgetful: bool = False, **delivery: Any
) -> tuple[Node, Orthanc]:
    """A node whose TPS (Orthanc) must commit what it gets; Orthanc reports to the node on a new
    association. ``forgetful``: Orthanc deletes each instance once stored, so it commits none."""
    node_port = free_port()
    tps = Orthanc(tmp_path / "tps")
    settings = json.loads(tps.config.read_text())
    settings["DicomModalities"] = {"gateway": ["IE_GATEWAY", "127.0.0.1", node_port]}
    if forgetful:
        (tmp_path / "forget.lua").write_text(DELETE_ON_STORE)
        settings["LuaScripts"] = [str(tmp_path / "forget.lua")]
    tps.config.write_text(json.dumps(settings))
    tps.start()
    node = node_factory(
        port=node_port,
        settings={
            "models_dir": str(toy_models(tmp_path / "models")),
            "destinations": {
                "TPS": {
                    "ae_title": "TPS",
                    "host": "127.0.0.1",
                    "port": tps.dicom_port,
                    "commitment": True,
                    "commitment_wait_s": 0.5,
                }
            },
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3, **delivery},
            "inference": {"timeout_s": 120},
        },
        rules=RULES,
    )
    return node, tps


def _attempt_errors(node: Node) -> dict[int, list[str | None]]:
    """Per outbox row, the error text of each attempt, oldest first."""
    found: dict[int, list[str | None]] = {}
    with sqlite3.connect(node.root / "index.sqlite3") as db:
        for row, error in db.execute("SELECT outbox_id, error FROM attempts ORDER BY at"):
            found.setdefault(int(row), []).append(error)
    return found


@pytest.mark.slow
def test_a_job_is_delivered_only_once_the_tps_committed_every_file(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    node, tps = commitment_setup(node_factory, tmp_path)
    try:
        node.start()
        assert storescu(node.port, small_series).returncode == 0
        [job] = node.wait_state({"delivered", "failed"}, timeout=180)
        assert job["state"] == "delivered", job
        assert len(orthanc_instances(tps, "RTSTRUCT")) == len(orthanc_instances(tps, "SEG")) == 1
        # each file: stored and commitment asked, then delivered on the report
        assert list(_attempt_errors(node).values()) == [["stored; storage commitment requested", None]] * 2
        events = [e["event"] for e in node.log_events()]
        assert events.index("commitment report") < events.index("job delivered")
    finally:
        tps.stop()


@pytest.mark.slow
def test_an_uncommitted_file_is_named_retried_then_failed(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    node, tps = commitment_setup(node_factory, tmp_path, forgetful=True, max_attempts=2)
    try:
        node.start()
        assert storescu(node.port, small_series).returncode == 0
        [job] = node.wait_state({"delivered", "failed"}, timeout=180)
        assert job["state"] == "failed", job
        assert "TPS did not commit" in job["reason"], job["reason"]
        assert "no such object instance (0x0112)" in job["reason"]
        # Orthanc deletes in a Lua callback it runs on its own time, so now and then it has
        # not yet deleted a file when it checks it: that file is committed, and delivered
        rows = list(_attempt_errors(node).values())
        for errors in rows:
            assert errors[0::2] == ["stored; storage commitment requested"] * len(errors[0::2]), errors
            if errors[-1] is None:
                continue
            assert errors[0::2] == ["stored; storage commitment requested"] * 2, errors  # sent twice
            assert all("did not commit" in (e or "") for e in errors[1::2]), errors
        assert any(errors[-1] is not None for errors in rows)
    finally:
        tps.stop()


def test_a_committing_row_waits_then_is_delivered_failed_or_overdue(tmp_path: Path, index_url: str) -> None:
    """The outbox side of commitment on both index backends: stored rows wait as committing
    (the job is not settled), a report settles them, a silent peer's rows fall due again."""
    from ie_gateway.interop.commitment import Commitments, Reference
    from ie_gateway.store import Store
    from ie_gateway.store.outbox import Outbox
    from ie_gateway.vocab import OutboxState
    from tests.test_notify import routed_job

    store = Store(tmp_path, index_url)
    outbox = Outbox(store.index)
    job = routed_job(store)
    for n in range(3):
        outbox.enqueue(job, "TPS", f"job-{job}/f{n}.dcm", f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.481.3")
    rows = outbox.claim_due("TPS", "here", 10)
    failures: list[tuple[str, str]] = []
    commitments = Commitments(outbox, {}, lambda row, status, error: failures.append((row.sop_uid, error)))
    outbox.record_stored(rows[0], 0, wait_until=1e12)
    outbox.record_stored(rows[1], 0, wait_until=1e12)
    outbox.record_stored(rows[2], 0, wait_until=0)  # its report is overdue at once
    assert outbox.job_summary(job) == {OutboxState.COMMITTING: 3}
    assert [r.sop_uid for r in outbox.overdue_commitments()] == ["1.2.3.2"]
    commitments.settle_report(
        ["TPS"], "2.25.1", [Reference(rows[0].sop_class, "1.2.3.0")], [Reference(rows[1].sop_class, "1.2.3.1", 0x0112)]
    )
    assert outbox.job_summary(job) == {OutboxState.DELIVERED: 1, OutboxState.COMMITTING: 2}  # fail_row is the sender's
    assert failures == [("1.2.3.1", "TPS did not commit RT Structure Set Storage: no such object instance (0x0112)")]
    assert commitments.wait_settled([rows[0]], 0.1)
    assert not commitments.wait_settled([rows[2]], 0.1)


@pytest.mark.slow
def test_a_report_on_the_sending_association_settles_the_rows_before_release(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    """Node to node: the receiving node reports on the association that asked (its SCP's way),
    and the sending node reads it there, while it waits before releasing."""
    callers = [{"ae_title": t} for t in ("STORESCU", "ECHOSCU", "IE_GATEWAY")]
    receiver = node_factory("receiver", settings={"node": {"allowed_callers": callers}}).start()
    sender = node_factory(
        "sender",
        settings={
            "models_dir": str(toy_models(tmp_path / "models")),
            "destinations": {
                "TPS": {
                    "ae_title": "IE_GATEWAY",
                    "host": "127.0.0.1",
                    "port": receiver.port,
                    "commitment": True,
                    "commitment_wait_s": 10,
                }
            },
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
            "inference": {"timeout_s": 120},
        },
        rules=RULES,
    ).start()
    assert storescu(sender.port, small_series).returncode == 0
    [job] = sender.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    # the receiving node never opens an association: every report it answered went back on the
    # association that asked, and the sender read it there
    asked = [e["event"] for e in sender.log_events()].count("storage commitment requested")
    assert asked >= 1
    # the receiver logs its answer once the sender has acknowledged the report
    wait_until(
        lambda: [e["event"] for e in receiver.log_events()].count("commitment answered") == asked,
        60,
        what="the receiver's log of its reports",
    )
    assert "commitment report not sent: the caller left" not in [e["event"] for e in receiver.log_events()]


def test_a_peer_without_storage_commitment_fails_those_files_at_once(tmp_path: Path, small_series: list[Path]) -> None:
    """dcmtk's storescp stores but offers no Storage Commitment: the file is not sent (it could
    never be committed) and the reason is named, without retries."""
    import shutil
    import subprocess

    from ie_gateway.config import DeliverySettings, Destination
    from ie_gateway.send import Sender
    from ie_gateway.store import Store
    from ie_gateway.store.outbox import Outbox
    from ie_gateway.vocab import OutboxState
    from tests.peers import DCMTK_ENV, port_open
    from tests.test_notify import routed_job

    port = free_port()
    (tmp_path / "scp").mkdir()
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "TPS", "-od", str(tmp_path / "scp"), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), 30, what="storescp")
        store = Store(tmp_path / "var")
        job = routed_job(store)
        shutil.copy(small_series[0], store.results / "ct.dcm")
        ct = pydicom.dcmread(small_series[0], stop_before_pixels=True)
        outbox = Outbox(store.index)
        outbox.enqueue(job, "TPS", "ct.dcm", ct.SOPInstanceUID, ct.SOPClassUID)
        tps = Destination(ae_title="TPS", host="127.0.0.1", port=port, commitment=True)
        sender = Sender({"TPS": tps}, DeliverySettings(), outbox, store.results)
        assert [f.result() for f in sender.deliver_due()] == [0]  # not sent: it could never be committed
        sender.close()
        [row] = outbox.job_rows(job)
        assert row.state is OutboxState.FAILED  # dead-lettered at once
        assert row.last_error == "TPS does not offer Storage Commitment (refused at association)"
        assert list((tmp_path / "scp").iterdir()) == []
    finally:
        scp.terminate()
        scp.wait()
