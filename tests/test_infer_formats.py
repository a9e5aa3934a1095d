"""Recognising nnU-Net v2 folders and MONAI bundles, the model.yaml written for them, and the
import refusals that name the file at fault. Checkpoints here are opaque bytes: describing and
checksumming a package never unpickles one (the frameworks' loading is tested with real
packages in test_infer_frameworks.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ie_gateway.errors import ModelError, SignatureInvalid
from ie_gateway.infer.formats import describe_package, detect_format
from ie_gateway.infer.manifest import ManifestInvalid, load_manifest
from ie_gateway.infer.registry import Registry
from ie_gateway.vocab import ModelFormat
from tests.keys import DEMO_TRUSTED, describe_signed

TRAINED = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def nnunet_folder(root: Path, *, name: str = TRAINED, labels: dict[str, object] | None = None,
                  folds: tuple[str, ...] = ("fold_0", "fold_1"),
                  configurations: tuple[str, ...] = ("3d_fullres", "2d")) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    dataset = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 4,
               "labels": labels or {"background": 0, "body": 1, "Heart": 2}}
    (folder / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    plans = {"plans_name": "nnUNetPlans", "configurations": {c: {} for c in configurations}}
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    for index, fold in enumerate(folds):
        (folder / fold).mkdir()
        (folder / fold / "checkpoint_final.pth").write_bytes(b"checkpoint %d" % index)
    return folder


def monai_folder(root: Path, channel_def: dict[str, str] | None = None) -> Path:
    folder = root / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    meta = {"name": "toy", "version": "0.1.0", "network_data_format": {"outputs": {"pred": {
        "channel_def": channel_def or {"0": "background", "1": "Spleen"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "configs" / "inference.json").write_text("{}", encoding="utf-8")
    (folder / "models" / "model.pt").write_bytes(b"weights")
    return folder


def test_an_nnunet_folder_is_described_with_its_labels_folds_and_files(tmp_path: Path) -> None:
    folder = nnunet_folder(tmp_path)
    assert detect_format(folder) is ModelFormat.NNUNETV2
    describe_package(folder, "thorax", "3", "from the training workspace")
    manifest = load_manifest(folder)
    assert manifest.format is ModelFormat.NNUNETV2
    assert [(s.label, s.name, str(s.interpreted_type)) for s in manifest.structures] == [
        (1, "body", "EXTERNAL"), (2, "Heart", "ORGAN")]
    assert manifest.nnunet is not None
    assert (manifest.nnunet.configuration, manifest.nnunet.trainer) == ("3d_fullres", "nnUNetTrainer")
    assert [f.file for f in manifest.folds] == ["fold_0/checkpoint_final.pth",
                                                "fold_1/checkpoint_final.pth"]
    assert [f.file for f in manifest.files] == ["dataset.json", "plans.json"]
    assert manifest.input is None and all(s.send for s in manifest.structures)
    assert (folder / "model.yaml").read_text().startswith("# Written by `ie-gateway models import`")


def test_a_described_nnunet_folder_installs_with_its_layout(tmp_path: Path) -> None:
    folder = describe_signed(nnunet_folder(tmp_path), "thorax", "3")
    registry = Registry(tmp_path / "models", tmp_path / "state.json", keys=DEMO_TRUSTED)
    model = registry.import_version(folder)
    installed = sorted(p.relative_to(model.path).as_posix() for p in model.path.rglob("*") if p.is_file())
    assert installed == ["dataset.json", "fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth",
                         "model.sig", "model.yaml", "plans.json"]
    assert registry.resolve("thorax").spec == "thorax@3"


def test_import_refuses_a_fold_folder_without_its_checkpoint(tmp_path: Path) -> None:
    folder = nnunet_folder(tmp_path)
    (folder / "fold_1" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match=r"fold_1/checkpoint_final.pth is missing"):
        describe_package(folder, "thorax", "3")
    assert not (folder / "model.yaml").exists()


def test_import_refuses_a_fold_deleted_after_describing(tmp_path: Path) -> None:
    folder = describe_signed(nnunet_folder(tmp_path), "thorax", "3")
    (folder / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(SignatureInvalid, match=r"signed file\(s\) missing: fold_0/checkpoint_final.pth"):
        Registry(tmp_path / "models", tmp_path / "state.json", keys=DEMO_TRUSTED).import_version(folder)


def test_import_refuses_a_tampered_checkpoint_naming_it(tmp_path: Path) -> None:
    folder = describe_signed(nnunet_folder(tmp_path), "thorax", "3")
    (folder / "fold_1" / "checkpoint_final.pth").write_bytes(b"checkpoint X")
    registry = Registry(tmp_path / "models", tmp_path / "state.json", keys=DEMO_TRUSTED)
    with pytest.raises(SignatureInvalid, match=r"changed after signing by 'demo': fold_1/checkpoint_final.pth"):
        registry.import_version(folder)
    assert registry.versions("thorax") == []


def test_import_refuses_a_configuration_the_plans_do_not_have(tmp_path: Path) -> None:
    folder = nnunet_folder(tmp_path, name="nnUNetTrainer__nnUNetPlans__3d_lowres")
    with pytest.raises(ModelError, match=r"plans.json: configuration '3d_lowres' is unknown"):
        describe_package(folder, "thorax", "3")


def test_import_refuses_a_cascade_stage(tmp_path: Path) -> None:
    folder = nnunet_folder(tmp_path, name="nnUNetTrainer__nnUNetPlans__3d_cascade_fullres",
                           configurations=("3d_lowres", "3d_cascade_fullres"))
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"previous_stage": "3d_lowres"}
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match=r"plans.json: configuration '3d_cascade_fullres' is a cascade"):
        describe_package(folder, "thorax", "3")


@pytest.mark.parametrize("labels", [
    {"background": 0, "body": 1, "Heart": 3},
    {"body": 1, "Heart": 2},
    {"background": 0, "body": 1, "Heart": 1},
    {"background": 0, "body": [1, 2], "Heart": 2},
])
def test_import_refuses_labels_that_are_not_0_to_n(tmp_path: Path, labels: dict[str, object]) -> None:
    folder = nnunet_folder(tmp_path, labels=labels)
    with pytest.raises(ModelError, match=r"dataset.json: "):
        describe_package(folder, "thorax", "3")


def test_a_folder_not_named_as_nnunet_names_it_is_refused_with_the_reason(tmp_path: Path) -> None:
    folder = nnunet_folder(tmp_path, name="weights")
    with pytest.raises(ModelError, match="TRAINER__PLANS__CONFIGURATION"):
        describe_package(folder, "thorax", "3")


def test_a_monai_bundle_is_described_from_its_channel_def(tmp_path: Path) -> None:
    folder = monai_folder(tmp_path, {"0": "background", "1": "Spleen", "2": "Liver"})
    assert detect_format(folder) is ModelFormat.MONAI_BUNDLE
    describe_package(folder, "abdomen", "1")
    manifest = load_manifest(folder)
    assert manifest.format is ModelFormat.MONAI_BUNDLE
    assert [s.name for s in manifest.structures] == ["Spleen", "Liver"]
    assert [f.file for f in manifest.folds] == ["models/model.pt"]
    assert [f.file for f in manifest.files] == ["configs/inference.json", "configs/metadata.json"]


def test_a_monai_bundle_with_a_gap_in_its_labels_is_refused(tmp_path: Path) -> None:
    folder = monai_folder(tmp_path, {"0": "background", "2": "Liver"})
    with pytest.raises(ModelError, match=r"metadata.json: labels must be 0 \(background\) and 1..N"):
        describe_package(folder, "abdomen", "1")


def test_a_monai_bundle_without_weights_is_refused(tmp_path: Path) -> None:
    folder = monai_folder(tmp_path)
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match=r"models/model.pt or models/model.ts is missing"):
        describe_package(folder, "abdomen", "1")


def test_a_folder_that_is_no_package_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model package: expected model.yaml, an nnU-Net"):
        detect_format(tmp_path)


@pytest.mark.parametrize(("edit", "why"), [
    (lambda d: d["structures"][1].update(interpreted_type="HEART"), r":\d+: structures.1.interpreted_type"),
    (lambda d: d["structures"][0].update(color=[0, 300, 0]), r":\d+: structures.0.color.1"),
    (lambda d: d.pop("nnunet"), "format nnunetv2 needs the 'nnunet' section"),
])
def test_an_admins_edit_is_validated_with_file_and_line(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], why: str
) -> None:
    folder = nnunet_folder(tmp_path)
    describe_package(folder, "thorax", "3")
    data = yaml.safe_load((folder / "model.yaml").read_text())
    edit(data)
    (folder / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(folder)
    joined = "\n".join(caught.value.errors)
    assert joined.startswith(f"{folder / 'model.yaml'}:")
    assert re.search(why, joined), joined


def test_describe_leaves_an_existing_model_yaml_alone(tmp_path: Path) -> None:
    folder = nnunet_folder(tmp_path)
    describe_package(folder, "thorax", "3")
    before = (folder / "model.yaml").read_text()
    with pytest.raises(ModelError, match="exists already"):
        describe_package(folder, "thorax", "4")
    assert (folder / "model.yaml").read_text() == before
