"""The ``model.yaml`` of a model package: format, structures, input contract and files.

A package is ``<models_dir>/<name>/<version>/model.yaml`` plus the files it names, each with its
sha256. ``format`` says whose code runs it:

- ``native`` (default): TorchScript ``folds``; the node preprocesses by ``input`` and runs them;
- ``nnunetv2``: an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json`` in
  ``files``, ``fold_K/checkpoint_final.pth`` as ``folds``), run by ``nnUNetPredictor`` as
  ``nnunet`` says;
- ``monai_bundle``: a MONAI bundle (``configs/...`` in ``files``, ``models/model.ts`` or
  ``model.pt`` as the one fold), run by the bundle's own inference config as ``monai`` says.

Output channel ``c`` is label ``c`` (0 = background) in every format, so the structures' labels
must be exactly ``1..N``. ``send: false`` keeps a structure out of RT-STRUCT and SEG. Validation
errors name the file, line and key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ie_gateway.errors import ConfigError, ManifestInvalid, ModelError
from ie_gateway.vocab import InterpretedType, ModelFormat, Side
from ie_gateway.yamlfile import StrictModel, load_model

MANIFEST_NAME = "model.yaml"

# Package names and versions become folder names: keep them to safe characters.
_SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A package file: safe names, a few folders deep (``fold_0/checkpoint_final.pth``), never ``..``.
_SAFE_PATH = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}$"

Byte = Annotated[int, Field(ge=0, le=255)]
PositiveMm = Annotated[float, Field(gt=0)]
PositiveVoxels = Annotated[int, Field(gt=0)]


class PostProcess(StrictModel):
    """Clean-up applied to one structure's mask on the CT grid, in this order."""

    largest_component: bool = False
    fill_holes: bool = False
    min_volume_cc: float = Field(default=0.0, ge=0)


