"""The node receives series durably from dcmtk's storescu, as a PACS would send them."""

from __future__ import annotations

import json
import resource
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ie_gateway import reactor
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.log import uid_hash
from tests.conftest import dcm_compress
from tests.peers import DCMTK_ENV, Node, echoscu, storescu, wait_until

pytestmark = pytest.mark.peer


def spooled(node: Node) -> dict[str, Path]:
    """SOP Instance UID → file, for every instance file in the node's spool."""
    files = {}
    for path in (node.root / "spool").rglob("*.dcm"):
        files[path.stem] = path
    return files


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information: what the sender encoded."""
    raw = path.read_bytes()
    meta_len = pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    return raw[128 + 4 + 12 + meta_len:]


def test_echo_is_answered_with_status_success(node: Node) -> None:
    """The node fixture already waited for an echo to work; this reads the status it answered."""
    result = subprocess.run(["/usr/bin/echoscu", "-v", "-aet", "ECHOSCU", "-aec", "IE_GATEWAY", "127.0.0.1",
                             str(node.port)], capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert result.returncode == 0
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_unknown_calling_ae_is_rejected_at_association(node: Node) -> None:
    result = echoscu(node.port, calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr
    assert any(e["event"] == "association refused" and e["calling_ae"] == "INTRUDER" for e in node.log_events())


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    result = echoscu(node.port, called="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_caller_from_another_host_is_rejected(node_factory: object) -> None:
    node = node_factory(settings={"node": {"allowed_callers": [{"ae_title": "ECHOSCU", "host": "10.9.9.9"}]}})  # type: ignore[operator]
    node.start(echo=False)  # echoscu is refused from 127.0.0.1 by this very rule
    result = echoscu(node.port)
    assert "Calling AE Title Not Recognized" in result.stderr


@pytest.mark.slow
def test_200_slice_series_lands_complete_and_byte_identical(node: Node, full_series: list[Path]) -> None:
    result = storescu(node.port, full_series)
    assert result.returncode == 0, result.stderr
    [job] = node.wait_state({"complete", "unrouted"})
    assert job["instances"] == 200
    files = spooled(node)
    assert len(files) == 200
    for src in full_series:
        sop = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(files[sop]) == dataset_bytes(src)


def test_four_senders_at_once_have_each_acknowledged_instance_on_disk_and_indexed(
        node: Node, tmp_path: Path) -> None:
    # four scanners at once: their instances are made durable and indexed in shared batches
    folders = []
    for seed in range(4):
        folder = tmp_path / f"series{seed}"
        write_ct_series(make_phantom(40 + seed, slices=12, size=64, pixel_mm=7.8, slice_mm=5.0), folder, seed=40 + seed)
        folders.append(folder)
    senders = [subprocess.Popen(["storescu", "-v", "-aet", "STORESCU", "-aec", "IE_GATEWAY", "-R", "+sd", "+r",
                                 "127.0.0.1", str(node.port), str(folder)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)
               for folder in folders]
    acked = []
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output
        acked += _acknowledged_files(output)
    assert len(acked) == 48
    files = spooled(node)
    with sqlite3.connect(node.root / "index.sqlite3", timeout=5) as db:
        indexed = {row[0]: row[1] for row in db.execute("SELECT sop_uid, path FROM instances")}
    for path in acked:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert indexed[sop] == str(files[sop].relative_to(node.root / "spool"))
        assert dataset_bytes(files[sop]) == dataset_bytes(path)
    assert len(indexed) == 48


def test_series_completes_only_after_the_quiet_period(node_factory: object, small_series: list[Path]) -> None:
    node = node_factory(settings={"series": {"stable_after_s": 3.0}}).start()  # type: ignore[operator]
    assert storescu(node.port, small_series).returncode == 0
    receiving = node.status()
    assert [r["state"] for r in receiving] == ["receiving"]
    [job] = node.wait_state({"complete", "unrouted"}, timeout=120)
    assert job["instances"] == len(small_series)
    assert any(e["event"] == "series complete" for e in node.log_events())


@pytest.mark.parametrize(
    ("tool", "propose", "syntax"),
    [(["dcmcjpeg", "+e1"], "-xs", JPEGLosslessSV1), (["dcmcrle"], "-xr", RLELossless)],
    ids=["jpeg-lossless-sv1", "rle"],
)
def test_compressed_series_is_accepted_as_it_arrives(node: Node, small_series: list[Path], tmp_path: Path,
                                                     tool: list[str], propose: str, syntax: str) -> None:
    compressed = dcm_compress(small_series, tmp_path / "compressed", tool)
    result = storescu(node.port, compressed, extra=[propose])
    assert result.returncode == 0, result.stderr
    node.wait_state({"complete", "unrouted"})
    stored = spooled(node)
    assert len(stored) == len(compressed)
    for path in stored.values():
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax


def send_one(port: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    """C-STORE one data set with pynetdicom (a peer that, unlike storescu, sends anything)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
    assoc = reactor.associate(ae, "127.0.0.1", port, ae_title="IE_GATEWAY")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


