"""Post-processing of a label map: components, holes, minimum volume."""

from __future__ import annotations

import numpy as np

from ie_gateway.infer.manifest import PostProcess, Structure
from ie_gateway.infer.postprocess import (
    keep_components,
    label_volumes_cc,
    postprocess_labels,
)


def structure(label: int, **rules: object) -> Structure:
    return Structure(
        label=label, name=f"S{label}", color=(1, 2, 3), postprocess=PostProcess(**rules)
    )


def two_blobs() -> np.ndarray:
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[2:8, 2:10, 2:10] = 1  # 384 voxels
    labels[4:6, 14:16, 14:16] = 1  # 8 voxels
    return labels


def ring(labels: np.ndarray, label: int) -> None:
    labels[2:8, 4:16, 4:16] = label
    labels[2:8, 7:13, 7:13] = 0


def test_largest_component_keeps_only_the_big_blob() -> None:
    labels = two_blobs()
    postprocess_labels(labels, [structure(1, largest_component=True)], voxel_cc=0.001)
    assert labels.sum() == 384
    assert labels[2:8, 2:10, 2:10].all()


def test_diagonal_neighbours_are_one_component() -> None:
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True
    assert keep_components(mask, largest=True, min_voxels=0).sum() == 3


def test_min_volume_drops_the_small_blob_and_keeps_the_big_one() -> None:
    labels = two_blobs()
    postprocess_labels(labels, [structure(1, min_volume_cc=0.05)], voxel_cc=0.001)  # 50 voxels
    assert labels.sum() == 384


def test_min_volume_removes_a_structure_smaller_than_the_minimum() -> None:
    labels = two_blobs()
    postprocess_labels(labels, [structure(1, min_volume_cc=1.0)], voxel_cc=0.001)
    assert not labels.any()


def test_fill_holes_fills_a_rings_hole_in_every_slice() -> None:
    # The hole is open through the slices above and below, so only a per-slice fill closes it.
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    ring(labels, 1)
    postprocess_labels(labels, [structure(1, fill_holes=True)], voxel_cc=0.001)
    assert (labels[2:8, 4:16, 4:16] == 1).all()
    assert labels[:2].sum() == 0 and labels[8:].sum() == 0


def test_fill_holes_does_not_overwrite_a_structure_inside_the_ring() -> None:
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    ring(labels, 1)
    labels[2:8, 8:12, 8:12] = 2
    postprocess_labels(labels, [structure(1, fill_holes=True), structure(2)], voxel_cc=0.001)
    assert (labels[2:8, 8:12, 8:12] == 2).all()
    assert (labels[2:8, 7, 7:13] == 1).all()


def test_structures_without_rules_are_left_alone() -> None:
    labels = two_blobs()
    postprocess_labels(labels, [structure(1)], voxel_cc=0.001)
    assert (labels == two_blobs()).all()


def test_volumes_are_voxel_counts_times_voxel_volume() -> None:
    labels = two_blobs()
    labels[0, 0, :5] = 2
    volumes = label_volumes_cc(labels, [structure(1), structure(2)], voxel_cc=0.5)
    assert volumes == {"S1": 392 * 0.5, "S2": 5 * 0.5}
