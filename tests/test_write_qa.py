"""QA image: a PNG of the documented size with every structure's outline in its colour, panels
scaled to physical size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.pictures import PANEL_PX, QA_SIZE, render_qa_png
from tests.write_case import DEMO_STRUCTURES, MODEL


@pytest.fixture(scope="module")
def png(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, tuple[float, float, float], tuple[int, ...]]:
    phantom = make_phantom(4, slices=60, size=128, pixel_mm=3.2, slice_mm=2.5)
    spacing = (phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm)
    path = tmp_path_factory.mktemp("qa") / "qa.png"
    render_qa_png(phantom.hu, phantom.labels, DEMO_STRUCTURES, spacing, MODEL, path)
    return path, spacing, phantom.labels.shape


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_png_has_the_documented_size(
    png: tuple[Path, tuple[float, float, float], tuple[int, ...]],
) -> None:
    with Image.open(png[0]) as image:
        assert image.size == QA_SIZE


def test_every_structure_colour_is_drawn_in_the_panels(
    png: tuple[Path, tuple[float, float, float], tuple[int, ...]],
) -> None:
    panels = _pixels(png[0])[:PANEL_PX].reshape(-1, 3)
    for structure in DEMO_STRUCTURES:
        hits = np.all(panels == structure.color, axis=1).sum()
        assert hits > 20, structure.name


def test_coronal_panel_has_the_physical_aspect_ratio(tmp_path: Path) -> None:
    # anisotropic on purpose: 3.2 mm pixels, 2.5 mm slices; soft tissue everywhere, so the whole
    # panel is grey and its extent shows against the black canvas
    phantom = make_phantom(4, slices=60, size=128, pixel_mm=3.2, slice_mm=2.5)
    nz, _, nx = phantom.labels.shape
    hu = np.full(phantom.labels.shape, 40, dtype=np.int16)
    path = render_qa_png(
        hu, phantom.labels, DEMO_STRUCTURES, (3.2, 3.2, 2.5), MODEL, tmp_path / "qa.png"
    )
    coronal = _pixels(path)[:PANEL_PX, PANEL_PX : 2 * PANEL_PX]
    rows = np.flatnonzero(coronal.any(axis=(1, 2)))
    cols = np.flatnonzero(coronal.any(axis=(0, 2)))
    width, height = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
    assert width / height == pytest.approx((nx * 3.2) / (nz * 2.5), rel=0.02)
    assert abs(width / height - nx / nz) > 0.5  # not drawn with square voxels
