"""A small phantom CT series on disk with its labels as the "model output", for the write tests.

60 slices of 256² with a full-size field of view: real anatomy, quick to contour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from ie_gateway.demo.phantoms import STRUCTURES, make_phantom, write_ct_series
from ie_gateway.write import ModelInfo, StructureInfo

COLORS = ((0, 200, 0), (0, 128, 255), (255, 128, 0), (255, 0, 0), (255, 255, 0))
MODEL = ModelInfo(name="demo-thorax", version="1")
#: External is filled (it encloses the organs); organs keep any cut-outs.
DEMO_STRUCTURES = tuple(
    StructureInfo(
        label=i,
        name=name,
        color=COLORS[i - 1],
        interpreted_type="EXTERNAL" if name == "External" else "ORGAN",
        fill_holes=name == "External",
    )
    for i, name in enumerate(STRUCTURES, start=1)
)


@dataclass(frozen=True)
class Case:
    paths: list[Path]
    headers: list[pydicom.Dataset]  # read with stop_before_pixels, as the worker does
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]  # x, y, z mm


def make_case(folder: Path, *, seed: int = 5, slices: int = 60, size: int = 256) -> Case:
    phantom = make_phantom(seed, slices=slices, size=size, pixel_mm=1.6, slice_mm=2.5)
    paths = write_ct_series(phantom, folder, seed=seed)
    headers: list[pydicom.Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    spacing = (phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm)
    return Case(paths, headers, phantom.hu, phantom.labels, spacing)
