"""STOW-RS into the node (`POST /dicomweb/studies`) by dicomweb-client, as a DICOMweb service or
archive would upload: stored byte for byte like a C-STORE, only for callers with a token, part
by part refused with a reason, and routed and delivered like any series."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from dicomweb_client.api import DICOMwebClient

from tests.peers import Node, Orthanc
from tests.test_pipeline import make_node, orthanc_instances

pytestmark = pytest.mark.peer

TOKEN = "stow-token-for-tests"
CALLERS = {"http": {"stow_callers": [{"name": "PACS_WEB", "token": "env:STOW_TOKEN"}]}}


def client(node: Node, token: str = TOKEN) -> DICOMwebClient:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    web = DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicomweb", session=session)
    web.set_http_retry_params(retry=False)
    return web


def stow_node(node_factory: Any) -> Node:
    node: Node = node_factory(settings=CALLERS, env={"STOW_TOKEN": TOKEN})
    return node.start()


def test_stow_rs_stores_each_instance_as_sent_and_makes_a_series_job(
    node_factory: Any, small_series: list[Path]
) -> None:
    node = stow_node(node_factory)
    files = small_series[:5]
    answer = client(node).store_instances([pydicom.dcmread(f) for f in files])
    stored = {i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence}
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert stored == {h.SOPInstanceUID for h in headers}
    assert "FailedSOPSequence" not in answer
    for f, h in zip(files, headers, strict=True):
        spooled = node.root / "spool" / h.StudyInstanceUID / h.SeriesInstanceUID / f"{h.SOPInstanceUID}.dcm"
        assert pydicom.dcmread(spooled).PixelData == pydicom.dcmread(f).PixelData
    [job] = node.wait_state({"unrouted"}, timeout=60)  # no rules: completed, then unrouted
    assert job["instances"] == 5


def test_stow_rs_needs_a_callers_token(node_factory: Any, small_series: list[Path]) -> None:
    node = stow_node(node_factory)
    with pytest.raises(requests.HTTPError) as caught:
        client(node, token="not-the-token").store_instances([pydicom.dcmread(small_series[0])])
    assert caught.value.response.status_code == 401
    assert node.jobs() == []


def test_a_part_that_is_not_dicom_is_refused_with_a_reason(node_factory: Any) -> None:
    node = stow_node(node_factory)
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + b"not a DICOM file"
    body += f"\r\n--{boundary}--\r\n".encode()
    rsp = requests.post(
        f"http://127.0.0.1:{node.http_port}/dicomweb/studies",
        data=body,
        timeout=30,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
    )
    assert rsp.status_code == 409  # nothing stored
    failed = rsp.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xC000]  # cannot understand


def test_parts_over_a_limit_are_refused_with_a_reason_and_the_rest_are_stored(
    node_factory: Any, small_series: list[Path]
) -> None:
    node: Node = node_factory(settings={**CALLERS, "limits": {"max_slices": 3}}, env={"STOW_TOKEN": TOKEN})
    node.start()
    sent = [pydicom.dcmread(f) for f in small_series[:5]]
    answer = client(node).store_instances(sent)
    assert len(answer.ReferencedSOPSequence) == 3  # the series' count grows part by part
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [0xA702, 0xA702]  # as the C-STORE status
    assert [i.ReferencedSOPInstanceUID for i in answer.FailedSOPSequence] == [d.SOPInstanceUID for d in sent[3:]]
    refusals = [e for e in node.log_events() if e["event"] == "stow instance refused"]
    assert [(e["limit"], e["value"], e["allowed"]) for e in refusals] == [("limits.max_slices", 4, 3)] * 2


def test_a_request_declaring_more_than_stow_max_mb_is_refused_before_its_body_is_read(node_factory: Any) -> None:
    node: Node = node_factory(settings={"http": {**CALLERS["http"], "stow_max_mb": 1}}, env={"STOW_TOKEN": TOKEN})
    node.start()
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
    conn.putrequest("POST", "/dicomweb/studies")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
    conn.putheader("Content-Length", str(2**31))
    conn.endheaders()  # no byte of the body follows: a server that waited for it would time out
    rsp = conn.getresponse()
    assert rsp.status == 413
    assert b"http.stow_max_mb (1 MB)" in rsp.read()
    conn.close()


@pytest.mark.slow
def test_a_series_uploaded_by_stow_rs_is_contoured_and_delivered(
    node_factory: Any, orthanc: Orthanc, small_series: list[Path], tmp_path: Path
) -> None:
    node = make_node(node_factory, tmp_path, orthanc.dicom_port)
    settings = yaml.safe_load(node.config.read_text())
    node.config.write_text(yaml.safe_dump({**settings, "http": {**settings["http"], **CALLERS["http"]}}))
    node.env["STOW_TOKEN"] = TOKEN
    node.start()
    client(node).store_instances([pydicom.dcmread(f) for f in small_series])
    [job] = node.wait_state({"delivered", "failed", "refused"}, timeout=180)
    assert job["state"] == "delivered", job
    assert len(orthanc_instances(orthanc, "RTSTRUCT")) == 1
