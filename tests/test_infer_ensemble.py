"""Ensemble: fold averaging, sliding windows, resampling to the model grid and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.infer.ensemble import Ensemble, ModelGrid, argmax_on_grid, model_grid, window_starts
from ie_gateway.infer.manifest import load_manifest
from ie_gateway.infer.registry import ModelVersion
from tests.infer_packages import Pointwise, threshold_model, write_package

FOLDS = [
    Pointwise([0.0, 2.0, -3.0], [0.5, -1.0, 1.5]),
    Pointwise([1.0, -2.0, 4.0], [0.0, 0.3, -2.0]),
    Pointwise([-1.5, 0.5, 3.0], [0.2, 0.0, -0.7]),
]
# HU above -500 is label 1 (windowed -1000..1000 → 0.25).
BODY_LEVEL = 0.25


def package(tmp_path: Path, folds: list[torch.nn.Module], **kwargs: object) -> ModelVersion:
    folder = write_package(tmp_path, folds, **kwargs)  # type: ignore[arg-type]
    manifest = load_manifest(folder)
    return ModelVersion(manifest.name, manifest.version, folder, manifest)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def phantom_image(direction: str) -> tuple[sitk.Image, np.ndarray]:
    """A small thorax phantom as a CT image, and the voxels above -500 HU on its grid."""
    phantom = make_phantom(3, slices=24, size=96, pixel_mm=4.0, slice_mm=5.0)
    hu = phantom.hu
    origin = phantom.origin
    if direction == "feet-first":  # same anatomy stored top slice first, z axis reversed
        hu = hu[::-1]
        origin = (origin[0], origin[1], origin[2] + (hu.shape[0] - 1) * phantom.slice_mm)
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu))
    image.SetSpacing((phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm))
    image.SetOrigin(origin)
    if direction == "feet-first":
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    return image, hu > -500


@pytest.mark.parametrize("shape", [(13, 21, 30), (5, 16, 40)])
def test_probabilities_are_the_mean_of_the_folds_softmax(
    tmp_path: Path, shape: tuple[int, int, int]
) -> None:
    model = package(tmp_path, FOLDS, patch=(8, 16, 16), overlap=0.5, batch_size=3)
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    got = Ensemble(model, device="cpu").probabilities(volume)
    x = torch.from_numpy(volume)[None, None]
    with torch.no_grad():
        expected = torch.stack([torch.softmax(f(x), dim=1) for f in FOLDS]).mean(dim=0)[0]
    assert got.shape == (3, *shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "direction",
    [
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        (1, 0, 0, 0, 1, 0, 0, 0, -1),
        (0.98480775, -0.17364818, 0, 0.17364818, 0.98480775, 0, 0, 0, 1),
    ],
    ids=["axial", "feet-first", "oblique"],
)
def test_label_map_is_exactly_on_the_ct_grid(tmp_path: Path, direction: tuple[float, ...]) -> None:
    model = package(tmp_path, [threshold_model(3, BODY_LEVEL)], patch=(8, 16, 16))
    image = sitk.GetImageFromArray(np.full((11, 37, 29), -1000, dtype=np.int16))
    image.SetOrigin((-123.4, 56.7, -300.25))
    image.SetSpacing((0.77, 0.81, 3.0))
    image.SetDirection(direction)
    labels = Ensemble(model, device="cpu").segment(image).labels
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == image.GetSize()
    assert labels.GetOrigin() == image.GetOrigin()
    assert labels.GetSpacing() == image.GetSpacing()
    assert labels.GetDirection() == image.GetDirection()


@pytest.mark.parametrize("direction", ["head-first", "feet-first"])
def test_segmentation_comes_back_on_the_right_voxels(tmp_path: Path, direction: str) -> None:
    model = package(
        tmp_path, [threshold_model(2, BODY_LEVEL)], structures=1, patch=(16, 32, 32), overlap=0.25
    )
    image, truth = phantom_image(direction)
    segmentation = Ensemble(model, device="cpu").segment(image)
    labels = sitk.GetArrayFromImage(segmentation.labels)
    assert dice(labels == 1, truth) > 0.99
    voxel_cc = np.prod(image.GetSpacing()) / 1000
    assert segmentation.volumes_cc == {"External": pytest.approx((labels == 1).sum() * voxel_cc)}
    assert segmentation.folds == 1 and segmentation.windows > 1
    assert set(segmentation.timings_s) >= {
        "resample",
        "windows",
        "resample_back",
        "postprocess",
        "total",
    }


def test_postprocessing_runs_on_the_ct_grid(tmp_path: Path) -> None:
    model = package(
        tmp_path,
        [threshold_model(2, BODY_LEVEL)],
        structures=1,
        patch=(16, 32, 32),
        postprocess={"largest_component": True},
    )
    hu = np.full((20, 64, 64), -1000, dtype=np.int16)
    hu[4:16, 10:40, 10:40] = 40  # body
    hu[8:10, 50:54, 50:54] = 40  # a small separate object (a marker on the skin)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.5, 2.5))
    labels = sitk.GetArrayFromImage(Ensemble(model, device="cpu").segment(image).labels)
    assert not labels[8:10, 50:54, 50:54].any()
    assert dice(labels == 1, hu > -500) > 0.9


@pytest.mark.parametrize(
    ("size", "patch", "overlap"),
    [(100, 32, 0.5), (33, 32, 0.5), (32, 32, 0.5), (251, 128, 0.25), (7, 8, 0.5)],
)
def test_windows_cover_the_axis_with_at_least_the_overlap(
    size: int, patch: int, overlap: float
) -> None:
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    assert starts[-1] == max(size - patch, 0)
    assert all(0 < b - a <= patch * (1 - overlap) for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("direction", ["axial", "oblique"])
def test_argmax_on_the_ct_grid_equals_resampling_every_channel_everywhere(direction: str) -> None:
    image = sitk.Image(70, 60, 17, sitk.sitkInt16)
    image.SetOrigin((-40.3, 12.9, 101.7))
    image.SetSpacing((0.9, 1.1, 2.7))
    if direction == "oblique":
        image.SetDirection((0.9961947, -0.0871557, 0, 0.0871557, 0.9961947, 0, 0, 0, 1))
    grid: ModelGrid = model_grid(image, (2.0, 2.0, 2.5))
    rng = np.random.default_rng(7)
    shape = (4, *reversed(grid.size))
    logits = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 2, 2, 2)) * 20
    z, y, x = np.indices(shape[1:]) / np.array(shape[1:])[:, None, None, None]
    logits[0] += 6 * (((z - 0.5) / 0.3) ** 2 + ((y - 0.4) / 0.25) ** 2 + ((x - 0.6) / 0.2) ** 2 > 1)
    probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy().astype(np.float32)

    expected_channels = []
    for channel in range(shape[0]):
        source = sitk.GetImageFromArray(probs[channel])
        source.SetOrigin(grid.origin)
        source.SetSpacing(grid.spacing)
        default = 1.0 if channel == 0 else 0.0
        resampled = sitk.Resample(source, image, sitk.Transform(), sitk.sitkLinear, default)
        expected_channels.append(sitk.GetArrayFromImage(resampled))
    expected = np.argmax(np.stack(expected_channels), axis=0)

    got = argmax_on_grid(probs, grid, image)
    assert 0 < (expected > 0).mean() < 0.5  # foreground is there, and only in part of the CT
    assert got.shape == expected.shape
    assert (got == expected).all()
