"""A department's ROI names: how a destination wants the model's structures named and coloured.

Model packages name their structures canonically (AAPM TG-263: ``Lung_L``, ``SpinalCord``); a
planning system's protocols often expect the department's own names. A destination's
``names:`` file maps one to the other on the way out::

    rois:
      Lung_L: {name: LUNG_LT}                  # renamed
      Heart: {name: HEART, color: [255, 0, 0]}  # renamed and recoloured
      SpinalCord: {send: false}                 # left out of what this destination gets
    unlisted: keep                              # keep (model name) | drop

The file is checked when the config loads (every error as ``file:line: key: why``), including
each local name against the destination's ``max_roi_name``, so a name the TPS would refuse
never waits until a result is sent.

A leaf below the config: the config loads names files through it, and it imports nothing of
the node but the YAML loader (a destination is whatever has ``names`` and ``max_roi_name``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ie_gateway.yamlfile import StrictModel, load_model

if TYPE_CHECKING:  # the config loads names files without the imaging stack
    from ie_gateway.imaging import StructureInfo

Byte = Annotated[int, Field(ge=0, le=255)]


class RoiName(StrictModel):
    """What one model structure becomes at this destination."""

    name: str | None = Field(None, min_length=1, max_length=64)
    color: tuple[Byte, Byte, Byte] | None = None
    send: bool = True

    @field_validator("name")
    @classmethod
    def _fits(cls, name: str | None, info: ValidationInfo) -> str | None:
        limit = int((info.context or {}).get("max_roi_name", 64))
        if name is not None and len(name) > limit:
            raise ValueError(
                f"{name!r} has {len(name)} characters; the destination takes at most {limit} (max_roi_name)"
            )
        return name


class RoiNames(StrictModel):
    """The validated names file of a destination."""

    rois: dict[str, RoiName] = {}
    unlisted: Literal["keep", "drop"] = "keep"

    @model_validator(mode="after")
    def _distinct(self) -> RoiNames:
        local = [r.name for r in self.rois.values() if r.name is not None and r.send]
        twice = sorted({n for n in local if local.count(n) > 1})
        if twice:
            raise ValueError(f"several structures would arrive as {', '.join(twice)}")
        return self

    def local_name(self, name: str) -> str | None:
        """What a model structure is called at this destination; None: it is left out."""
        entry = self.rois.get(name)
        if entry is None:
            return name if self.unlisted == "keep" else None
        return (entry.name or name) if entry.send else None

    def apply(self, structures: Sequence[StructureInfo]) -> list[StructureInfo]:
        """The structures this destination gets, renamed and recoloured, in the model's order."""
        out = []
        for s in structures:
            local = self.local_name(s.name)
            if local is not None:
                entry = self.rois.get(s.name)
                out.append(dataclasses.replace(s, name=local, color=(entry.color if entry else None) or s.color))
        return out


def load_roi_names(path: Path, max_roi_name: int = 64) -> RoiNames:
    """Read and check a names file; raise ConfigError with ``file:line: key: why`` lines."""
    return load_model(path, RoiNames, context={"max_roi_name": max_roi_name})


class Named(Protocol):
    """A destination as far as names go (``config.Destination``)."""

    @property
    def names(self) -> Path | None: ...

    @property
    def max_roi_name(self) -> int: ...


def site_aliases(destinations: Mapping[str, Named], sent_to: Iterable[str]) -> dict[str, list[str]]:
    """Model structure name → the local names the destinations ``sent_to`` give it (their names
    files), so that a clinician's structure set, which comes back under the local names, can be
    matched with the model's structures."""
    aliases: dict[str, list[str]] = {}
    for name in sent_to:
        dest = destinations.get(name)
        if dest is None or dest.names is None:
            continue
        for structure, entry in load_roi_names(dest.names, dest.max_roi_name).rois.items():
            if entry.name is not None and entry.name not in aliases.get(structure, []):
                aliases.setdefault(structure, []).append(entry.name)
    return aliases
