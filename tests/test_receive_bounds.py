"""Nothing a peer sends makes the node hold more than its limits: headers checked against
`limits:`, oversized PDUs refused unread, data sets streamed to disk, UIDs matched whole, and a
re-sent instance with other bytes kept beside the first."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from ie_gateway import reactor
from ie_gateway.interop.commitment import COMMITMENT_INSTANCE, STORAGE_COMMITMENT
from ie_gateway.receive import MAX_MESSAGE_IN_MEMORY
from tests.flood import HUGE_REQUEST, big_instance, memory_mb, reset_peak
from tests.peers import DCMTK_ENV, REPO, Node, storescu, wait_until
from tests.test_receive import spooled

pytestmark = pytest.mark.peer

MIB = 2**20


def refused_for(node: Node, limit: str) -> bool:
    return any(e["event"] == "instance refused" and e.get("limit") == limit for e in node.log_events())


def indexed(node: Node) -> dict[str, str]:
    """SOP Instance UID → spool-relative path of the copy the index uses."""
    with sqlite3.connect(node.root / "index.sqlite3") as db:
        return dict(db.execute("SELECT sop_uid, path FROM instances").fetchall())


def send_raw(port: int, path: Path, sop_class: str, syntax: str) -> pydicom.Dataset:
    """C-STORE a file's data set byte for byte, as pynetdicom reads it from disk (unlike storescu
    or a decoded pydicom data set, nothing tidies its values on the way)."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, syntax)
    assoc = reactor.associate(ae, "127.0.0.1", port, ae_title="IE_GATEWAY")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def test_instance_over_max_rows_is_refused_and_nothing_is_stored(
    node_factory: object, small_series: list[Path]
) -> None:
    node: Node = node_factory(settings={"limits": {"max_rows": 128}}).start()  # type: ignore[operator]
    result = storescu(node.port, small_series[:1], extra=["-v"])  # 256 x 256 pixels
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr
    assert spooled(node) == {}
    assert refused_for(node, "limits.max_rows")


def test_series_is_refused_from_the_instance_past_max_slices(node_factory: object, small_series: list[Path]) -> None:
    node: Node = node_factory(settings={"limits": {"max_slices": 5}}).start()  # type: ignore[operator]
    result = storescu(node.port, small_series[:8], extra=["-v"])
    assert result.stderr.count("Received Store Response (Success)") == 5
    assert result.stderr.count("Refused: OutOfResources") == 1  # storescu stops at a refusal
    assert len(spooled(node)) == 5
    assert refused_for(node, "limits.max_slices")


