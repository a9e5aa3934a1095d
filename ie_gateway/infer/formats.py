"""Recognise nnU-Net v2 and MONAI packages and write the ``model.yaml`` that describes them.

``ie-gateway models import PATH`` takes three kinds of folder:

- a native package: ``model.yaml`` present (any format), used as it is;
- an **nnU-Net v2 trained-model folder**: ``dataset.json``, ``plans.json`` and ``fold_K/`` with
  ``checkpoint_final.pth`` (every fold folder present is an ensemble member; a fold folder
  without its checkpoint is refused);
- a **MONAI bundle**: ``configs/metadata.json``, ``configs/inference.json`` and
  ``models/model.pt`` or ``models/model.ts``.

For the last two, :func:`describe_package` writes ``PATH/model.yaml`` from what the package
declares (dataset.json's labels, the bundle's ``channel_def``) with every file's sha256; what
the framework cannot know (ROI name, colour, RT ROI interpreted type, post-processing, whether a
structure is sent) gets a default there for the admin to edit before importing. Everything read
here is JSON; checkpoints are only hashed, never unpickled, in the calling process (the
inference child loads them, under the time limit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from ie_gateway.errors import ModelError
from ie_gateway.files import sha256_file
from ie_gateway.infer.manifest import MANIFEST_NAME, load_manifest
from ie_gateway.vocab import InterpretedType, ModelFormat

NNUNET_CHECKPOINT = "checkpoint_final.pth"
MONAI_CONFIG = "configs/inference.json"
MONAI_META = "configs/metadata.json"
MONAI_MODELS = ("models/model.pt", "models/model.ts")
# nnU-Net names a trained-model folder TRAINER__PLANS__CONFIGURATION
_NNUNET_FOLDER = re.compile(r"(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<configuration>.+)")
_FOLD_DIR = re.compile(r"fold_(\d+|all)")
_PALETTE = (
    (0, 160, 0),
    (0, 120, 255),
    (255, 200, 0),
    (220, 0, 0),
    (255, 0, 255),
    (0, 220, 220),
    (255, 128, 0),
    (128, 0, 255),
    (128, 255, 0),
    (255, 0, 128),
    (0, 128, 128),
    (128, 128, 0),
)
_EXTERNAL_NAMES = {"external", "body", "skin", "body_contour"}
_HEADER = """\
# Written by `ie-gateway models import` from the {what}.
# Edit before importing (a version is immutable once imported): ROI names, colours,
# interpreted_type (RT ROI Interpreted Type), postprocess (largest_component, fill_holes,
# min_volume_cc) and send (false: not sent). Labels and file checksums come from the package.
"""


def detect_format(path: Path) -> ModelFormat:
    """Which kind of package ``path`` is; ModelError naming what is missing when none."""
    if (path / MANIFEST_NAME).is_file():
        return load_manifest(path).format
    if (path / "dataset.json").is_file() or (path / "plans.json").is_file():
        return ModelFormat.NNUNETV2
    if (path / "configs").is_dir():
        return ModelFormat.MONAI_BUNDLE
    raise ModelError(
        f"{path}: not a model package: expected {MANIFEST_NAME}, an nnU-Net v2 trained-model "
        f"folder (dataset.json, plans.json, fold_K/{NNUNET_CHECKPOINT}) or a MONAI bundle "
        f"({MONAI_META}, {MONAI_CONFIG}, {' or '.join(MONAI_MODELS)})"
    )


def describe_package(path: Path, name: str, version: str, description: str = "") -> Path:
    """Write ``path/model.yaml`` for the nnU-Net folder or MONAI bundle at ``path``; return it.

    Raises ModelError naming the package file that is missing or wrong; the written file is then
    validated like any model.yaml (ManifestInvalid with file:line).
    """
    fmt = detect_format(path)
    if (path / MANIFEST_NAME).is_file():
        raise ModelError(f"{path / MANIFEST_NAME} exists already: edit it, or remove it to rewrite")
    if fmt is ModelFormat.NNUNETV2:
        labels, body, what = _describe_nnunet(path)
    else:
        labels, body, what = _describe_monai(path)
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "format": str(fmt),
        "structures": [_structure(label, structure) for label, structure in enumerate(labels, 1)],
        **body,
    }
    target = path / MANIFEST_NAME
    text = _HEADER.format(what=what) + yaml.safe_dump(manifest, sort_keys=False)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot write {target}: {exc}; copy the package somewhere writable") from exc
    load_manifest(path)
    return target


def _structure(label: int, name: str) -> dict[str, Any]:
    return {
        "label": label,
        "name": name,
        "color": list(_PALETTE[(label - 1) % len(_PALETTE)]),
        "interpreted_type": str(InterpretedType.EXTERNAL if name.lower() in _EXTERNAL_NAMES else InterpretedType.ORGAN),
        "postprocess": {"largest_component": False, "fill_holes": False, "min_volume_cc": 0.0},
        "send": True,
    }


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from exc


def _labels_0_to_n(source: Path, labels: dict[str, Any]) -> list[str]:
    """Structure names in label order 1..N from a {name: label} map that must hold 0..N."""
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(
                f"{source}: label {name!r} is {value!r}; only integer labels are supported "
                f"(region-based nnU-Net models are not)"
            )
        if value in by_value:
            raise ModelError(f"{source}: labels {by_value[value]!r} and {name!r} are both {value}")
        by_value[value] = name
    values = sorted(by_value)
    if values != list(range(len(values))) or len(values) < 2:
        raise ModelError(f"{source}: labels must be 0 (background) and 1..N, each once; got {values}")
    return [by_value[v] for v in values[1:]]


def _describe_nnunet(path: Path) -> tuple[list[str], dict[str, Any], str]:
    dataset_file, plans_file = path / "dataset.json", path / "plans.json"
    dataset, plans = _read_json(dataset_file), _read_json(plans_file)
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise ModelError(f"{dataset_file}: the model takes {len(channels)} input channels; the node gives one (CT)")
    labels = _labels_0_to_n(dataset_file, dataset.get("labels") or {})
    configurations = plans.get("configurations") or {}
    match = _NNUNET_FOLDER.fullmatch(path.resolve().name)
    folds = sorted(
        (p for p in path.iterdir() if p.is_dir() and _FOLD_DIR.fullmatch(p.name)),
        key=lambda p: (p.name == "fold_all", len(p.name), p.name),
    )
    if not folds:
        raise ModelError(f"{path}: no fold_K folder with {NNUNET_CHECKPOINT}")
    for fold in folds:
        if not (fold / NNUNET_CHECKPOINT).is_file():
            raise ModelError(
                f"{fold / NNUNET_CHECKPOINT} is missing: fold {fold.name} is incomplete "
                f"(copy its checkpoint or remove the folder)"
            )
    trainer, configuration = _trainer_and_configuration(path, match)
    if configuration not in configurations:
        raise ModelError(
            f"{plans_file}: configuration {configuration!r} is unknown (plans.json has: "
            f"{', '.join(sorted(configurations)) or 'none'})"
        )
    if (configurations[configuration] or {}).get("previous_stage"):
        raise ModelError(
            f"{plans_file}: configuration {configuration!r} is a cascade stage (it needs the "
            f"previous stage's segmentation); import a single-stage configuration such as 3d_fullres"
        )
    body = {
        "nnunet": {
            "configuration": configuration,
            "trainer": trainer,
            "checkpoint": NNUNET_CHECKPOINT,
            "mirroring": True,
            "step_size": 0.5,
        },
        "folds": [_entry(path, fold / NNUNET_CHECKPOINT) for fold in folds],
        "files": [_entry(path, dataset_file), _entry(path, plans_file)],
    }
    return labels, body, f"nnU-Net v2 folder {path.name} ({len(folds)} folds, {configuration})"


def _trainer_and_configuration(path: Path, match: re.Match[str] | None) -> tuple[str, str]:
    """From the folder's name, which nnU-Net always writes as TRAINER__PLANS__CONFIGURATION."""
    if match is None:
        raise ModelError(
            f"{path}: cannot tell the trainer and configuration: nnU-Net names a trained-model "
            f"folder TRAINER__PLANS__CONFIGURATION (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres); "
            f"give it that name"
        )
    return match["trainer"], match["configuration"]


