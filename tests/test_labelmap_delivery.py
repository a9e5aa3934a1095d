"""A route's `seg_encoding: labelmap` with real peers: Orthanc gets a LABELMAP SEG where the
destination says it takes one, a BINARY SEG elsewhere, and a peer refusing the LABELMAP SOP
class is named in the job's reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import RLELossless

from ie_gateway.store.records import LABEL_MAP_SEGMENTATION_STORAGE
from tests.peers import Orthanc, storescu
from tests.test_pipeline import orthanc_instances, toy_models

pytestmark = pytest.mark.peer


def labelmap_node(node_factory: Any, tmp_path: Path, port: int) -> Any:
    """A node whose TPS takes LABELMAP SEGs and whose ARCHIVE (the same Orthanc) does not."""
    peer = {"ae_title": "TPS", "host": "127.0.0.1", "port": port}
    rules = {
        "rules": [
            {
                "name": "thorax",
                "match": {"Modality": "CT"},
                "model": "toy-body",
                "outputs": ["rtstruct", "seg"],
                "send_to": ["TPS", "ARCHIVE"],
                "seg_encoding": "labelmap",
            }
        ]
    }
    return node_factory(
        settings={
            "models_dir": str(toy_models(tmp_path / "models")),
            "destinations": {"TPS": {**peer, "labelmap": True}, "ARCHIVE": peer},
            "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3, "max_attempts": 2},
            "inference": {"timeout_s": 120},
        },
        rules=rules,
    )


@pytest.mark.slow
def test_labelmap_seg_where_the_destination_takes_it_binary_elsewhere(
    node_factory: Any, orthanc: Orthanc, small_series: list[Path]
) -> None:
    node = labelmap_node(node_factory, orthanc.workdir.parent, orthanc.dicom_port).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"delivered", "failed", "refused"}, timeout=180)
    assert job["state"] == "delivered", job
    segs = [
        pydicom.dcmread(DicomBytesIO(orthanc.get_bytes(f"/instances/{i['ID']}/file")))
        for i in orthanc_instances(orthanc, "SEG")
    ]
    by_class = {str(ds.SOPClassUID): ds for ds in segs}
    assert set(by_class) == {LABEL_MAP_SEGMENTATION_STORAGE, str(pydicom.uid.SegmentationStorage)}
    labelmap = hd.seg.Segmentation.from_dataset(by_class[LABEL_MAP_SEGMENTATION_STORAGE])
    assert labelmap.SegmentationType == "LABELMAP"
    assert labelmap.file_meta.TransferSyntaxUID == RLELossless
    assert labelmap.get_segment_description(1).algorithm_identification[0].AlgorithmName == "toy-body"
    assert by_class[str(pydicom.uid.SegmentationStorage)].SegmentationType == "BINARY"
    assert len(labelmap.PixelData) < len(by_class[str(pydicom.uid.SegmentationStorage)].PixelData)
    assert len(orthanc_instances(orthanc, "RTSTRUCT")) == 1  # one file serves both destinations


@pytest.mark.slow
def test_a_peer_refusing_the_labelmap_sop_class_is_named(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    tps = Orthanc(tmp_path / "strict-tps")
    settings = json.loads(tps.config.read_text())
    tps.config.write_text(json.dumps({**settings, "UnknownSopClassAccepted": False}))
    tps.start()
    try:
        node = labelmap_node(node_factory, tmp_path, tps.dicom_port).start()
        assert storescu(node.port, small_series).returncode == 0
        [job] = node.wait_state({"delivered", "failed", "refused"}, timeout=180)
        assert job["state"] == "failed", job
        assert "TPS does not accept Label Map Segmentation Storage (refused at association)" in job["reason"]
        assert len(orthanc_instances(tps, "RTSTRUCT")) == 1  # the rest of the job still went
    finally:
        tps.stop()
