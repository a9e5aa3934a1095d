"""Run an ``nnunetv2`` package with nnU-Net's own ``nnUNetPredictor`` (the ``[nnunet]`` extra).

The package folder is an nnU-Net trained-model folder, so the predictor is initialised from it
exactly as ``nnUNetv2_predict_from_modelfolder`` does: every fold named in model.yaml is an
ensemble member (nnU-Net averages their logits), test-time mirroring along the axes the
checkpoint allows when ``nnunet.mirroring`` is true, Gaussian-weighted sliding windows with
``nnunet.step_size``, and on CUDA everything on the device (``perform_everything_on_device``).
The CT is read with nnU-Net's ``SimpleITKIO`` (what nnU-Net's own command line does with a
NIfTI or MHA file), so the arrays the network sees are the framework's, and nnU-Net resamples
the segmentation back to the CT's grid; the label map is then post-processed as model.yaml says,
like a native model's.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import structlog
import torch

from ie_gateway.errors import InferenceError, ModelError
from ie_gateway.infer.ensemble import default_device
from ie_gateway.infer.manifest import NnUNetSettings
from ie_gateway.infer.postprocess import label_volumes_cc, postprocess_labels
from ie_gateway.infer.registry import ModelVersion
from ie_gateway.infer.types import Segmentation

log = structlog.get_logger(__name__)

try:
    # nnU-Net prints, on import, that its training folders (nnUNet_raw, ...) are not set:
    # true and irrelevant for inference, so keep it out of the service's output
    with contextlib.redirect_stdout(io.StringIO()):
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
except ImportError as exc:  # the [nnunet] extra is optional
    _MISSING: ImportError | None = exc
else:
    _MISSING = None


class NnUNetModel:
    """An nnU-Net v2 trained-model folder loaded in nnUNetPredictor, resident across calls."""

    def __init__(self, model: ModelVersion, device: str | torch.device | None = None) -> None:
        if _MISSING is not None:
            raise ModelError(
                f"{model.spec} is an nnU-Net v2 package; install the extra: "
                f"pip install 'ie-gateway[nnunet]' ({_MISSING})"
            )
        self.model = model
        self.device = torch.device(device) if device is not None else default_device()
        settings = self.settings
        folds = [_fold_id(fold.file) for fold in model.manifest.folds]
        if self.device.type == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self._predictor = nnUNetPredictor(
            tile_step_size=settings.step_size,
            use_gaussian=True,
            use_mirroring=settings.mirroring,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        try:
            self._predictor.initialize_from_trained_model_folder(
                str(model.path), use_folds=folds, checkpoint_name=settings.checkpoint
            )
        except (RuntimeError, ValueError, KeyError, OSError, AttributeError) as exc:
            raise ModelError(f"{model.spec}: nnU-Net cannot load the package: {exc}") from exc
        if self._predictor.trainer_name != settings.trainer:
            raise ModelError(
                f"{model.spec}: the checkpoints were trained by {self._predictor.trainer_name}, "
                f"model.yaml says {settings.trainer}"
            )

    @property
    def settings(self) -> NnUNetSettings:
        assert self.model.manifest.nnunet is not None  # the manifest validates format nnunetv2
        return self.model.manifest.nnunet

    def probe(self) -> None:
        """One patch of zeros through every fold; ModelError unless the channels match."""
        patch = tuple(self._predictor.configuration_manager.patch_size)
        inputs = len(self._predictor.dataset_json.get("channel_names", {"0": "CT"}))
        data = torch.zeros((inputs, *patch))
        mirroring, self._predictor.use_mirroring = self._predictor.use_mirroring, False
        try:
            logits = self._predictor.predict_logits_from_preprocessed_data(data)
        except RuntimeError as exc:
            raise ModelError(f"{self.model.spec}: a {patch} patch does not run: {exc}") from exc
        finally:
            self._predictor.use_mirroring = mirroring
        if logits.shape[0] != self.model.manifest.channels:
            raise ModelError(
                f"{self.model.spec}: nnU-Net gives {logits.shape[0]} channels, model.yaml has "
                f"background + {len(self.model.manifest.structures)} structures"
            )

    def segment_file(self, ct_path: Path) -> Segmentation:
        """Contour the CT in ``ct_path``; the label map has the CT's exact grid."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        image, properties = SimpleITKIO().read_images((str(ct_path),))
        timings["read"] = time.perf_counter() - start
        mark = time.perf_counter()
        labels = np.asarray(self._predictor.predict_single_npy_array(image, properties, None, None, False)).astype(
            np.uint8
        )
        timings["predict"] = time.perf_counter() - mark
        # the CT's geometry only: nnU-Net holds the voxels already
        reference = sitk.ImageFileReader()
        reference.SetFileName(str(ct_path))
        reference.ReadImageInformation()
        shape = tuple(reversed(reference.GetSize()))
        if labels.shape != shape:
            raise InferenceError(f"{self.model.spec}: nnU-Net returned {labels.shape}, the CT is {shape}")
        mark = time.perf_counter()
        voxel_cc = float(np.prod(reference.GetSpacing())) / 1000.0
        structures = self.model.manifest.structures
        postprocess_labels(labels, structures, voxel_cc)
        volumes = label_volumes_cc(labels, structures, voxel_cc)
        timings["postprocess"] = time.perf_counter() - mark
        out = sitk.GetImageFromArray(labels)
        out.SetOrigin(reference.GetOrigin())
        out.SetSpacing(reference.GetSpacing())
        out.SetDirection(reference.GetDirection())
        timings["total"] = time.perf_counter() - start
        folds = len(self.model.manifest.folds)
        log.info(
            "segmented",
            model=self.model.spec,
            framework="nnunetv2",
            device=self.device.type,
            folds=folds,
            **{f"{k}_s": round(v, 3) for k, v in timings.items()},
        )
        return Segmentation(out, volumes, timings, 0, folds)


def _fold_id(file: str) -> int | str:
    """``fold_3/checkpoint_final.pth`` → 3 (``fold_all`` → "all"), as nnU-Net names folds."""
    name = file.split("/", 1)[0].removeprefix("fold_")
    return name if name == "all" else int(name)
