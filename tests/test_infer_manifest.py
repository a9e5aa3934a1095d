"""model.yaml validation: what a package author gets told, with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ie_gateway.infer.manifest import InterpretedType, ManifestInvalid, load_manifest

SHA = "a" * 64


def manifest_dict() -> dict:
    return {
        "name": "demo-thorax",
        "version": "1",
        "structures": [
            {"label": 2, "name": "Lung_L", "color": [0, 0, 200], "interpreted_type": "ORGAN"},
            {
                "label": 1,
                "name": "External",
                "color": [0, 200, 0],
                "interpreted_type": "EXTERNAL",
                "postprocess": {"largest_component": True, "fill_holes": True},
            },
        ],
        "input": {
            "spacing_mm": [2.0, 2.0, 2.5],
            "orientation": "LPS",
            "intensity": {"window": [-1000, 1000]},
            "patch_size": [64, 128, 128],
            "overlap": 0.5,
            "batch_size": 2,
        },
        "folds": [{"file": "fold0.pt", "sha256": SHA}],
    }


def write(tmp_path: Path, data: dict) -> Path:
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return tmp_path


def errors_for(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(write(tmp_path, data))
    return str(caught.value)


def test_valid_manifest_loads_with_structures_sorted_by_label(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, manifest_dict()))
    assert [s.name for s in manifest.structures] == ["External", "Lung_L"]
    assert manifest.structures[0].interpreted_type is InterpretedType.EXTERNAL
    assert manifest.structures[0].postprocess.fill_holes
    assert manifest.channels == 3
    assert manifest.input.patch_size == (64, 128, 128)


def test_numeric_version_is_read_as_text(tmp_path: Path) -> None:
    data = manifest_dict()
    data["version"] = 2
    assert load_manifest(write(tmp_path, data)).version == "2"


def test_duplicate_labels_are_refused_with_file_and_line(tmp_path: Path) -> None:
    data = manifest_dict()
    data["structures"][1]["label"] = 2
    message = errors_for(tmp_path, data)
    assert f"{tmp_path / 'model.yaml'}:" in message
    assert "structures: labels must be 1..2" in message


def test_labels_with_a_gap_are_refused(tmp_path: Path) -> None:
    data = manifest_dict()
    data["structures"][0]["label"] = 3
    assert "labels must be 1..2" in errors_for(tmp_path, data)


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    data = manifest_dict()
    data["structures"][0]["name"] = "External"
    assert "repeated: External" in errors_for(tmp_path, data)


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("structures", 0, "name"), "x" * 65, "structures.0.name"),
        (("structures", 0, "color"), [0, 256, 0], "structures.0.color.1"),
        (("structures", 0, "interpreted_type"), "LIVER", "structures.0.interpreted_type"),
        (("folds", 0, "sha256"), "abc", "folds.0.sha256"),
        (("folds", 0, "file"), "../fold0.pt", "folds.0.file"),
        (("input", "patch_size"), [64, 0, 128], "input.patch_size.1"),
        (("input", "spacing_mm"), [2.0, -2.0, 2.5], "input.spacing_mm.1"),
        (("input", "overlap"), 1.0, "input.overlap"),
        (("input", "intensity", "window"), [100, -100], "input.intensity.window"),
        (("input", "patchsize"), [1, 1, 1], "input.patchsize"),
    ],
)
def test_invalid_value_is_named_by_key(
    tmp_path: Path, path: tuple, value: object, key: str
) -> None:
    data = manifest_dict()
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    lines = errors_for(tmp_path, data).splitlines()
    assert any(f": {key}: " in line for line in lines), lines


def test_manifest_without_folds_is_refused(tmp_path: Path) -> None:
    data = manifest_dict()
    data["folds"] = []
    assert "at least one fold" in errors_for(tmp_path, data)


def test_missing_manifest_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid, match="cannot read"):
        load_manifest(tmp_path)
