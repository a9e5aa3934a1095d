"""bench/gpu.sh, the script a lent CUDA machine runs, kept working on the CPU: its tiny mode
runs every case (native, nnU-Net demo, MONAI bundle, five nnU-Net folds) through a node to the
RT-STRUCT at a TPS, and nnU-Net's own command on the five folds, as on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_every_case_in_tiny_cpu_mode() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("series complete -> RT-STRUCT stored at the TPS", 1)[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line[:1].isalpha()}
    for case in ("native", "nnunet-demo", "monai", "nnunet-5fold"):
        assert float(rows[case][0]) > 0, table  # complete -> RT-STRUCT seconds, not a failure state
    assert "nnunet-5fold: nnUNetv2_predict_from_modelfolder" in table
    assert "voxels agreeing 1.000000" in table  # the node's five folds give nnU-Net's own labels