@pytest.mark.parametrize(("keyword", "hostile"), [
    ("SOPInstanceUID", "../../../../tmp/owned"),
    ("StudyInstanceUID", "1.2.3/../../../../tmp"),
    ("SeriesInstanceUID", "1." + "2" * 70),
], ids=["sop-path", "study-path", "series-too-long"])
def test_hostile_uid_is_refused_and_nothing_is_written_outside_the_spool(
        node: Node, small_series: list[Path], tmp_path: Path, keyword: str, hostile: str) -> None:
    ds = pydicom.dcmread(small_series[0])
    setattr(ds, keyword, hostile)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = hostile
    before = set(tmp_path.rglob("*"))
    rsp = send_one(node.port, ds)
    assert rsp.Status == 0xC211
    assert "not a valid UID" in rsp.ErrorComment
    after = set(tmp_path.rglob("*")) - before
    assert not [p for p in after if p.suffix in (".dcm", ".part") or "owned" in p.name]
    assert not Path("/tmp/owned.dcm").exists()
    assert spooled(node) == {}


def test_truncated_data_set_is_refused_with_cannot_understand(node: Node, small_series: list[Path],
                                                                tmp_path: Path) -> None:
    # a valid file meta, then a data set cut off right after its SOP Instance UID;
    # pynetdicom sends a file path's data set as it is, without decoding it
    src = small_series[0]
    raw = src.read_bytes()
    body = dataset_bytes(src)
    sop = body.find(b"\x08\x00\x18\x00")  # (0008,0018) SOP Instance UID, explicit VR LE
    end = len(raw) - len(body) + sop + 8 + int.from_bytes(body[sop + 6:sop + 8], "little")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(raw[:end])
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
    assert assoc.is_established
    rsp = assoc.send_c_store(broken)
    assoc.release()
    assert rsp.Status == 0xC210
    assert "truncated or corrupt" in rsp.ErrorComment
    assert spooled(node) == {}


def _limit_file_size() -> None:
    # A real storage failure: writes past 200 KiB fail with EFBIG (the signal is ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))


def test_storage_failure_mid_receive_is_never_acknowledged_and_leaves_nothing_visible(
        node_factory: object, full_series: list[Path]) -> None:
    # The data set is written to a file as it arrives: the write fails while the instance is
    # still coming in, and pynetdicom aborts the association (the sender sends again later).
    node = node_factory(preexec=_limit_file_size).start()  # type: ignore[operator]
    result = storescu(node.port, full_series[:3], extra=["-v"])
    assert "Peer Aborted Association" in result.stderr
    assert "Received Store Response (Success)" not in result.stderr
    assert spooled(node) == {}
    assert list((node.root / "spool" / ".tmp").iterdir()) == []


def acknowledged(storescu_output: str) -> int:
    return storescu_output.count("Received Store Response (Success)")