class Range(StrictModel):
    """An inclusive range; either end may be left open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def __contains__(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}-{self.max:g}"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


class Expect(StrictModel):
    """What a sane result of this structure looks like (see ie_gateway.qa.plausibility).

    ``volume_cc``: its volume; ``volume_cc_per_cm``: its volume per cm of scan length (long
    organs such as the cord, cut by the scan's ends); ``side``: the patient's side of the
    body's midline its centre lies on; ``inside``: another structure (the External) that holds
    at least 95 % of it; ``largest_component``: the share of its volume in its largest
    connected piece; ``slices_covered``: the share of the scan's slices it appears on.
    """

    volume_cc: Range | None = None
    volume_cc_per_cm: Range | None = None
    side: Side | None = None
    inside: str | None = None
    largest_component: Range | None = None
    slices_covered: Range | None = None


class Commissioning(StrictModel):
    """A structure's acceptance criteria for ``ie-gateway commission``: each case's contour
    passes when its Dice with the clinician's is at least ``dice_min`` and its 95th-percentile
    Hausdorff distance at most ``hd95_max_mm`` (either may be left out)."""

    dice_min: float | None = Field(default=None, ge=0, le=1)
    hd95_max_mm: float | None = Field(default=None, gt=0)


class Structure(StrictModel):
    label: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64)
    color: tuple[Byte, Byte, Byte]
    interpreted_type: InterpretedType = InterpretedType.ORGAN
    postprocess: PostProcess = PostProcess()
    expect: Expect | None = None
    # the Dice with approved contours this version is expected to keep (drift alarm baseline)
    baseline_dice: float | None = Field(default=None, gt=0, le=1)
    commissioning: Commissioning | None = None  # acceptance criteria on local cases
    send: bool = True  # false: the model still segments it, RT-STRUCT and SEG leave it out


class Intensity(StrictModel):
    window: tuple[float, float]

    @field_validator("window")
    @classmethod
    def _ordered(cls, window: tuple[float, float]) -> tuple[float, float]:
        if window[0] >= window[1]:
            raise ValueError(f"window low {window[0]} must be below high {window[1]}")
        return window


class InputContract(StrictModel):
    spacing_mm: tuple[PositiveMm, PositiveMm, PositiveMm]  # x, y, z
    orientation: Literal["LPS"] = "LPS"
    intensity: Intensity
    patch_size: tuple[PositiveVoxels, PositiveVoxels, PositiveVoxels]  # z, y, x
    # speed settings, as nnU-Net users know them: overlap is 1 - nnU-Net's tile step (0.5 there:
    # overlap 0.5); mirror_axes (0 z, 1 y, 2 x) turns on test-time mirroring along them, every
    # combination (all three: 8 passes per fold). Leave x out for a model that tells left from
    # right unless it was trained with left-right mirroring.
    overlap: float = Field(default=0.5, ge=0, lt=1)
    batch_size: PositiveVoxels = 1
    mirror_axes: tuple[Literal[0, 1, 2], ...] = ()

    @field_validator("mirror_axes")
    @classmethod
    def _axes_once(cls, axes: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(axes)) != len(axes):
            raise ValueError(f"each axis at most once, got {list(axes)}")
        return tuple(sorted(axes))


class NnUNetSettings(StrictModel):
    """How ``nnUNetPredictor`` runs an ``nnunetv2`` package (the defaults of nnUNetv2_predict)."""

    configuration: str = Field(min_length=1)  # a key of plans.json "configurations"
    trainer: str = Field(min_length=1)  # the checkpoints' trainer class
    checkpoint: str = Field(default="checkpoint_final.pth", pattern=_SAFE_NAME)
    mirroring: bool = True  # test-time mirroring along the axes the checkpoint allows
    step_size: float = Field(default=0.5, gt=0, le=1)  # sliding-window step, fraction of patch


class MonaiSettings(StrictModel):
    """Where a ``monai_bundle`` package keeps its configs (paths inside the package)."""

    config: str = Field(default="configs/inference.json", pattern=_SAFE_PATH)
    meta: str = Field(default="configs/metadata.json", pattern=_SAFE_PATH)
    probe_size: tuple[PositiveVoxels, PositiveVoxels, PositiveVoxels] = (32, 32, 32)


class Fold(StrictModel):
    file: str = Field(pattern=_SAFE_PATH)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"must be 64 lowercase hex digits (sha256sum output), got {sha256!r}")
        return sha256


class Manifest(StrictModel):
    """The validated ``model.yaml``; ``structures`` are kept sorted by label."""

    model_config = ConfigDict(coerce_numbers_to_str=True)  # version: 3 in YAML is the text "3"

    name: str = Field(pattern=_SAFE_NAME)
    version: str = Field(pattern=_SAFE_NAME)
    description: str = ""
    format: ModelFormat = ModelFormat.NATIVE
    structures: tuple[Structure, ...]
    input: InputContract | None = None  # native only: the framework formats preprocess themselves
    nnunet: NnUNetSettings | None = None
    monai: MonaiSettings | None = None
    folds: tuple[Fold, ...]
    files: tuple[Fold, ...] = ()  # the package's other files (configs, plans), checked the same

    @model_validator(mode="after")
    def _settings_match_format(self) -> Manifest:
        needs = {
            ModelFormat.NATIVE: "input",
            ModelFormat.NNUNETV2: "nnunet",
            ModelFormat.MONAI_BUNDLE: "monai",
        }
        for fmt, key in needs.items():
            present = getattr(self, key) is not None
            if fmt is self.format and not present and fmt is not ModelFormat.MONAI_BUNDLE:
                raise ValueError(f"format {self.format} needs the {key!r} section")
            if fmt is not self.format and present:
                raise ValueError(f"{key!r} belongs to format {fmt}, not {self.format}")
        if self.format is ModelFormat.MONAI_BUNDLE and len(self.folds) != 1:
            raise ValueError("a monai_bundle has exactly one model file in 'folds'")
        return self

    @field_validator("structures")
    @classmethod
    def _labels_contiguous(cls, structures: tuple[Structure, ...]) -> tuple[Structure, ...]:
        if not structures:
            raise ValueError("at least one structure is required")
        labels = sorted(s.label for s in structures)
        if labels != list(range(1, len(structures) + 1)):
            raise ValueError(f"labels must be 1..{len(structures)}, each once (output channel = label); got {labels}")
        names = [s.name for s in structures]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"structure names must be unique; repeated: {', '.join(duplicates)}")
        unknown = sorted(
            {s.expect.inside for s in structures if s.expect and s.expect.inside and s.expect.inside not in names}
        )
        if unknown:
            raise ValueError(f"expect.inside names no structure of this model: {', '.join(unknown)}")
        return tuple(sorted(structures, key=lambda s: s.label))

    @field_validator("folds")
    @classmethod
    def _files_unique(cls, folds: tuple[Fold, ...]) -> tuple[Fold, ...]:
        if not folds:
            raise ValueError("at least one fold file is required")
        files = [f.file for f in folds]
        if len(set(files)) != len(files) or MANIFEST_NAME in files:
            raise ValueError(f"fold files must be distinct and not {MANIFEST_NAME}; got {files}")
        return folds

    @model_validator(mode="after")
    def _files_distinct(self) -> Manifest:
        names = [f.file for f in (*self.folds, *self.files)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated or MANIFEST_NAME in names:
            raise ValueError(f"package files must be distinct and not {MANIFEST_NAME}: {repeated}")
        return self

    @property
    def contract(self) -> InputContract:
        """The native input contract; ModelError for the formats that preprocess themselves."""
        if self.input is None:
            raise ModelError(f"{self.name}@{self.version} ({self.format}) has no native input contract")
        return self.input

    @property
    def channels(self) -> int:
        """Channels every fold must output: background plus one per structure."""
        return 1 + len(self.structures)


def load_manifest(package_dir: Path) -> Manifest:
    """Read and validate ``package_dir/model.yaml``; raise ManifestInvalid naming file:line: key."""
    try:
        return load_model(package_dir / MANIFEST_NAME, Manifest)
    except ConfigError as exc:
        raise ManifestInvalid(exc.errors) from exc
