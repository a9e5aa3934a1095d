"""Per-structure clean-up of a label map on the CT grid, as each structure's manifest entry asks.

Order per structure: connected components (keep the largest and/or drop those under the minimum
volume), then fill holes slice by slice. Filling only claims background voxels, so an organ
lying inside another structure (the lungs inside the External) is never overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ie_gateway.infer.manifest import Structure

# Components: 26-connected, so a thin oblique structure (spinal cord across slices) stays whole.
_COMPONENT_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
# Holes: 4-connected within one axial slice and never across slices, which is how a contour
# (one polygon set per slice) sees them.
_AXIAL_HOLES = np.zeros((3, 3, 3), dtype=bool)
_AXIAL_HOLES[1] = ndimage.generate_binary_structure(2, 1)
# Label counting in slabs bounds the temporary np.bincount makes (it widens to intp).
_COUNT_SLAB = 16


def keep_components(mask: np.ndarray, *, largest: bool, min_voxels: int) -> np.ndarray:
    """Voxels of ``mask`` in components of at least ``min_voxels``; only the biggest if asked."""
    components, count = ndimage.label(mask, structure=_COMPONENT_STRUCTURE)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= max(min_voxels, 1)
    if largest:
        biggest = int(np.argmax(sizes))
        keep[:] = False
        keep[biggest] = sizes[biggest] >= max(min_voxels, 1)
    return keep[components]


def fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """``mask`` (z, y, x) with holes filled in each axial slice independently."""
    return ndimage.binary_fill_holes(mask, structure=_AXIAL_HOLES)


def postprocess_labels(labels: np.ndarray, structures: Sequence[Structure], voxel_cc: float) -> None:
    """Apply each structure's post-processing to ``labels`` (z, y, x) in place."""
    boxes = ndimage.find_objects(labels, max_label=max(s.label for s in structures))
    for structure in structures:
        box = boxes[structure.label - 1]
        rules = structure.postprocess
        if box is None or not (rules.largest_component or rules.fill_holes or rules.min_volume_cc):
            continue
        view = labels[box]
        mask = view == structure.label
        min_voxels = int(np.ceil(rules.min_volume_cc / voxel_cc)) if rules.min_volume_cc else 0
        if rules.largest_component or min_voxels:
            kept = keep_components(mask, largest=rules.largest_component, min_voxels=min_voxels)
            view[mask & ~kept] = 0
            mask = kept
        if rules.fill_holes:
            view[fill_holes_axial(mask) & (view == 0)] = structure.label


def label_volumes_cc(labels: np.ndarray, structures: Sequence[Structure], voxel_cc: float) -> dict[str, float]:
    """Volume in cc of each structure (by name) in ``labels`` (z, y, x)."""
    n = max(s.label for s in structures) + 1
    counts = np.zeros(n, dtype=np.int64)
    for z in range(0, labels.shape[0], _COUNT_SLAB):
        counts += np.bincount(labels[z : z + _COUNT_SLAB].ravel(), minlength=n)[:n]
    return {s.name: float(counts[s.label] * voxel_cc) for s in structures}
