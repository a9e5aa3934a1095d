"""check-config catches what breaks a site before the node starts: exposure, storage, index,
ports, routes that cannot deliver, and (--echo) destinations that do not answer."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infer_packages import threshold_model, write_package
from tests.peers import DCMTK_ENV, free_port, port_open, wait_until
from tests.test_dicomweb import PASSWORD, PLUGIN, USER, dicomweb_orthanc


@pytest.fixture
def site(tmp_path: Path) -> Path:
    write_package(tmp_path / "models", [threshold_model(2)], name="toy", structures=1)
    (tmp_path / "var").mkdir()
    return tmp_path


def run_check(
    site: Path, settings: dict[str, Any] | None = None, rules: list[dict[str, Any]] | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    cfg: dict[str, Any] = {
        "node": {"bind": "127.0.0.1", "port": free_port(), "allowed_callers": [{"ae_title": "PACS"}]},
        "storage": {"root": "var"},
        "http": {"bind": "127.0.0.1", "port": free_port()},
        "routing_file": "routing.yaml",
        "models_dir": "models",
        "destinations": {
            "TPS": {
                "ae_title": "TPS",
                "host": "127.0.0.1",
                "port": free_port(),
                "accepts": ["rtstruct"],
                "connect_timeout_s": 3,
            }
        },
    }
    for key, value in (settings or {}).items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    (site / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    (site / "routing.yaml").write_text(yaml.safe_dump({"rules": rules or []}))
    return subprocess.run(
        [sys.executable, "-m", "ie_gateway.cli", "check-config", "--config", str(site / "gateway.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rule(outputs: list[str], sync: bool = False) -> dict[str, Any]:
    return {
        "name": "ct",
        "match": {"Modality": "CT"},
        "model": "toy",
        "outputs": outputs,
        "send_to": ["TPS"],
        "sync": sync,
    }


def test_a_route_whose_destination_accepts_none_of_its_outputs_is_an_error(site: Path) -> None:
    result = run_check(site, rules=[rule(["seg"])])
    assert result.returncode == 2
    assert "rules.ct: sends seg to TPS, which accepts only rtstruct: nothing would reach it" in result.stderr


def test_an_output_no_destination_takes_and_sync_while_sync_is_off_are_warnings(site: Path) -> None:
    result = run_check(site, rules=[rule(["rtstruct", "seg"], sync=True)])
    assert result.returncode == 0, result.stderr
    assert "rules.ct: makes seg but none of TPS accepts it" in result.stderr
    assert "rules.ct: sync: true, but sync.enabled is false" in result.stderr


def test_a_storage_root_that_is_no_folder_or_is_below_its_reserve_is_an_error(site: Path) -> None:
    (site / "var").rmdir()
    (site / "var").write_text("a file where the data disk should be mounted\n")
    assert "is not a folder" in run_check(site).stderr
    (site / "var").unlink()
    (site / "var").mkdir()
    full = run_check(site, {"storage": {"root": "var", "reserve": {"percent": 99.99}}})
    assert full.returncode == 2 and "below the reserve" in full.stderr


def test_an_index_that_does_not_answer_is_an_error(site: Path) -> None:
    url = f"postgresql://gw@127.0.0.1:{free_port()}/gw"  # nothing listens there
    result = run_check(site, {"storage": {"root": "var", "index": url}})
    assert result.returncode == 2
    assert "storage.index:" in result.stderr and "index unavailable" in result.stderr


def test_two_listeners_on_one_port_are_an_error_and_a_port_in_use_a_warning(site: Path) -> None:
    port = free_port()
    clash = run_check(site, {"node": {"port": port}, "http": {"port": port}})
    assert clash.returncode == 2 and f"http.port {port} is also node.port" in clash.stderr
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = run_check(site, {"node": {"port": busy}})
    assert result.returncode == 0, result.stderr
    assert f"node.port {busy} is in use on 127.0.0.1" in result.stderr


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "TPS", "-od", str(tmp_path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    try:
        wait_until(lambda: port_open(port), 30, what="storescp")
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.peer
def test_echo_reports_each_destination_and_fails_when_one_does_not_answer(site: Path, storescp: int) -> None:
    down = free_port()
    dests = {
        "TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": storescp, "connect_timeout_s": 3},
        "PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": down, "connect_timeout_s": 3},
    }
    result = run_check(site, {"destinations": dests}, None, "--echo")
    assert result.returncode == 1, result.stderr
    assert f"TPS: ok: TPS@127.0.0.1:{storescp}: echo ok" in result.stdout
    assert f"PACS: FAILED: PACS@127.0.0.1:{down}: not reachable" in result.stdout
    del dests["PACS"]
    assert run_check(site, {"destinations": dests}, None, "--echo").returncode == 0


@pytest.mark.peer
def test_echo_asks_a_dicomweb_destination_by_qido_rs_with_its_credentials(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not PLUGIN.exists():
        pytest.fail("Orthanc's DICOMweb plugin is missing: apt-get install orthanc-dicomweb")
    archive = dicomweb_orthanc(tmp_path / "archive").start()
    try:
        url = f"http://127.0.0.1:{archive.http_port}/dicom-web"
        dest = {"protocol": "dicomweb", "url": url, "auth": "basic", "username": USER,  # in place of the DICOM TPS
                "password": "env:ARCHIVE_PASSWORD", "connect_timeout_s": 3}
        monkeypatch.setenv("ARCHIVE_PASSWORD", PASSWORD)
        answered = run_check(site, {"destinations": {"TPS": dest}}, None, "--echo")
        assert answered.returncode == 0, answered.stdout + answered.stderr
        assert f"TPS: ok: {url}: QIDO-RS ok" in answered.stdout
        monkeypatch.setenv("ARCHIVE_PASSWORD", "not-the-password")
        refused = run_check(site, {"destinations": {"TPS": dest}}, None, "--echo")
        assert refused.returncode == 1
        assert f"TPS: FAILED: {url}: QIDO-RS answered HTTP 401 Unauthorized" in refused.stdout
    finally:
        archive.stop()
