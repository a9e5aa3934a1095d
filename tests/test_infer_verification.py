"""Verification of a model package runs in the inference child, under the inference time limit:
a model that hangs while it is verified fails its job and the node goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from tests.infer_packages import Spin, threshold_model, write_package
from tests.peers import echoscu, storescu

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def series(folder: Path, seed: int, description: str) -> list[Path]:
    phantom = make_phantom(seed, slices=24, size=96, pixel_mm=5.0, slice_mm=5.0)
    return write_ct_series(phantom, folder, seed=seed, extra={"SeriesDescription": description})


def rule(description: str, model: str) -> dict[str, Any]:
    return {"name": model, "match": {"Modality": "CT", "SeriesDescription": {"regex": description}},
            "model": model, "outputs": ["rtstruct"], "send_to": ["TPS"]}


def test_a_model_that_hangs_in_verification_fails_its_job_and_the_node_goes_on(
        node_factory: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_package(models, [threshold_model(2, level=0.25)], name="body", structures=1,
                  patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0))
    # a billion interpreted loop steps per forward pass: the probe's one small patch never ends
    write_package(models, [Spin(2, iterations=10**9)], name="hangs", structures=1,
                  patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0))
    node = node_factory(settings={
        # a healthy model's verification (child start, torch import, probe) took over 10 s in a
        # loaded CI run: the limit leaves it room; the hung one still ends at it
        "models_dir": str(models), "inference": {"timeout_s": 40},
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": 9}},
    }, rules={"rules": [rule("Hangs", "hangs"), rule("Body", "body")]}).start()
    assert storescu(node.port, series(tmp_path / "hangs", 21, "Hangs")).returncode == 0
    assert storescu(node.port, series(tmp_path / "body", 22, "Body")).returncode == 0
    rows = node.wait_state({"failed", "sending"}, count=2, timeout=180)
    states = sorted((r["state"], r.get("model"), r.get("reason") or "") for r in rows)
    assert [s[:2] for s in states] == [("failed", None), ("sending", "body")], states
    assert "hangs@1: verification failed: inference exceeded 40 s" in states[0][2]
    assert echoscu(node.port).returncode == 0
