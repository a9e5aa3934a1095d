"""Pictures of a contoured CT: the write stage's quick-look QA PNG, for a physicist to judge a
result at a glance, the admin page's slices and the commissioning report's comparisons.

Below the stages, like ``imaging``: the worker, the page and the report draw with it, and it
imports none of them.

Three panels (axial, coronal, sagittal) through the centre of the organs, each scaled to its
physical size so anisotropic voxels show undistorted, in a soft-tissue window with every
structure's outline in its colour, then a legend and the model that made the contours. The
image carries no patient identifiers: none are passed in.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ie_gateway.imaging import StructureInfo
from ie_gateway.vocab import InterpretedType


class ModelNamed(Protocol):
    """What the legend names: the model that drew the contours (``write.common.ModelInfo``)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


PANEL_PX = 512
LEGEND_PX = 96
#: (width, height) of every QA image: three square panel tiles above a legend band.
QA_SIZE = (3 * PANEL_PX, PANEL_PX + LEGEND_PX)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU: level 40, width 400
_BACKGROUND = (0, 0, 0)
_TEXT = (255, 255, 255)


def _centre(labels: np.ndarray, structures: Sequence[StructureInfo]) -> tuple[int, int, int]:
    """Voxel (z, y, x) at the centre of mass of the organs (the body if there are none)."""
    organs = [s.label for s in structures if s.interpreted_type != InterpretedType.EXTERNAL]
    for mask in (np.isin(labels, organs), labels > 0):
        if mask.any():
            z, y, x = ndimage.center_of_mass(mask)
            return round(z), round(y), round(x)
    nz, ny, nx = labels.shape
    return nz // 2, ny // 2, nx // 2