def _describe_monai(path: Path) -> tuple[list[str], dict[str, Any], str]:
    meta_file = path / MONAI_META
    meta = _read_json(meta_file)
    if not (path / MONAI_CONFIG).is_file():
        raise ModelError(f"{path / MONAI_CONFIG} is missing")
    try:
        channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError):
        raise ModelError(
            f"{meta_file}: network_data_format.outputs.pred.channel_def (label names) is missing"
        ) from None
    try:
        labels = _labels_0_to_n(meta_file, {str(v): int(k) for k, v in channel_def.items()})
    except ValueError:
        raise ModelError(f"{meta_file}: channel_def keys must be labels 0..N") from None
    weights = [m for m in MONAI_MODELS if (path / m).is_file()]
    if not weights:
        raise ModelError(f"{path}: {' or '.join(MONAI_MODELS)} is missing")
    others = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.relative_to(path).as_posix() not in (weights[0], MANIFEST_NAME)
        and p.parts[len(path.parts)] != "models"
    )
    body = {
        "monai": {"config": MONAI_CONFIG, "meta": MONAI_META},
        "folds": [_entry(path, path / weights[0])],
        "files": [_entry(path, p) for p in others],
    }
    return labels, body, f"MONAI bundle {meta.get('name', path.name)} {meta.get('version', '')}"


def _entry(root: Path, file: Path) -> dict[str, str]:
    return {"file": file.relative_to(root).as_posix(), "sha256": sha256_file(file)}


#: the optional extra each package format needs, and a module that extra installs
FRAMEWORKS = {"nnunetv2": ("nnunet", "nnunetv2"), "monai_bundle": ("monai", "ignite")}


def missing_framework(package_format: str) -> str | None:
    """Why a package of this format cannot run on this node (its extra is not installed), or None."""
    import importlib.util

    if package_format not in FRAMEWORKS:
        return None
    extra, module = FRAMEWORKS[package_format]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"its framework is not installed here ({module}): pip install 'ie-gateway[{extra}]'"
