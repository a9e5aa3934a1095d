"""CPU inference without the kernel tax, the speed settings of model.yaml, and the CUDA seams
(precision, out of memory) that can be checked without a GPU.

The reference here is the sliding window as the ensemble ran it before its window buffers were
reused (a fresh stacked batch per step): the new path must give the same probabilities, bit for
bit, and so the same label map.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import structlog
import torch

from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.errors import ModelError
from ie_gateway.infer.ensemble import (
    Ensemble,
    _pad_to,
    _window,
    amp_dtype,
    argmax_on_grid,
    model_grid,
    window_starts,
)
from ie_gateway.infer.manifest import load_manifest
from ie_gateway.infer.registry import ModelVersion
from tests.infer_packages import write_package


class SmallNet(torch.nn.Module):
    """Two 3x3x3 convolutions with seeded random weights: outputs depend on the neighbourhood
    and on position, unlike a pointwise model, so window seams and flips show."""

    def __init__(self, seed: int, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Conv3d(1, 6, 3, padding=1)
        self.b = torch.nn.Conv3d(6, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.leaky_relu(self.a(x * 4.0 - 1.0)))


def small_model(tmp_path: Path, **kwargs: object) -> ModelVersion:
    settings: dict[str, object] = {"patch": (8, 24, 24), "overlap": 0.5, "batch_size": 3, "spacing": (4.0, 4.0, 5.0)}
    settings.update(kwargs)
    folder = write_package(tmp_path, [SmallNet(1), SmallNet(2)], **settings)  # type: ignore[arg-type]
    manifest = load_manifest(folder)
    return ModelVersion(manifest.name, manifest.version, folder, manifest)


def phantom() -> sitk.Image:
    ph = make_phantom(10_003, slices=20, size=96, pixel_mm=4.0, slice_mm=5.0)
    image = sitk.GetImageFromArray(ph.hu)
    image.SetSpacing((ph.pixel_mm, ph.pixel_mm, ph.slice_mm))
    image.SetOrigin(ph.origin)
    return image


@torch.inference_mode()
def previous_probabilities(ensemble: Ensemble, volume: np.ndarray) -> torch.Tensor:
    """The sliding window before window buffers were reused: a new stacked batch per step."""
    contract = ensemble.model.manifest.contract
    patch = contract.patch_size
    padded = _pad_to(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)), patch)
    full = tuple(padded.shape)
    acc = torch.zeros((ensemble.model.manifest.channels, *full))
    weight = torch.zeros(full)
    importance = ensemble._importance
    starts = [window_starts(s, p, contract.overlap) for s, p in zip(full, patch, strict=True)]
    boxes = list(itertools.product(*starts))
    for i in range(0, len(boxes), contract.batch_size):
        batch = boxes[i : i + contract.batch_size]
        x = torch.stack([padded[_window(b, patch)] for b in batch]).unsqueeze(1)
        total = None
        for fold in ensemble._folds:
            probs = torch.softmax(fold(x).float(), dim=1)
            total = probs if total is None else total.add_(probs)
        assert total is not None
        probs = total.div_(len(ensemble._folds)) * importance
        for box, p in zip(batch, probs, strict=True):
            acc[(slice(None), *_window(box, patch))] += p
            weight[_window(box, patch)] += importance
    acc /= weight
    return acc[:, : volume.shape[0], : volume.shape[1], : volume.shape[2]].contiguous()


def model_volume(ensemble: Ensemble, image: sitk.Image) -> np.ndarray:
    grid = model_grid(image, ensemble.model.manifest.contract.spacing_mm)
    return ensemble._resample_normalised(image, grid)


def test_reused_window_buffers_give_the_previous_label_map_on_a_phantom(tmp_path: Path) -> None:
    ensemble = Ensemble(small_model(tmp_path), device="cpu")
    image = phantom()
    volume = model_volume(ensemble, image)
    grid = model_grid(image, ensemble.model.manifest.contract.spacing_mm)
    before = previous_probabilities(ensemble, volume)
    now = ensemble.probabilities(volume)
    assert torch.equal(now, before)
    labels_before = argmax_on_grid(before.numpy(), grid, image)
    first = sitk.GetArrayFromImage(ensemble.segment(image).labels)
    second = sitk.GetArrayFromImage(ensemble.segment(image).labels)  # the heap kept from the first
    np.testing.assert_array_equal(argmax_on_grid(now.numpy(), grid, image), labels_before)
    assert (labels_before > 0).sum() > 1000 and len(np.unique(labels_before)) == 3  # a real label map
    np.testing.assert_array_equal(first, second)


def test_mirroring_averages_each_flipped_pass_flipped_back(tmp_path: Path) -> None:
    model = small_model(tmp_path, patch=(8, 16, 16), batch_size=1)
    mirrored = model.manifest.model_copy(
        update={"input": model.manifest.contract.model_copy(update={"mirror_axes": (0, 2)})}
    )
    ensemble = Ensemble(ModelVersion(model.name, model.version, model.path, mirrored), device="cpu")
    x = torch.from_numpy(np.random.default_rng(1).random((8, 16, 16), dtype=np.float32))
    got = ensemble.probabilities(x.numpy())  # one window: the importance weights cancel
    passes = []
    with torch.inference_mode():
        for fold in ensemble._folds:
            for dims in [(), (2,), (4,), (2, 4)]:
                out = torch.softmax(fold(x[None, None].flip(dims) if dims else x[None, None]), dim=1)
                passes.append(out.flip(dims) if dims else out)
    torch.testing.assert_close(got, torch.stack(passes).mean(0)[0], rtol=1e-5, atol=1e-6)
    plain = Ensemble(model, device="cpu").probabilities(x.numpy())
    assert not torch.allclose(got, plain, atol=1e-3)  # the flips did change something


def test_an_axis_named_twice_is_refused(tmp_path: Path) -> None:
    folder = write_package(tmp_path, [SmallNet(1)], patch=(8, 8, 8))
    text = (folder / "model.yaml").read_text().replace("batch_size: 2", "batch_size: 2\n  mirror_axes: [2, 2]")
    (folder / "model.yaml").write_text(text)
    with pytest.raises(ModelError, match="mirror_axes"):
        load_manifest(folder)


def test_cuda_out_of_memory_halves_the_batch_then_falls_back_to_the_cpu(tmp_path: Path) -> None:
    """CUDA cannot run here: the fake allocation failure is raised at our own seam, the method
    that runs the folds on a batch of windows."""
    ensemble = Ensemble(small_model(tmp_path, batch_size=4), device="cpu")
    volume = model_volume(ensemble, phantom())
    expected = previous_probabilities(ensemble, volume)
    real = ensemble._mean_fold_probabilities
    sizes: list[int] = []

    def only_one_fits(x: torch.Tensor) -> torch.Tensor:
        sizes.append(int(x.shape[0]))
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    ensemble._mean_fold_probabilities = only_one_fits  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        smaller = ensemble.probabilities(volume)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert [e["batch"] for e in logs if e["event"] == "cuda out of memory: smaller batch"] == [2, 1]
    torch.testing.assert_close(smaller, expected, rtol=1e-6, atol=1e-7)

    def nothing_fits(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    ensemble._mean_fold_probabilities = nothing_fits  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        on_cpu = ensemble.probabilities(volume)
    events = [e["event"] for e in logs]
    assert "cuda out of memory: falling back to the CPU" in events
    assert ensemble._cpu is not None and ensemble._cpu.device.type == "cpu"
    assert torch.equal(on_cpu, expected)


def test_bf16_only_where_the_gpu_computes_it_else_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capability query is torch's (no GPU here); the choice is ours."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert amp_dtype(torch.device("cuda")) is torch.float16  # Turing: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert amp_dtype(torch.device("cuda")) is torch.bfloat16  # Hopper
    assert amp_dtype(torch.device("cpu")) is None


def test_freed_large_blocks_are_reused_without_new_page_faults() -> None:
    """A 256 MiB block freed and asked for again: glibc's default maps it anew (65 536 page
    faults); with the child's heap settings the pages are reused."""
    script = """
import ctypes, ctypes.util, resource
from ie_gateway.infer.cpu import keep_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
assert keep_freed_memory()
faults()
print(default, faults())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path.cwd())
    default, kept = map(int, out.stdout.splitlines()[-1].split())
    assert default > 60_000 and kept < 1_000


@pytest.mark.parametrize(("admin_sets", "asks_for_huge_pages"), [(None, False), ("1", True)])
def test_the_node_keeps_numpy_from_asking_for_huge_pages_unless_the_admin_says(
    admin_sets: str | None, asks_for_huge_pages: bool
) -> None:
    """Every node process imports the package before numpy: numpy then leaves its large arrays
    to the kernel's default pages (their first touch stalled on memory compaction otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if admin_sets is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = admin_sets
    probe = "import ie_gateway, numpy; print(numpy._core.multiarray._set_madvise_hugepage(False))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(asks_for_huge_pages)