def _views(
    hu: np.ndarray,
    labels: np.ndarray,
    centre: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """(HU image, label image, width mm, height mm) of each panel, superior at the top."""
    z, y, x = centre
    sx, sy, sz = spacing
    nz, ny, nx = labels.shape
    return [
        (hu[z], labels[z], nx * sx, ny * sy),
        (hu[::-1, y, :], labels[::-1, y, :], nx * sx, nz * sz),
        (hu[::-1, :, x], labels[::-1, :, x], ny * sy, nz * sz),
    ]


def _grey(hu: np.ndarray, size: tuple[int, int], window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> Image.Image:
    low, high = window
    scaled = np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0
    return Image.fromarray(scaled.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR).convert("RGB")


def _outline(labels: np.ndarray, structure: StructureInfo, size: tuple[int, int]) -> np.ndarray | None:
    """Boolean outline (display pixels) of a structure on one panel, or None if absent."""
    mask = labels == structure.label
    if not mask.any():
        return None
    if structure.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    shown = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    outline = np.zeros_like(shown)
    rows, cols = np.flatnonzero(shown.any(axis=1)), np.flatnonzero(shown.any(axis=0))
    if rows.size == 0:
        return outline
    # erode only the structure's box plus a margin: beyond it all is background either way, and
    # a small organ on a 512-pixel panel then costs a fraction of the whole panel's erosion
    box = (slice(max(rows[0] - 2, 0), rows[-1] + 3), slice(max(cols[0] - 2, 0), cols[-1] + 3))
    inner = shown[box]
    outline[box] = inner & ~ndimage.binary_erosion(inner, iterations=2)
    return outline


def _panel(
    hu: np.ndarray,
    labels: np.ndarray,
    extent_mm: tuple[float, float],
    structures: Sequence[StructureInfo],
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
) -> Image.Image:
    scale = min(PANEL_PX / extent_mm[0], PANEL_PX / extent_mm[1])
    size = (max(1, round(extent_mm[0] * scale)), max(1, round(extent_mm[1] * scale)))
    pixels = np.array(_grey(hu, size, window))
    # the largest first, so organs inside the body outline are drawn over it
    for structure in sorted(structures, key=lambda s: -int((labels == s.label).sum())):
        outline = _outline(labels, structure, size)
        if outline is not None:
            pixels[outline] = structure.color
    return Image.fromarray(pixels)


def _legend(canvas: Image.Image, structures: Sequence[StructureInfo], model: ModelNamed) -> None:
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    x, y = 16, PANEL_PX + 16
    for structure in structures:
        draw.rectangle((x, y + 2, x + 16, y + 18), fill=structure.color)
        draw.text((x + 24, y), structure.name, fill=_TEXT, font=font)
        x += 48 + int(draw.textlength(structure.name, font=font))
    note = f"AI contours by {model.name} v{model.version}, not approved by a clinician"
    draw.text((16, PANEL_PX + 52), note, fill=_TEXT, font=font)


def render_qa_png(
    ct_volume_hu: np.ndarray,
    labels: np.ndarray,
    structures: Sequence[StructureInfo],
    spacing: tuple[float, float, float],
    model: ModelNamed,
    out_path: Path,
) -> Path:
    """Write the QA image of ``labels`` over ``ct_volume_hu`` (both (z, y, x)) to ``out_path``.

    ``spacing`` is (x, y, z) in mm; slice index z must increase towards the head (LPS with
    identity direction, as the volume stage delivers). The image is :data:`QA_SIZE`.
    """
    canvas = Image.new("RGB", QA_SIZE, _BACKGROUND)
    centre = _centre(labels, structures)
    for i, (hu, lab, width, height) in enumerate(_views(ct_volume_hu, labels, centre, spacing)):
        panel = _panel(hu, lab, (width, height), structures)
        offset = (i * PANEL_PX + (PANEL_PX - panel.width) // 2, (PANEL_PX - panel.height) // 2)
        canvas.paste(panel, offset)
    _legend(canvas, structures, model)
    canvas.save(out_path, format="PNG")
    return out_path


#: Outline colour of the clinician's contour on a comparison picture (the AI's keeps its own).
APPROVED_COLOR = (255, 255, 255)


def render_comparison_png(
    ct_volume_hu: np.ndarray,
    ai: np.ndarray,
    approved: np.ndarray,
    spacing: tuple[float, float, float],
    color: tuple[int, int, int],
    caption: str,
    out_path: Path,
) -> Path:
    """Write a picture of one structure as the AI drew it (``ai``, in ``color``) and as a
    clinician approved it (``approved``, white), both (z, y, x) masks over ``ct_volume_hu``, on
    the same axial, coronal and sagittal slices through the centre of the two together.

    Same grid, orientation and size rules as :func:`render_qa_png`; ``caption`` goes under the
    panels (no patient identifiers: the caller chooses it).
    """
    ai_info = StructureInfo(label=1, name="AI", color=color, interpreted_type=InterpretedType.ORGAN)
    approved_info = StructureInfo(
        label=1, name="approved", color=APPROVED_COLOR, interpreted_type=InterpretedType.ORGAN
    )
    either = (ai | approved).astype(np.uint8)
    centre = _centre(either, [ai_info])
    canvas = Image.new("RGB", QA_SIZE, _BACKGROUND)
    views = zip(
        _views(ct_volume_hu, ai.astype(np.uint8), centre, spacing),
        _views(ct_volume_hu, approved.astype(np.uint8), centre, spacing),
        strict=True,
    )
    for i, ((hu, ai_view, width, height), (_, approved_view, _, _)) in enumerate(views):
        panel = _panel(hu, approved_view, (width, height), [approved_info])
        shown = np.array(panel)
        outline = _outline(ai_view, ai_info, (panel.width, panel.height))
        if outline is not None:
            shown[outline] = color
        offset = (i * PANEL_PX + (PANEL_PX - panel.width) // 2, (PANEL_PX - panel.height) // 2)
        canvas.paste(Image.fromarray(shown), offset)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    x, y = 16, PANEL_PX + 16
    for label, swatch in (("AI", color), ("approved", APPROVED_COLOR)):
        draw.rectangle((x, y + 2, x + 16, y + 18), fill=swatch)
        draw.text((x + 24, y), label, fill=_TEXT, font=font)
        x += 48 + int(draw.textlength(label, font=font))
    draw.text((16, PANEL_PX + 52), caption, fill=_TEXT, font=font)
    canvas.save(out_path, format="PNG")
    return out_path


def render_slice_png(
    hu: np.ndarray,
    labels: np.ndarray,
    extent_mm: tuple[float, float],
    structures: Sequence[StructureInfo],
    window: tuple[float, float],
    approved: Sequence[tuple[StructureInfo, np.ndarray]] = (),
) -> bytes:
    """One 2D slice (superior or anterior at the top) as a PNG of at most :data:`PANEL_PX`
    pixels a side, scaled to its physical size: ``labels``' outlines of ``structures`` in their
    colours, each ``approved`` (structure, 2D mask) outline in white, over ``hu`` in ``window``."""
    panel = np.array(_panel(hu, labels, extent_mm, structures, window))
    size = (panel.shape[1], panel.shape[0])
    for structure, mask in approved:
        outline = _outline(mask.astype(np.uint8), replace(structure, label=1, fill_holes=False), size)
        if outline is not None:
            panel[outline] = APPROVED_COLOR
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