def test_deflated_instance_within_the_limits_is_stored_as_sent(
    node: Node, small_series: list[Path], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(small_series[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    rsp = send_raw(node.port, deflated, CTImageStorage, DeflatedExplicitVRLittleEndian)
    assert rsp.Status == 0x0000
    [stored] = spooled(node).values()
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    [row] = node.wait_state({"complete", "unrouted"})
    assert row["modality"] == "CT"  # the header routing reads came from the inflated data set


def test_deflated_instance_inflating_past_max_instance_mb_is_refused(
    node_factory: object, small_series: list[Path], tmp_path: Path
) -> None:
    node: Node = node_factory(settings={"limits": {"max_instance_mb": 1}}).start()  # type: ignore[operator]
    ds = pydicom.dcmread(small_series[0])
    ds.Rows = ds.Columns = 1024
    ds.PixelData = bytes(1024 * 1024 * 2)  # 2 MiB of zeros: a few KiB once deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb = tmp_path / "deflated.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    assert bomb.stat().st_size < 64 * 1024
    rsp = send_raw(node.port, bomb, CTImageStorage, DeflatedExplicitVRLittleEndian)
    assert rsp.Status == 0xA702
    assert "max_instance_mb" in rsp.ErrorComment
    assert spooled(node) == {}
    assert refused_for(node, "limits.max_instance_mb")


def test_uid_ending_in_a_newline_is_refused_and_no_file_is_written(
    node: Node, small_series: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(small_series[0])
    uid = "1.2.826.0.1.3680043.8.498.123456789"  # odd length: encoded with one NUL of padding
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = tmp_path / "newline.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(uid.encode() + b"\x00", uid.encode() + b"\n"))  # meta and data set
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes, not a re-encoding
    rsp = send_raw(node.port, path, CTImageStorage, ExplicitVRLittleEndian)
    assert rsp.Status == 0xC211
    assert "not a valid UID" in rsp.ErrorComment
    assert spooled(node) == {}
    assert not list((node.root / "spool").rglob(f"{uid}*"))


def test_resent_instance_with_other_bytes_is_kept_beside_the_first_and_flagged(
    node_factory: object, small_series: list[Path], tmp_path: Path
) -> None:
    node: Node = node_factory(settings={"series": {"stable_after_s": 600}}).start()  # type: ignore[operator]
    assert storescu(node.port, small_series[:2]).returncode == 0
    assert storescu(node.port, small_series[:1]).returncode == 0  # the same bytes again: idempotent
    assert len(list((node.root / "spool").rglob("*.dcm"))) == 2
    corrected = pydicom.dcmread(small_series[0])
    corrected.PatientName = "CORRECTED^NAME"
    resent = tmp_path / "corrected.dcm"
    corrected.save_as(resent, enforce_file_format=True)
    assert storescu(node.port, [resent]).returncode == 0
    sop = corrected.SOPInstanceUID
    copies = sorted((node.root / "spool").rglob(f"{sop}*.dcm"))
    assert len(copies) == 2  # the first copy kept, the later one beside it
    first = next(p for p in copies if p.name == f"{sop}.dcm")
    used = node.root / "spool" / indexed(node)[sop]
    assert used in copies and used != first  # the job uses the later copy
    assert str(pydicom.dcmread(used, stop_before_pixels=True).PatientName) == "CORRECTED^NAME"
    assert str(pydicom.dcmread(first, stop_before_pixels=True).PatientName) != "CORRECTED^NAME"
    [row] = node.jobs()  # the rows `status --json` prints
    assert row["replaced_instances"] == 1 and row["instances"] == 2
    code, page = node.http_get(f"/jobs/{row['id']}")  # the admin page, read without signing in
    assert code == 200 and b"sent again with other bytes" in page
    assert any(e["event"] == "instance sent again with other bytes" for e in node.log_events())


def data_set_size(path: Path) -> int:
    """Bytes after the file meta information (whose own length depends on who wrote it)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return path.stat().st_size - (128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))


def flood(port: int, peers: int, mib: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.flood", str(port), str(peers), str(mib), str(seconds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_20_flooding_peers_leave_memory_bounded_while_a_series_is_received(
    node: Node, small_series: list[Path]
) -> None:
    assert node.proc is not None
    idle = memory_mb(node.proc.pid)["VmRSS"]
    reset_peak(node.proc.pid)
    flooding = flood(node.port, peers=20, mib=40, seconds=4)
    sent = storescu(node.port, small_series)
    report = json.loads(flooding.communicate(timeout=60)[0])
    growth = memory_mb(node.proc.pid)["VmHWM"] - idle
    assert sent.returncode == 0, sent.stderr
    assert len(indexed(node)) == len(small_series)
    assert report["closed_by_node"] >= 20  # every flooding connection is hung up on, unread
    assert growth <= 100, f"node grew {growth:.0f} MiB under {report}"
    assert any(e["event"] == "connection refused" and e.get("limit_bytes") == 64 * 1024 for e in node.log_events())


def refused_pdu(node: Node, pdu_type: str, limit: int) -> bool:
    return any(
        e["event"] == "connection refused" and e.get("pdu_type") == pdu_type and e.get("limit_bytes") == limit
        for e in node.log_events()
    )


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_oversized_association_request_sent_in_pieces_is_refused_unread(node: Node) -> None:
    # the header in two pieces passes the listener's first look; pynetdicom's read refuses it
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(HUGE_REQUEST[:2])
        time.sleep(0.5)  # shaping the traffic (the header split across reads), not synchronisation
        sock.sendall(HUGE_REQUEST[2:] + bytes(1 << 20))
        sock.settimeout(20)
        assert closed_by_peer(sock)
    assert refused_pdu(node, "0x01", 64 * 1024)


def test_p_data_longer_than_max_pdu_aborts_the_association(node_factory: object) -> None:
    node: Node = node_factory(settings={"node": {"max_pdu_kb": 64}}).start()  # type: ignore[operator]
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
    assert assoc.is_established and assoc.acceptor.maximum_length == 64 * 1024
    raw = assoc.dul.socket.socket  # an allowed caller that ignores the maximum it was told
    raw.sendall(b"\x04\x00" + struct.pack(">L", 16 * MIB) + bytes(1 << 20))
    wait_until(lambda: not assoc.is_alive(), 20, what="the association to end")
    assert refused_pdu(node, "0x04", 64 * 1024)


@pytest.mark.slow
@pytest.mark.parametrize("in_header", [False, True], ids=["in its pixel data", "in a header value"])
def test_a_256_mib_instance_is_received_with_bounded_memory(node: Node, tmp_path: Path, in_header: bool) -> None:
    path = big_instance(tmp_path, 256, in_header)
    assert node.proc is not None
    idle = memory_mb(node.proc.pid)["VmRSS"]
    reset_peak(node.proc.pid)
    result = storescu(node.port, [path])
    growth = memory_mb(node.proc.pid)["VmHWM"] - idle
    assert result.returncode == 0, result.stderr
    [stored] = spooled(node).values()
    assert data_set_size(stored) == data_set_size(path)  # the whole data set, as sent
    assert growth <= 100, f"node grew {growth:.0f} MiB receiving {path.stat().st_size / MIB:.0f} MiB"


def test_a_c_store_cut_off_mid_transfer_leaves_no_temp_file_behind(node_factory: object, tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    node = node_factory(settings={"node": {"network_timeout_s": 2}}, env={"TMPDIR": str(temp)}).start()  # type: ignore[operator]
    path = big_instance(tmp_path, 256)
    sender = subprocess.Popen(["storescu", "-aec", "IE_GATEWAY", "127.0.0.1", str(node.port), str(path)],
                              env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def receiving() -> list[Path]:
        return [f for f in temp.glob("*.dcm") if f.stat().st_size > 16 * MIB]

    [partial] = wait_until(receiving, 60, every=0.01, what="the data set arriving in a temp file")
    sender.kill()
    sender.wait()
    wait_until(lambda: any(e["event"] == "association closed" and e["how"] == "aborted" for e in node.log_events()),
               30, what="the node ending the cut-off association")
    assert partial.exists()  # the handler never ran: nothing took the file
    hour_ago = time.time() - 3600
    os.utime(partial, (hour_ago, hour_ago))  # as it stands once no write has come for an hour
    wait_until(lambda: not partial.exists(), 30, what="the abandoned temp file removed")
    [removed] = [e for e in node.log_events() if e["event"] == "abandoned receipts removed"]
    assert removed["files"] == 1 and removed["mbytes"] >= 16
    assert spooled(node) == {}  # nothing of it was stored either


def _cut_off(node: Node) -> list[dict[str, object]]:
    return [e for e in node.log_events() if e["event"] == "association cut off"]


def test_a_data_set_longer_than_max_instance_mb_is_cut_off_as_it_passes_the_limit(
    node_factory: object, tmp_path: Path
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    node: Node = node_factory(  # type: ignore[operator]
        settings={"limits": {"max_instance_mb": 2}}, env={"TMPDIR": str(temp)}
    ).start()
    path = big_instance(tmp_path, 16)
    storescu(node.port, [path])
    [event] = wait_until(lambda: _cut_off(node), 30, what="the association cut off")
    assert event["limit"] == "limits.max_instance_mb"
    [partial] = temp.glob("*.dcm")  # what had come when it was cut off: the limit and a PDU at most
    assert partial.stat().st_size <= 2 * MIB + 256 * 1024 + 4096
    assert spooled(node) == {}


def test_a_storage_commitment_request_longer_than_the_node_holds_in_memory_is_cut_off(node: Node) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = reactor.associate(ae, "127.0.0.1", node.port, ae_title="IE_GATEWAY")
    assert assoc.is_established
    info = pydicom.Dataset()
    info.TransactionUID = pydicom.uid.generate_uid()
    info.add_new(0x00091010, "OB", bytes(MAX_MESSAGE_IN_MEMORY + MIB))  # pynetdicom gathers this in memory
    try:
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
    finally:
        assoc.release()
    assert not status  # no answer: the connection was closed
    [event] = wait_until(lambda: _cut_off(node), 30, what="the association cut off")
    assert event["limit"] == "a data set other than a C-STORE's"
