"""nnU-Net v2 and MONAI packages through the node, against the frameworks' own command lines.

A CT goes in by storescu, the node routes it to the package and contours it in its inference
child; the label map it stores must equal, voxel for voxel (at least 99.9 %), what
``nnUNetv2_predict_from_modelfolder`` / ``python -m monai.bundle run`` write for the same CT
(the node's checked volume, written as NIfTI). Real frameworks, no mocks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from ie_gateway.pipeline import CT_FILE, labels_file
from ie_gateway.store import Store
from tests.peers import REPO, storescu

pytestmark = [pytest.mark.peer, pytest.mark.slow]

nnunetv2 = pytest.importorskip("nnunetv2", reason="the [nnunet] extra is not installed")
monai = pytest.importorskip("monai", reason="the [monai] extra is not installed")

NNUNET_DEMO = REPO / "models" / "demo-thorax-nnunet" / "1"
BIN = Path(sys.executable).parent
AGREEMENT = 0.999


def thorax(folder: Path, seed: int, description: str) -> list[Path]:
    """A coarse CT on another grid than the demo was trained on (so both resample)."""
    phantom = make_phantom(seed, slices=36, size=100, pixel_mm=4.8, slice_mm=6.5)
    return write_ct_series(phantom, folder, seed=seed, extra={"SeriesDescription": description})


def contoured(node: Any, tmp_path: Path, seed: int, description: str) -> tuple[Path, Path]:
    """Send a CT, wait until the node has written its results; its CT and label map files."""
    assert storescu(node.port, thorax(tmp_path / f"ct-{seed}", seed, description)).returncode == 0
    [row] = node.wait_state({"sending", "failed"}, timeout=600)
    assert row["state"] == "sending", row.get("reason")
    folder = Store(node.root).job_dir(row["id"])
    return folder / CT_FILE, folder / labels_file(0)


def as_nifti(ct_path: Path, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    target = folder / name
    sitk.WriteImage(sitk.ReadImage(str(ct_path)), str(target))
    return target


def agreement(reference: Path, labels: Path) -> float:
    ref, ours = sitk.ReadImage(str(reference)), sitk.ReadImage(str(labels))
    assert ref.GetSize() == ours.GetSize()
    assert np.allclose(ref.GetOrigin(), ours.GetOrigin(), atol=1e-3)
    assert np.allclose(ref.GetDirection(), ours.GetDirection(), atol=1e-6)
    a, b = sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(ours)
    assert len(np.unique(b)) > 1, "the label map is empty: nothing was compared"
    return float((a == b).mean())


def node_for(node_factory: Any, models_dir: Path, model: str) -> Any:
    models_dir.mkdir(exist_ok=True)
    rule = {"name": "thorax", "match": {"Modality": "CT"}, "model": model, "outputs": ["rtstruct"],
            "send_to": ["TPS"]}
    return node_factory(settings={
        "models_dir": str(models_dir), "inference": {"timeout_s": 600},
        # nobody listens on the TPS port: results wait in the outbox, which is all this needs
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": 9}},
    }, rules={"rules": [rule]})


def test_nnunet_demo_through_dicom_equals_nnunetv2_predict(node_factory: Any, tmp_path: Path) -> None:
    node = node_for(node_factory, REPO / "models", "demo-thorax-nnunet").start()
    ct_path, labels = contoured(node, tmp_path, 10001, "Thorax nnU-Net")
    inputs = as_nifti(ct_path, tmp_path / "nnunet-in", "case_0000.nii.gz").parent
    folds = [p.name.removeprefix("fold_") for p in sorted(NNUNET_DEMO.glob("fold_*"))]
    subprocess.run(
        [BIN / "nnUNetv2_predict_from_modelfolder", "-i", str(inputs), "-o", str(tmp_path / "nnunet-out"),
         "-m", str(NNUNET_DEMO), "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_progress_bar"],
        check=True, capture_output=True, timeout=600)
    figure = agreement(tmp_path / "nnunet-out" / "case.nii.gz", labels)
    print(f"nnU-Net demo: node vs nnUNetv2_predict_from_modelfolder voxel agreement {figure:.6f}")
    assert figure >= AGREEMENT


def test_monai_bundle_imported_by_the_cli_equals_monai_bundle_run(node_factory: Any, tmp_path: Path) -> None:
    from tests.keys import describe_signed
    from tests.monai_bundles import write_bundle

    bundle = describe_signed(write_bundle(tmp_path / "incoming" / "toy_ct_segmentation"), "toy-monai", "1")
    node = node_for(node_factory, tmp_path / "models", "toy-monai")
    imported = node.cli("models", "import", str(bundle), "--name", "toy-monai", "--version", "1")
    assert "toy-monai@1: imported" in imported.stdout
    installed = tmp_path / "models" / "toy-monai" / "1"
    assert (installed / "models" / "model.pt").is_file()
    node.start()
    ct_path, labels = contoured(node, tmp_path, 10002, "Thorax MONAI")
    inputs = as_nifti(ct_path, tmp_path / "monai-in", "ct.nii.gz").parent
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run",
         "--config_file", str(installed / "configs" / "inference.json"),
         "--meta_file", str(installed / "configs" / "metadata.json"),
         "--bundle_root", str(installed), "--dataset_dir", str(inputs),
         "--output_dir", str(tmp_path / "monai-out")],
        check=True, capture_output=True, timeout=600)
    [reference] = (tmp_path / "monai-out").rglob("*.nii.gz")
    figure = agreement(reference, labels)
    print(f"MONAI bundle: node vs python -m monai.bundle run voxel agreement {figure:.6f}")
    assert figure >= AGREEMENT


def test_a_missing_fold_is_refused_by_the_import_command(node_factory: Any, tmp_path: Path) -> None:
    node = node_for(node_factory, tmp_path / "models", "demo-thorax-nnunet")
    package = tmp_path / "nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres"
    shutil.copytree(NNUNET_DEMO, package, ignore=shutil.ignore_patterns("model.yaml"))
    (package / "fold_3").mkdir()  # a fold whose checkpoint did not arrive
    refused = node.cli("models", "import", str(package), "--name", "thorax", "--version", "1", "--allow-unsigned",
                       check=False)
    assert refused.returncode != 0
    assert "fold_3/checkpoint_final.pth is missing" in refused.stderr
    assert not (tmp_path / "models" / "thorax").exists()
