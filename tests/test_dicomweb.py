"""DICOMweb destinations: STOW-RS to Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb),
with HTTP basic authentication; the outbox's outcomes (delivered, retried, dead-lettered)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from ie_gateway.config import Destination
from ie_gateway.errors import DeliveryError, StowRefused
from ie_gateway.interop.dicomweb import StowClient
from tests.peers import Orthanc, free_port, storescu
from tests.test_pipeline import orthanc_instances, toy_models

pytestmark = pytest.mark.peer

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "gateway", "s3cret-for-tests"


def dicomweb_orthanc(folder: Path) -> Orthanc:
    """Orthanc serving DICOMweb at /dicom-web/, for one user with a password."""
    server = Orthanc(folder, ae_title="ARCHIVE")
    settings = json.loads(server.config.read_text())
    settings.update(
        {
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
        }
    )
    server.config.write_text(json.dumps(settings))
    return server


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Orthanc]:
    if not PLUGIN.exists():
        pytest.fail("Orthanc's DICOMweb plugin is missing: apt-get install orthanc-dicomweb")
    server = dicomweb_orthanc(tmp_path / "archive")
    # Orthanc's REST calls need the user too: the helpers' urllib requests carry it
    import urllib.request

    handler = urllib.request.HTTPBasicAuthHandler(urllib.request.HTTPPasswordMgrWithDefaultRealm())
    handler.passwd.add_password(None, f"http://127.0.0.1:{server.http_port}/", USER, PASSWORD)  # type: ignore[union-attr]
    urllib.request.install_opener(urllib.request.build_opener(handler))
    server.start()
    yield server
    server.stop()
    urllib.request.install_opener(urllib.request.build_opener())


def destination(port: int, password: str = "env:ARCHIVE_PASSWORD") -> Destination:
    return Destination(
        protocol="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web", auth="basic", username=USER, password=password
    )


def test_stow_rs_stores_the_file_in_the_archive(
    archive: Orthanc, small_series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARCHIVE_PASSWORD", PASSWORD)
    client = StowClient("ARCHIVE", destination(archive.http_port), timeout_s=30)
    try:
        client.store(small_series[0])
    finally:
        client.close()
    [stored] = orthanc_instances(archive, "CT")
    assert stored["MainDicomTags"]["SOPInstanceUID"] == pydicom.dcmread(small_series[0]).SOPInstanceUID


def test_a_wrong_password_is_refused_for_good(
    archive: Orthanc, small_series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARCHIVE_PASSWORD", "wrong")
    client = StowClient("ARCHIVE", destination(archive.http_port), timeout_s=30)
    with pytest.raises(StowRefused, match="ARCHIVE refused the upload: HTTP 401 Unauthorized"):
        client.store(small_series[0])


def test_a_service_that_is_down_is_a_retriable_failure(
    small_series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARCHIVE_PASSWORD", PASSWORD)
    client = StowClient("ARCHIVE", destination(free_port()), timeout_s=5)
    with pytest.raises(DeliveryError, match="ARCHIVE: not reachable") as caught:
        client.store(small_series[0])
    assert not isinstance(caught.value, StowRefused)


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        ({"protocol": "dicomweb"}, "needs url"),
        ({"protocol": "dicomweb", "url": "http://x/dicom-web", "commitment": True}, "cannot ask for it"),
        (
            {
                "protocol": "dicomweb",
                "url": "http://x/dicom-web",
                "auth": "basic",
                "username": "u",
                "password": "plain",
            },
            "never hold the password",
        ),
        ({"ae_title": "TPS", "host": "127.0.0.1"}, "needs port"),
    ],
)
def test_a_destination_says_what_its_protocol_lacks(keys: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Destination.model_validate(keys)


@pytest.mark.slow
def test_the_node_delivers_its_results_over_stow_rs(
    node_factory: Any, archive: Orthanc, small_series: list[Path], tmp_path: Path
) -> None:
    rules = {
        "rules": [
            {
                "name": "thorax",
                "match": {"Modality": "CT"},
                "model": "toy-body",
                "outputs": ["rtstruct", "seg"],
                "send_to": ["ARCHIVE"],
            }
        ]
    }
    node = node_factory(
        rules=rules,
        env={"ARCHIVE_PASSWORD": PASSWORD},
        settings={
            "models_dir": str(toy_models(tmp_path / "models")),
            "destinations": {"ARCHIVE": destination(archive.http_port).model_dump(mode="json", exclude_defaults=True)},
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
            "inference": {"timeout_s": 120},
        },
    ).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed"}, timeout=180)
    assert job["state"] == "delivered", job
    assert len(orthanc_instances(archive, "RTSTRUCT")) == len(orthanc_instances(archive, "SEG")) == 1
    assert any(e.get("protocol") == "stow-rs" and e["event"] == "delivered" for e in node.log_events())


def test_fetch_finds_and_retrieves_a_study_over_dicomweb(
    node_factory: Any, archive: Orthanc, small_series: list[Path]
) -> None:
    """QIDO-RS finds the patient's CT studies at the archive, WADO-RS brings them into the spool."""
    assert storescu(archive.dicom_port, small_series, called="ARCHIVE").returncode == 0
    source = {
        "protocol": "dicomweb",
        "url": f"http://127.0.0.1:{archive.http_port}/dicom-web",
        "auth": "basic",
        "username": USER,
        "password": "env:ARCHIVE_PASSWORD",
    }
    node = node_factory(settings={"sources": {"ARCHIVE": source}}, env={"ARCHIVE_PASSWORD": PASSWORD}).start()
    ct = pydicom.dcmread(small_series[0], stop_before_pixels=True)
    result = node.cli("fetch", "--source", "ARCHIVE", "--patient", ct.PatientID, "--modality", "CT")
    assert f"{len(small_series)} instances sent by ARCHIVE" in result.stdout
    [job] = node.wait_state({"unrouted"}, timeout=60)
    assert job["instances"] == len(small_series)
