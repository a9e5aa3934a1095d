"""The shipped demo-thorax ensemble contours unseen phantoms accurately on the CT's own grid.

Held-out phantoms (seeds >= models/demo-thorax/train.py's HELD_OUT_FROM, never used in training
or validation) go the production way: DICOM series on disk, ``load_volume``, the registry's
verified package, ``Ensemble.segment``; and once through the running node, sent by storescu.
Their exact labels are the reference. ``model: demo-thorax`` resolves to the repository's one
version, as it does for the shipped config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from ie_gateway.demo.phantoms import STRUCTURES, Phantom, make_phantom, write_ct_series
from ie_gateway.infer.ensemble import Ensemble
from ie_gateway.infer.registry import Registry
from ie_gateway.volume import load_volume
from ie_gateway.write.validate import dice
from tests.keys import DEMO_TRUSTED
from tests.peers import free_port, storescu

MODELS = Path(__file__).resolve().parents[1] / "models"
MIN_DICE = 0.90
HELD_OUT_SEEDS = (10_001, 10_002, 10_003, 10_004)


def held_out(seed: int) -> Phantom:
    return make_phantom(seed, slices=120, size=320, pixel_mm=1.4, slice_mm=2.5)


def dice_per_structure(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {name: dice(labels == label, truth == label) for label, name in enumerate(STRUCTURES, start=1)}


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    state = tmp_path_factory.mktemp("registry") / "state.json"
    return Ensemble(Registry(MODELS, state, keys=DEMO_TRUSTED).resolve("demo-thorax"), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("seed", HELD_OUT_SEEDS)
def test_every_structure_has_dice_of_at_least_0_90(
    ensemble: Ensemble, seed: int, tmp_path: Path
) -> None:
    phantom = held_out(seed)
    volume = load_volume(write_ct_series(phantom, tmp_path, seed=seed))
    labels = sitk.GetArrayFromImage(ensemble.segment(volume.image).labels)
    assert labels.shape == phantom.labels.shape
    scores = dice_per_structure(labels, phantom.labels)
    assert min(scores.values()) >= MIN_DICE, scores


@pytest.mark.slow
@pytest.mark.peer
def test_a_held_out_ct_sent_by_storescu_is_inferred_by_the_node_and_passes(
    node_factory: Any, tmp_path: Path
) -> None:
    seed = 10_011  # demo-thorax@1's worst phantom (heart Dice 0.68)
    phantom = held_out(seed)
    series = write_ct_series(phantom, tmp_path / "ct", seed=seed)
    rules = {"rules": [{"name": "thorax", "match": {"Modality": "CT"}, "model": "demo-thorax",
                        "outputs": ["rtstruct"], "send_to": ["TPS"]}]}
    nowhere = {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": free_port()}}
    node = node_factory(settings={"destinations": nowhere}, rules=rules).start()
    assert storescu(node.port, series).returncode == 0
    # past `inferred`: the label map is stored and the result waits for the (absent) TPS
    [job] = node.wait_state({"sending", "failed", "refused"}, timeout=300)
    assert job["state"] == "sending", job
    installed = Registry(MODELS, tmp_path / "state.json").versions("demo-thorax")
    assert (job["model"], [job["model_version"]]) == ("demo-thorax", installed)
    labels_file = node.root / "results" / f"job-{job['id']}" / "labels-0.mha"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file)))
    scores = dice_per_structure(labels, phantom.labels)
    assert min(scores.values()) >= MIN_DICE, scores
