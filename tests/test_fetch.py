"""Query/retrieve: `ie-gateway fetch --source PACS --study UID` has Orthanc (the PACS) C-MOVE a
study to the node, which takes it in like any sent series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.peers import Node, Orthanc, free_port, storescu

pytestmark = pytest.mark.peer


def pacs_and_node(node_factory: Any, tmp_path: Path) -> tuple[Orthanc, Node]:
    """Orthanc as the PACS, knowing the node as a move destination; the node knowing the PACS."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "pacs", ae_title="PACS")
    settings = json.loads(pacs.config.read_text())
    settings["DicomModalities"] = {"gateway": ["IE_GATEWAY", "127.0.0.1", node_port]}
    pacs.config.write_text(json.dumps(settings))
    pacs.start()
    node = node_factory(
        port=node_port,
        settings={"sources": {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}}},
    )
    return pacs, node


def test_fetch_moves_a_study_from_the_pacs_into_the_node(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    pacs, node = pacs_and_node(node_factory, tmp_path)
    try:
        assert storescu(pacs.dicom_port, small_series, called="PACS").returncode == 0
        node.start()
        study = pydicom.dcmread(small_series[0], stop_before_pixels=True).StudyInstanceUID
        result = node.cli("fetch", "--source", "PACS", "--study", study)
        assert f"{len(small_series)} instances sent by PACS" in result.stdout
        [job] = node.wait_state({"unrouted"}, timeout=60)  # no rules here: complete, then unrouted
        assert job["instances"] == len(small_series)
    finally:
        pacs.stop()


def test_fetch_names_what_is_wrong(node_factory: Any, tmp_path: Path) -> None:
    pacs, node = pacs_and_node(node_factory, tmp_path)
    pacs.stop()  # the PACS is down
    unknown = node.cli("fetch", "--source", "RIS", "--study", "1.2.3", check=False)
    assert unknown.returncode == 1 and "no source 'RIS' in the config (sources: PACS)" in unknown.stderr
    down = node.cli("fetch", "--source", "PACS", "--study", "1.2.3", check=False)
    assert down.returncode == 1 and "PACS: association not possible" in down.stderr
    bad = node.cli("fetch", "--source", "PACS", "--study", "1.2/../3", check=False)
    assert bad.returncode == 1 and "StudyInstanceUID" in bad.stderr


def test_fetch_finds_a_patients_studies_then_moves_them(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    pacs, node = pacs_and_node(node_factory, tmp_path)
    try:
        assert storescu(pacs.dicom_port, small_series, called="PACS").returncode == 0
        node.start()
        ct = pydicom.dcmread(small_series[0], stop_before_pixels=True)
        none = node.cli("fetch", "--source", "PACS", "--patient", ct.PatientID, "--modality", "MR")
        assert "PACS holds no study that matches" in none.stdout
        found = node.cli(
            "fetch", "--source", "PACS", "--patient", ct.PatientID, "--modality", "CT", "--since", "1990-01-01"
        )
        assert f"{len(small_series)} instances sent by PACS" in found.stdout
        [job] = node.wait_state({"unrouted"}, timeout=60)
        assert job["instances"] == len(small_series)
    finally:
        pacs.stop()
