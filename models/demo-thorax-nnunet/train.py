"""Train the demo-thorax-nnunet model with nnU-Net v2's own planner and trainer on synthetic CTs.

Run from the repository root with the ``[nnunet]`` extra installed (CPU; see the README for the
time it takes on 2 cores):

    .venv/bin/python models/demo-thorax-nnunet/train.py --out models/demo-thorax-nnunet/1

Steps, all nnU-Net's own: phantoms from :mod:`ie_gateway.demo.phantoms` (seeds 0..CASES-1, on a
coarse 6 mm grid so a CPU trains it in minutes) are written as an nnU-Net raw dataset;
``nnUNetv2_plan_and_preprocess`` plans and preprocesses it; the plan's network is narrowed to
FEATURES channels per stage (nnU-Net's documented way of editing a plan) so each fold's
checkpoint stays about a megabyte; ``nnUNetv2_train`` trains folds FOLDS with the built-in
TRAINER (nnU-Net's shortest schedule: one epoch of 250 iterations). The trained-model folder is
then described as ``ie-gateway models import`` does (:func:`describe_package` writes model.yaml)
and copied to ``--out``.

Only the weights are kept in each checkpoint (``network_weights`` and the entries nnU-Net's
predictor reads); the optimiser state, which nnU-Net needs only to resume training, is dropped.
One of nnU-Net's five folds is trained (fold 0, ~14 CPU-minutes on this machine's 2 shared cores);
``FOLDS`` takes more, each becoming an ensemble member at import.
It is a demo of the path, **not for clinical use**: one epoch does not make a good model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.signing import sign_model
from ie_gateway.demo.phantoms import STRUCTURES, make_phantom

DEMO_KEY = Path(__file__).resolve().parents[2] / "keys" / "demo-only-publisher"
DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_DemoThorax"
CASES = 12
FOLDS = (0,)  # one of nnU-Net's five: a fold costs ~14 CPU-minutes here (see README)
TRAINER = "nnUNetTrainer_1epoch"
CONFIGURATION = "3d_fullres"
FEATURES = (8, 16, 32, 64, 64)
GRID = {"slices": 40, "size": 80, "pixel_mm": 6.0, "slice_mm": 6.0}


def write_raw_dataset(raw: Path) -> None:
    """``imagesTr``/``labelsTr`` NIfTI pairs and dataset.json, as nnU-Net's raw format wants."""
    images, labels = raw / "imagesTr", raw / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for seed in range(CASES):
        phantom = make_phantom(seed, **GRID)  # type: ignore[arg-type]
        for array, path in (
            (phantom.hu, images / f"thorax_{seed:03d}_0000.nii.gz"),
            (phantom.labels, labels / f"thorax_{seed:03d}.nii.gz"),
        ):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm))
            image.SetOrigin(phantom.origin)
            sitk.WriteImage(image, str(path))
    dataset = {
        "name": "DemoThorax",
        "description": "ie_gateway.demo.phantoms thorax phantoms (not for clinical use)",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(STRUCTURES)}},
        "numTraining": CASES,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")


def narrow_plan(preprocessed: Path) -> None:
    """Fewer channels per stage in the 3d_fullres plan: a small, fast demo network."""
    plans_file = preprocessed / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    kwargs = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    stages = kwargs["n_stages"]
    kwargs["features_per_stage"] = list(FEATURES[:stages]) + [FEATURES[-1]] * (stages - len(FEATURES))
    plans_file.write_text(json.dumps(plans, indent=2), encoding="utf-8")


def slim_checkpoint(path: Path) -> None:
    """Keep what nnUNetPredictor reads; drop the optimiser state (only needed to resume)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keep = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes")
    torch.save({k: checkpoint[k] for k in keep if k in checkpoint}, path)


def train(work: Path, env: dict[str, str], bin_dir: Path) -> None:
    """Raw dataset, nnU-Net's planning and preprocessing, the narrowed plan, each fold trained."""
    shutil.rmtree(work / "raw", ignore_errors=True)
    write_raw_dataset(work / "raw" / DATASET)
    subprocess.run(
        [bin_dir / "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION,
         "-np", "1", "--verify_dataset_integrity"],
        check=True, env=env,
    )
    narrow_plan(work / "preprocessed" / DATASET)
    for fold in FOLDS:
        subprocess.run(
            [bin_dir / "nnUNetv2_train", str(DATASET_ID), CONFIGURATION, str(fold), "-tr", TRAINER,
             "-device", "cpu"],
            check=True, env=env,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="models/demo-thorax-nnunet/VERSION")
    parser.add_argument("--workdir", type=Path, help="keep nnU-Net's folders here (default: temp)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nnunet-demo-"))
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(work / "results"),
        "nnUNet_n_proc_DA": "1",  # one augmentation worker: the machine is small and shared
        "OMP_NUM_THREADS": str(args.threads),
    }
    bin_dir = Path(sys.executable).parent
    trained = work / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    if all((trained / f"fold_{k}" / "checkpoint_final.pth").is_file() for k in FOLDS):
        print(f"{trained} is trained already: packaging it")
    else:
        train(work, env, bin_dir)
    # the package keeps nnU-Net's folder name: it says trainer, plans and configuration
    package = work / "package" / trained.name
    shutil.rmtree(package.parent, ignore_errors=True)
    package.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(trained / name, package / name)
    for fold in FOLDS:
        (package / f"fold_{fold}").mkdir()
        target = package / f"fold_{fold}" / "checkpoint_final.pth"
        shutil.copyfile(trained / f"fold_{fold}" / "checkpoint_final.pth", target)
        slim_checkpoint(target)
    describe_package(package, args.out.parent.name, args.out.name,
                     "nnU-Net v2 demo on synthetic thorax phantoms; not for clinical use")
    # signed with the demo key nodes trust in config/gateway.yaml (demo only: see keys/README.md)
    sign_model(package, DEMO_KEY)
    shutil.copytree(package, args.out)
    print(f"installed {args.out} (nnU-Net folders kept in {work})")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
