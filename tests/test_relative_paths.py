"""The index keeps every path relative to the spool or the results folder, so a worker that
mounts the shared storage at another path can finish a job another worker started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.peers import Orthanc, storescu
from tests.test_delivery import misplaced_heart_model

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_a_worker_with_the_spool_mounted_at_another_path_finishes_a_job_another_worker_started(
    node_factory: Any, orthanc: Orthanc, small_series: list[Path], tmp_path: Path
) -> None:
    settings: dict[str, Any] = {
        "models_dir": str(misplaced_heart_model(tmp_path / "models")),
        "destinations": {
            "TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": orthanc.dicom_port, "accepts": ["rtstruct"]}
        },
        "delivery": {"base_s": 0.3, "cap_s": 1.0, "every_s": 0.3},
        "inference": {"timeout_s": 120},
    }
    rules = {
        "rules": [
            {
                "name": "thorax",
                "match": {"Modality": "CT"},
                "model": "toy-heart",
                "outputs": ["rtstruct"],
                "send_to": ["TPS"],
            }
        ]
    }
    first = node_factory("first", settings=settings, rules=rules).start()
    assert storescu(first.port, small_series).returncode == 0
    # inferred by the first worker, then held for review: its slice files are in the index
    [job] = first.wait_state({"needs_review", "delivered", "failed"}, timeout=180)
    assert job["state"] == "needs_review", job
    first.stop()

    elsewhere = tmp_path / "mounted-elsewhere"
    first.root.rename(elsewhere)  # the first worker's path to the storage is gone
    second = node_factory("second", settings={**settings, "storage": {"root": str(elsewhere)}}, rules=rules).start()
    second.cli("release", str(job["id"]))
    [job] = second.wait_state({"delivered", "failed"}, timeout=120)
    assert job["state"] == "delivered", job
    assert Path(job["qa_png"]).is_relative_to(elsewhere) and Path(job["qa_png"]).is_file()
    [_rt] = orthanc.get_post("/tools/find", {"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}})
