"""Agreement figures computed independently of the node: SimpleITK and DeepMind's surface-distance.

The node uses MONAI's metrics. Here the same definitions are rebuilt from other libraries'
pieces, so a test can check the node's figures against them:
Dice and volumes from SimpleITK's label statistics; HD95 and mean surface distance from the
boundary voxels (SimpleITK's binary contour, face-connected) and SimpleITK's exact Euclidean
distance map; surface Dice from DeepMind's surface-distance (sub-voxel surface elements).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import surface_distance  # type: ignore[import-untyped]  # DeepMind's package ships no type hints


def _image(mask: np.ndarray, spacing_zyx: Sequence[float]) -> sitk.Image:
    # one voxel of background all round, so a structure touching the grid's edge has a surface there
    image = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    return image


def _directed(a: sitk.Image, b: sitk.Image) -> np.ndarray:
    """Distances (mm) from each boundary voxel of ``a`` to the nearest boundary voxel of ``b``."""
    edge_a = sitk.BinaryContour(a, fullyConnected=False)
    edge_b = sitk.BinaryContour(b, fullyConnected=False)
    distance = sitk.SignedMaurerDistanceMap(edge_b, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    values = np.abs(sitk.GetArrayFromImage(distance))
    values[sitk.GetArrayFromImage(edge_b) > 0] = 0.0
    return values[sitk.GetArrayFromImage(edge_a) > 0]


def reference_figures(ai: np.ndarray, approved: np.ndarray, spacing_zyx: Sequence[float],
                      tolerance_mm: float = 2.0) -> dict[str, float]:
    a, b = _image(ai, spacing_zyx), _image(approved, spacing_zyx)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(a, b)
    shapes = []
    for image in (a, b):
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(image)
        shapes.append(stats.GetPhysicalSize(1) / 1000.0)
    ab, ba = _directed(a, b), _directed(b, a)
    distances = surface_distance.compute_surface_distances(approved, ai, tuple(spacing_zyx))
    return {
        "dice": overlap.GetDiceCoefficient(),
        "hd95_mm": max(float(np.percentile(ab, 95)), float(np.percentile(ba, 95))),
        "msd_mm": float(np.concatenate([ab, ba]).mean()),
        "surface_dice": float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance_mm)),
        "volume_ai_cc": shapes[0],
        "volume_approved_cc": shapes[1],
    }