@pytest.mark.slow
def test_kill_9_mid_send_keeps_every_acknowledged_instance(node_factory: object, full_series: list[Path]) -> None:
    node = node_factory().start()  # type: ignore[operator]
    sender = subprocess.Popen(["storescu", "-v", "-aet", "STORESCU", "-aec", "IE_GATEWAY", "-R",
                               "127.0.0.1", str(node.port), *map(str, full_series)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)
    index = node.root / "index.sqlite3"
    wait_until(lambda: _count_instances(index) >= 60, 120, what="60 instances indexed")
    node.kill9()
    output, _ = sender.communicate(timeout=120)
    acked_files = _acknowledged_files(output)
    # an instance is indexed before its Success goes out, and storescu sends the next only after
    # the response: the kill can catch the 60th between the two, never more than one
    assert 59 <= len(acked_files) < len(full_series)
    node.start()
    node.wait_state({"complete", "unrouted"})
    stored = spooled(node)
    for path in acked_files:
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in stored
    # the sender retries the whole series: duplicates are idempotent, the series ends complete
    assert storescu(node.port, full_series).returncode == 0
    rows = node.wait_state({"complete", "unrouted"}, count=2)
    assert max(r["instances"] for r in rows) == 200
    assert len(spooled(node)) == 200


def _count_instances(index: Path) -> int:
    if not index.exists():
        return 0
    with sqlite3.connect(index, timeout=5) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def _acknowledged_files(output: str) -> list[Path]:
    files, current = [], None
    for line in output.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            files.append(current)
            current = None
    return files


def test_late_instance_is_kept_and_opens_a_new_job(node: Node, small_series: list[Path]) -> None:
    assert storescu(node.port, small_series[:-1]).returncode == 0
    [first] = node.wait_state({"complete", "unrouted"})
    assert first["instances"] == len(small_series) - 1
    assert storescu(node.port, small_series[-1:]).returncode == 0
    rows = node.wait_state({"complete", "unrouted"}, count=2)
    assert sorted(r["instances"] for r in rows) == [len(small_series) - 1, len(small_series)]
    assert len(spooled(node)) == len(small_series)
    assert any(e["event"] == "late instance opened a new job" for e in node.log_events())


def test_restart_reconciles_spool_and_index(node_factory: object, small_series: list[Path]) -> None:
    node = node_factory(settings={"series": {"stable_after_s": 600}}).start()  # type: ignore[operator]
    assert storescu(node.port, small_series[:-1]).returncode == 0
    node.stop()
    files = spooled(node)
    gone = next(iter(files.values()))
    gone.unlink()
    src = small_series[-1]
    orphan = next(iter(files.values())).parent / (pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID + ".dcm")
    orphan.write_bytes(src.read_bytes())
    (node.root / "spool" / ".tmp" / "crashed.part").write_bytes(b"half")
    node.start()
    summary = next(e for e in node.log_events() if e["event"] == "spool recovered" and e.get("adopted"))
    assert (summary["temp_removed"], summary["adopted"], summary["missing"]) == (1, 1, 1)
    assert list((node.root / "spool" / ".tmp").iterdir()) == []
    [row] = node.status()
    assert row["state"] == "receiving" and row["instances"] == len(small_series)
    assert row["missing_instances"] is True


def test_logs_carry_no_patient_data(node_factory: object, tmp_path: Path) -> None:
    from ie_gateway.demo.phantoms import make_phantom, write_ct_series
    files = write_ct_series(make_phantom(5, slices=22, size=64, pixel_mm=8, slice_mm=5), tmp_path / "ct",
                            seed=5, patient_name="DOE^JANE", patient_id="MRN123456")
    node = node_factory().start()  # type: ignore[operator]
    assert storescu(node.port, files).returncode == 0
    node.wait_state({"complete", "unrouted"})
    node.stop()
    text = node.log_text()
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    for secret in ("DOE", "JANE", "MRN123456", ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
        assert secret not in text
    status_text = json.dumps(node.status())
    for secret in ("DOE", "MRN123456", ds.SeriesInstanceUID, ds.StudyInstanceUID):
        assert secret not in status_text
    assert uid_hash(ds.SeriesInstanceUID) in status_text


def test_status_json_has_the_documented_keys(node: Node, small_series: list[Path]) -> None:
    assert storescu(node.port, small_series).returncode == 0
    [row] = node.wait_state({"complete", "unrouted"})
    assert {"id", "state", "instances", "model", "model_version", "reason"} <= set(row)
    assert isinstance(row["id"], int)


def test_systemd_ready_and_watchdog_notifications(node_factory: object, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    node = node_factory(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}).start()  # type: ignore[operator]
    messages = set()
    while not {"READY=1", "WATCHDOG=1"} <= messages:
        messages |= set(sock.recv(4096).decode().split("\n"))
    sock.close()
    assert node.proc is not None and node.proc.poll() is None
