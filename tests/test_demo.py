"""`ie-gateway demo`, the newcomer's first command, with the shipped demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.peers import REPO


@pytest.mark.slow
def test_demo_contours_a_synthetic_ct_and_delivers_rtstruct_seg_and_qa(tmp_path: Path) -> None:
    # the demo's own 120 slices: a shorter scan cuts the heart, and the model's plausibility
    # checks rightly hold such a result for review instead of delivering it
    result = subprocess.run(
        [sys.executable, "-m", "ie_gateway.cli", "demo", "--config", str(REPO / "config" / "gateway.yaml"),
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job delivered" in result.stdout
    received = sorted((tmp_path / "demo" / "tps").glob("*.dcm"))
    modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received)
    assert modalities == ["RTSTRUCT", "SEG"]
    rt = pydicom.dcmread(next(p for p in received if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"))
    assert {roi.ROIName for roi in rt.StructureSetROISequence} == {"External", "Lung_L", "Lung_R", "Heart", "SpinalCord"}
    qa = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if "QA picture" in line)
    assert Path(qa).is_file() and Path(qa).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_runs_the_nnunet_demo_model_through_nnunets_own_predictor(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2", reason="the [nnunet] extra is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "ie_gateway.cli", "demo", "--config", str(REPO / "config" / "gateway.yaml"),
         "--workdir", str(tmp_path / "demo"), "--slices", "48", "--model", "demo-thorax-nnunet"],
        capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job delivered" in result.stdout
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "demo" / "tps").glob("*.dcm")]
    assert sorted(ds.Modality for ds in received) == ["RTSTRUCT", "SEG"]
    assert all("demo-thorax-nnunet" in ds.SeriesDescription for ds in received)
