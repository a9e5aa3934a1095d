"""The structures' masks both writers encode: holes filled in the axial plane, never across it."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from scipy import ndimage

from ie_gateway import imaging
from ie_gateway.imaging import (
    bounding_box,
    fill_holes_per_slice,
    for_each_structure,
    in_parallel,
    label_box,
    make_masks,
)
from ie_gateway.write import StructureInfo, structure_mask

BODY = StructureInfo(label=1, name="Body", color=(0, 200, 0), interpreted_type="EXTERNAL", fill_holes=True)


def _per_slice_reference(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask])


def test_holes_are_filled_per_slice() -> None:
    labels = np.zeros((4, 12, 12), dtype=np.uint8)
    labels[:, 2:10, 2:10] = 1
    labels[:, 4:8, 4:8] = 0  # a tunnel along z, closed in-plane on slices 1..3
    labels[0, 4:6, 8:10] = 0  # slice 0: the tunnel opens to the outside in-plane
    labels[2, 2, 2] = 0  # slice 2: a notch in the corner, outside
    labels[3, 5, 9] = labels[3, 4, 9] = 0  # slice 3: a bay open to the right edge
    labels[3, 3, 3] = 0  # slice 3: a one-voxel hole, only diagonal to the tunnel
    mask = structure_mask(labels, BODY)

    assert not mask[0, 4:8, 4:8].any()  # open on its own slice: no hole to fill there
    assert mask[1:3, 4:8, 4:8].all()  # enclosed in-plane, though open along z through slice 0
    assert not mask[2, 2, 2]
    assert not mask[3, 4:6, 9].any()
    assert mask[3, 3, 3] and mask[3, 4:8, 4:8].all()  # diagonal contact does not let it out
    assert np.array_equal(mask, _per_slice_reference(labels == 1))


def test_a_structure_without_fill_keeps_its_holes() -> None:
    labels = np.zeros((1, 9, 9), dtype=np.uint8)
    labels[0, 1:8, 1:8] = 1
    labels[0, 3:6, 3:6] = 0
    organ = StructureInfo(**{**BODY.__dict__, "fill_holes": False})
    assert np.array_equal(structure_mask(labels, organ), labels == 1)


@pytest.mark.parametrize("chunk_voxels", [1, 50, 1 << 20])
def test_fill_holes_per_slice_is_binary_fill_holes_of_each_slice(
    chunk_voxels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imaging, "_FILL_CHUNK_VOXELS", chunk_voxels)  # slices labelled together
    rng = np.random.default_rng(5)
    for _ in range(100):
        shape = (int(rng.integers(1, 7)), int(rng.integers(1, 20)), int(rng.integers(1, 20)))
        mask = rng.random(shape) < rng.uniform(0.3, 0.9)
        assert np.array_equal(fill_holes_per_slice(mask), _per_slice_reference(mask))


def _structures(count: int) -> list[StructureInfo]:
    return [
        StructureInfo(**{**BODY.__dict__, "label": n, "name": f"S{n}", "fill_holes": n % 2 == 1})
        for n in range(1, count + 1)
    ]


def test_masks_made_in_parallel_are_each_structures_mask_in_order() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=(5, 16, 16)).astype(np.uint8)
    structures = _structures(6)
    masks = make_masks(labels, structures)
    assert list(masks) == [s.label for s in structures]
    for s in structures:
        assert np.array_equal(masks[s.label], structure_mask(labels, s))


def test_structure_work_runs_on_the_helper_threads_and_makes_missing_masks_itself() -> None:
    labels = np.zeros((2, 8, 8), dtype=np.uint8)
    labels[:, 2:6, 2:6] = 1
    labels[:, 3:5, 3:5] = 2
    structures = _structures(2)
    given = {2: np.ones_like(labels, dtype=bool)}  # the caller's mask is used as it is

    def work(structure: StructureInfo, mask: np.ndarray) -> tuple[int, str, int]:
        return structure.label, threading.current_thread().name, int(mask.sum())

    done = for_each_structure(work, labels, structures, given)
    assert [label for label, _, _ in done] == [1, 2]
    assert all(name.startswith("helper") for _, name, _ in done)
    assert [voxels for _, _, voxels in done] == [int((labels >= 1).sum()), labels.size]  # 1: its hole filled


def test_the_first_failing_structure_s_error_is_raised_to_the_caller() -> None:
    class Refused(Exception):
        pass

    def work(structure: StructureInfo, mask: np.ndarray) -> int:
        if structure.label >= 2:
            raise Refused(structure.name)
        return structure.label

    with pytest.raises(Refused, match="S2"):
        for_each_structure(work, np.ones((1, 4, 4), dtype=np.uint8), _structures(4))


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_work_handed_over_by_a_background_thread_keeps_its_lower_cpu_priority() -> None:
    main_nice = _nice()
    seen: dict[str, list[int]] = {}

    def background() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), main_nice + 5)  # as the prepare lane
        seen["background"] = in_parallel(lambda _: _nice(), range(6))

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    seen["main"] = in_parallel(lambda _: _nice(), range(6))
    assert seen == {"background": [main_nice + 5] * 6, "main": [main_nice] * 6}


def test_a_labels_box_is_the_bounding_box_of_its_voxels_across_chunks() -> None:
    rng = np.random.default_rng(7)
    labels = np.zeros((21, 9, 11), dtype=np.uint8)  # 21 slices: chunks of 8, 8 and 5
    labels[3, 2, 4] = labels[17, 6, 1] = labels[20, 8, 10] = 2
    labels[8:10] = rng.integers(3, 5, size=(2, 9, 11))
    for label in (2, 3, 4):
        assert label_box(labels, label) == bounding_box(labels == label)
    assert label_box(labels, 1) is None


def _box_of_voxels(mask: np.ndarray) -> tuple[slice, ...] | None:
    found = np.argwhere(mask)
    if found.size == 0:
        return None
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(found.min(axis=0), found.max(axis=0), strict=True))


@pytest.mark.parametrize(
    "shape",
    [(7, 16, 24), (5, 9, 11), (6, 8), (13,)],  # eight voxels a word, rows of odd length, 2-D, 1-D
)
def test_a_masks_box_spans_exactly_its_voxels(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for _ in range(20):
        mask = rng.random(shape) > 0.97
        assert bounding_box(mask) == _box_of_voxels(mask)
        view = mask[..., ::2]  # not contiguous: read as it is, not eight at a time
        assert bounding_box(view) == _box_of_voxels(view)
    assert bounding_box(np.zeros(shape, dtype=bool)) is None
    lone = np.zeros(shape, dtype=bool)
    lone[tuple(n - 1 for n in shape)] = True  # the last voxel, in the last word of the last slice
    assert bounding_box(lone) == tuple(slice(n - 1, n) for n in shape)


def test_a_structures_mask_is_the_same_written_within_its_box() -> None:
    labels = np.zeros((12, 16, 16), dtype=np.uint8)
    labels[2:11, 3:13, 4:14] = 1
    labels[5, 6:9, 6:9] = 0  # a hole filled for the body
    labels[9, 0, 0] = 1  # a stray voxel far from the rest widens the box
    mask = structure_mask(labels, BODY)
    assert np.array_equal(mask, _per_slice_reference(labels == 1))
