"""Run a model version's folds over a CT: resample, sliding window, fold averaging, back to the CT.

Steps of :meth:`Ensemble.segment`:

1. resample the CT (linear) onto an axial, identity-direction grid at the manifest's spacing that
   covers every CT voxel centre; window the HU and scale to [0, 1];
2. slide patches over it with the manifest's overlap, batched; each patch's probability is the
   mean of the folds' softmax, weighted by a Gaussian importance map (as nnU-Net does) so patch
   borders count less. The volume and the accumulators live on the device, so windows are cut
   there and a GPU never waits for uploads; on CUDA the folds run under autocast (bf16 where
   the hardware has it, compute capability 8.0 or later, else fp16) and softmax/averaging stay
   in fp32. ``input.mirror_axes`` adds test-time mirroring (nnU-Net's: every combination of
   the axes, each pass's softmax flipped back and averaged with the folds'). Windows are copied
   into one batch buffer made per CT. CUDA out of memory: the batch is halved and the window
   tried again, down to one window; then the CT is done on the CPU (both said in the log);
3. resample the averaged probabilities (linear, a slab of CT slices at a time to bound memory)
   onto the CT grid and take the arg-max there, which keeps sub-voxel boundaries of small
   structures; the label map has exactly the CT's size, origin, spacing and direction;
4. post-process each structure (:mod:`ie_gateway.infer.postprocess`) and measure volumes.

Folds are loaded once per :class:`Ensemble` and stay resident across calls. The model must come
from ``Registry.resolve`` (verified); the Ensemble does not re-check checksums. On the CPU the
process keeps freed memory for the next window and gives it back after each CT
(:mod:`ie_gateway.infer.cpu`), and torch uses as many threads as the process has cores.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import structlog
import torch
from scipy import ndimage

from ie_gateway.errors import InferenceError, ModelError
from ie_gateway.infer.cpu import cpu_threads, keep_freed_memory, release_freed_memory
from ie_gateway.infer.postprocess import label_volumes_cc, postprocess_labels
from ie_gateway.infer.registry import ModelVersion, probe_patch
from ie_gateway.infer.types import Segmentation

log = structlog.get_logger(__name__)

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# CT slices resampled back per step: C float32 slabs of this many 512² slices stay ~50 MiB.
_BACK_SLAB = 16

Box = tuple[int, int, int]


@dataclass(frozen=True)
class ModelGrid:
    """The axial grid the model sees: LPS origin of voxel (0, 0, 0), spacing and size (x, y, z)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type on ``device``: bf16 where the GPU computes it natively (Ampere, compute
    capability 8.0, and later; older ones only emulate it, slowly), else fp16; None on the CPU
    (float32 there, as the model was exported)."""
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def mirrorings(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The flips of a (batch, channel, z, y, x) tensor for test-time mirroring along ``axes``
    (0 z, 1 y, 2 x): none, then every combination, as nnU-Net does."""
    dims = [axis + 2 for axis in axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def model_grid(image: sitk.Image, spacing: tuple[float, float, float]) -> ModelGrid:
    """The identity-direction grid at ``spacing`` whose voxel centres cover all of ``image``'s."""
    n = image.GetSize()
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([c * (s - 1) for c, s in zip(ix, n, strict=True)])
            for ix in itertools.product((0, 1), repeat=3)
        ]
    )
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = tuple(math.ceil((h - lo) / s - 1e-6) + 1 for lo, h, s in zip(low, high, spacing, strict=True))
    origin = (float(low[0]), float(low[1]), float(low[2]))
    return ModelGrid(origin, spacing, (size[0], size[1], size[2]))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread patch starts along one axis, neighbours overlapping by at least ``overlap``."""
    if size <= patch:
        return [0]
    step = max(patch * (1.0 - overlap), 1.0)
    count = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


def gaussian_importance(patch: tuple[int, int, int]) -> np.ndarray:
    """nnU-Net's patch weighting: a Gaussian with sigma = patch/8, max 1, no zeros."""
    centre = np.zeros(patch, dtype=np.float32)
    centre[tuple(p // 2 for p in patch)] = 1.0
    weights: np.ndarray = ndimage.gaussian_filter(centre, sigma=[p / 8 for p in patch], mode="constant")
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights


class Ensemble:
    """A model version's folds, loaded on ``device`` (CUDA when available, else CPU)."""

    def __init__(
        self,
        model: ModelVersion,
        device: str | torch.device | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else default_device()
        heap_kept = False
        if self.device.type == "cpu":
            torch.set_num_threads(threads or cpu_threads())
            heap_kept = keep_freed_memory()
        else:
            torch.backends.cudnn.benchmark = True  # every window has the same shape
        self._folds = [_load_fold(model, path, self.device) for path in model.fold_paths()]
        contract = model.manifest.contract
        self._importance = torch.from_numpy(gaussian_importance(contract.patch_size)).to(self.device)
        self._mirrorings = mirrorings(contract.mirror_axes)
        self._amp = amp_dtype(self.device)
        self._cpu: Ensemble | None = None  # where a CT goes when CUDA runs out of memory
        log.info(
            "inference precision",
            model=model.spec,
            device=self.device.type,
            dtype=str(self._amp or torch.float32).removeprefix("torch."),
            threads=torch.get_num_threads(),
            mirrorings=len(self._mirrorings),
            heap_kept=heap_kept,
        )

    def probe(self) -> None:
        """Map a small patch through every fold; ModelError unless each gives the channels the
        manifest promises (see :func:`ie_gateway.infer.registry.probe_patch`)."""
        patch = probe_patch(self.model.manifest.contract.patch_size)
        expected = (1, self.model.manifest.channels, *patch)
        for path, fold in zip(self.model.fold_paths(), self._folds, strict=True):
            try:
                with torch.inference_mode():
                    out = fold(torch.zeros((1, 1, *patch), device=self.device))
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"{self.model.spec}: {path.name} does not run: {_first_line(exc)}") from exc
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(
                    f"{self.model.spec}: {path.name} maps a patch {tuple(patch)} to {got}; expected "
                    f"{expected} (background + {len(self.model.manifest.structures)} structures)"
                )

    def segment_file(self, ct_path: Path) -> Segmentation:
        """:meth:`segment` of the image in ``ct_path`` (any format SimpleITK reads)."""
        return self.segment(sitk.ReadImage(str(ct_path)))

    def segment(self, image: sitk.Image) -> Segmentation:
        """Contour ``image`` (a 3D CT in HU); see the module doc for the steps."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InferenceError(
                f"expected a 3D single-channel CT, got {image.GetDimension()}D with "
                f"{image.GetNumberOfComponentsPerPixel()} components"
            )
        manifest = self.model.manifest
        timings: dict[str, float] = {}
        start = time.perf_counter()
        grid = model_grid(image, manifest.contract.spacing_mm)
        volume = self._resample_normalised(image, grid)
        timings["resample"] = time.perf_counter() - start

        mark = time.perf_counter()
        probs, windows, forward_s = self._probabilities(volume)
        del volume
        timings["windows"] = time.perf_counter() - mark
        if self.device.type == "cpu":
            timings["forward"] = forward_s

        mark = time.perf_counter()
        labels = argmax_on_grid(probs.numpy(), grid, image)
        del probs
        timings["resample_back"] = time.perf_counter() - mark

        mark = time.perf_counter()
        voxel_cc = float(np.prod(image.GetSpacing())) / 1000.0
        postprocess_labels(labels, manifest.structures, voxel_cc)
        volumes = label_volumes_cc(labels, manifest.structures, voxel_cc)
        timings["postprocess"] = time.perf_counter() - mark

        out = sitk.GetImageFromArray(labels)
        del labels
        out.CopyInformation(image)
        if self.device.type == "cpu":
            release_freed_memory()
        timings["total"] = time.perf_counter() - start
        log.info(
            "segmented",
            model=self.model.spec,
            device=self.device.type,
            windows=windows,
            folds=len(self._folds),
            **{f"{k}_s": round(v, 3) for k, v in timings.items()},
        )
        return Segmentation(out, volumes, timings, windows, len(self._folds))

    def _resample_normalised(self, image: sitk.Image, grid: ModelGrid) -> np.ndarray:
        low, high = self.model.manifest.contract.intensity.window
        resampled = sitk.Resample(
            image,
            grid.size,
            sitk.Transform(),
            sitk.sitkLinear,
            grid.origin,
            grid.spacing,
            _IDENTITY,
            float(low),
            sitk.sitkFloat32,
        )
        volume: np.ndarray = np.clip(sitk.GetArrayViewFromImage(resampled), low, high)
        del resampled
        volume -= low
        volume /= high - low
        return volume

    def probabilities(self, volume: np.ndarray) -> torch.Tensor:
        """Fold-averaged, window-blended probabilities (C, z, y, x) on the CPU for ``volume``.

        ``volume`` is already on the model grid and scaled to [0, 1] (float32, z, y, x).
        """
        return self._probabilities(volume)[0]

    @torch.inference_mode()
    def _probabilities(self, volume: np.ndarray) -> tuple[torch.Tensor, int, float]:
        try:
            return self._sliding_window(volume)
        except torch.OutOfMemoryError as exc:
            why = _first_line(exc)
        # outside the except block: the failed attempt's tensors are free by now
        _free_cached(self.device)
        log.warning("cuda out of memory: falling back to the CPU", model=self.model.spec, error=why)
        if self._cpu is None:
            self._cpu = Ensemble(self.model, "cpu")
        return self._cpu._sliding_window(volume)

    def _sliding_window(self, volume: np.ndarray) -> tuple[torch.Tensor, int, float]:
        contract = self.model.manifest.contract
        patch = contract.patch_size
        shape = tuple(volume.shape)
        host = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        if self.device.type == "cuda":  # one upload (tens of MiB); windows are then cut on the GPU
            host = host.pin_memory()
        padded = _pad_to(host.to(self.device, non_blocking=True), patch)
        del host
        full = tuple(padded.shape)
        channels = self.model.manifest.channels
        acc = torch.zeros((channels, *full), dtype=torch.float32, device=self.device)
        weight = torch.zeros(full, dtype=torch.float32, device=self.device)
        starts = [window_starts(s, p, contract.overlap) for s, p in zip(full, patch, strict=True)]
        boxes: list[Box] = list(itertools.product(starts[0], starts[1], starts[2]))
        batch_size = contract.batch_size
        windows = torch.empty((batch_size, 1, *patch), dtype=torch.float32, device=self.device)
        forward_s = 0.0
        done = 0
        while done < len(boxes):
            batch = boxes[done : done + batch_size]
            for i, box in enumerate(batch):
                windows[i, 0].copy_(padded[_window(box, patch)])
            mark = time.perf_counter()
            try:
                probs = self._mean_fold_probabilities(windows[: len(batch)])
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                _free_cached(self.device)
                log.warning("cuda out of memory: smaller batch", model=self.model.spec, batch=batch_size)
                continue
            forward_s += time.perf_counter() - mark
            probs *= self._importance
            for box, p in zip(batch, probs, strict=True):
                acc[(slice(None), *_window(box, patch))] += p
                weight[_window(box, patch)] += self._importance
            done += len(batch)
        acc /= weight
        result = acc[:, : shape[0], : shape[1], : shape[2]].to("cpu").contiguous()
        return result, len(boxes), forward_s

    def _mean_fold_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The mean softmax of every fold (and mirroring) for a batch of windows; the seam where
        CUDA allocates most, so where tests fake running out of memory."""
        total: torch.Tensor | None = None
        for index, fold in enumerate(self._folds):
            for dims in self._mirrorings:
                with self._autocast():
                    logits = fold(x.flip(dims) if dims else x)
                if logits.shape[1] != self.model.manifest.channels:
                    raise InferenceError(
                        f"{self.model.spec}: fold {index} returned {logits.shape[1]} channels, "
                        f"expected {self.model.manifest.channels}"
                    )
                probs = torch.softmax(logits.float(), dim=1)
                if dims:
                    probs = probs.flip(dims)
                total = probs if total is None else total.add_(probs)
        assert total is not None  # a manifest has at least one fold
        return total.div_(len(self._folds) * len(self._mirrorings))

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp is not None:
            return torch.autocast(device_type="cuda", dtype=self._amp)
        return contextlib.nullcontext()


def _free_cached(device: torch.device) -> None:
    """Return CUDA's cached blocks, so the retry gets what the failed attempt held."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_fold(model: ModelVersion, path: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location=device)
        return module.eval()
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{model.spec}: {path.name} does not load as TorchScript: {_first_line(exc)}") from exc


def argmax_on_grid(probs: np.ndarray, grid: ModelGrid, image: sitk.Image) -> np.ndarray:
    """Resample ``probs`` (C, z, y, x on ``grid``) linearly onto ``image``'s grid; arg-max there.

    Only the box of CT voxels that can be foreground is resampled: a foreground arg-max needs an
    interpolated background probability of at most 0.5, so at least one of the model voxels
    around it must have one too; elsewhere the label is 0 without any work. Inside the box it goes
    a slab of CT slices at a time with the model voxels that slab needs, so no full-size float
    copy of the CT is ever made. Returns uint8 (z, y, x) of ``image``'s size.
    """
    nx, ny, nz = image.GetSize()
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    box = _foreground_box(probs[0], grid, image)
    if box is None or any(hi <= lo for lo, hi in box):
        return labels
    (z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi) = box
    for z0 in range(z_lo, z_hi, _BACK_SLAB):
        z1 = min(z_hi, z0 + _BACK_SLAB)
        (mz0, mz1), (my0, my1), (mx0, mx1) = _model_box(
            image, grid, ((z0, z1), (y_lo, y_hi), (x_lo, x_hi)), probs.shape[1:]
        )
        source_origin = tuple(o + i * s for o, i, s in zip(grid.origin, (mx0, my0, mz0), grid.spacing, strict=True))
        origin = image.TransformIndexToPhysicalPoint((x_lo, y_lo, z0))
        slab = labels[z0:z1, y_lo:y_hi, x_lo:x_hi]
        best: np.ndarray | None = None
        for channel in range(probs.shape[0]):
            source = sitk.GetImageFromArray(np.ascontiguousarray(probs[channel, mz0:mz1, my0:my1, mx0:mx1]))
            source.SetOrigin(source_origin)
            source.SetSpacing(grid.spacing)
            resampled = sitk.Resample(
                source,
                (x_hi - x_lo, y_hi - y_lo, z1 - z0),
                sitk.Transform(),
                sitk.sitkLinear,
                origin,
                image.GetSpacing(),
                image.GetDirection(),
                1.0 if channel == 0 else 0.0,
                sitk.sitkFloat32,
            )
            p = sitk.GetArrayFromImage(resampled)
            if best is None:
                best = p
                continue
            higher = p > best
            best[higher] = p[higher]
            slab[higher] = channel
    return labels


Ranges = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # half-open (z, y, x)


def _foreground_box(background: np.ndarray, grid: ModelGrid, image: sitk.Image) -> Ranges | None:
    """CT index ranges that hold every voxel whose arg-max may be foreground (None: none can)."""
    found = ndimage.find_objects((background <= 0.5).view(np.uint8))
    if not found:
        return None
    model_ranges = tuple((s.start - 1, s.stop) for s in found[0])  # one model voxel of margin
    corners = [
        image.TransformPhysicalPointToContinuousIndex(
            [o + i * s for o, i, s in zip(grid.origin, (x, y, z), grid.spacing, strict=True)]
        )
        for z, y, x in itertools.product(*model_ranges)
    ]
    return _index_ranges(np.array(corners), image.GetSize(), margin=0)


def _model_box(image: sitk.Image, grid: ModelGrid, ct_ranges: Ranges, shape: tuple[int, ...]) -> Ranges:
    """Model-grid index ranges that linear interpolation reads for CT voxels in ``ct_ranges``."""
    corners = [
        [
            (p - o) / s
            for p, o, s in zip(
                image.TransformIndexToPhysicalPoint((x, y, z)),
                grid.origin,
                grid.spacing,
                strict=True,
            )
        ]
        for z, y, x in itertools.product(*((lo, hi - 1) for lo, hi in ct_ranges))
    ]
    return _index_ranges(np.array(corners), (shape[2], shape[1], shape[0]), margin=1)


def _index_ranges(corners: np.ndarray, size: tuple[int, ...], margin: int) -> Ranges:
    """Half-open (z, y, x) index ranges covering continuous (x, y, z) ``corners``, clipped."""
    low = np.floor(corners.min(axis=0)).astype(int) - margin
    high = np.ceil(corners.max(axis=0)).astype(int) + margin
    ranges = [(max(0, int(lo)), min(n, int(hi) + 1)) for lo, hi, n in zip(low, high, size, strict=True)]
    return (ranges[2], ranges[1], ranges[0])


def _pad_to(volume: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (air after windowing) at the far end of each axis up to at least the patch."""
    pad = [max(0, p - s) for s, p in zip(volume.shape, patch, strict=True)]
    if not any(pad):
        return volume
    return torch.nn.functional.pad(volume, (0, pad[2], 0, pad[1], 0, pad[0]))


def _window(box: Box, patch: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    return slice(box[0], box[0] + patch[0]), slice(box[1], box[1] + patch[1]), slice(box[2], box[2] + patch[2])
