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

Weights are data here, not code. nnU-Net 2.6 reads a checkpoint with ``torch.load(...,
weights_only=False)``, which unpickles anything: a checkpoint can run code when it is loaded.
So this module does what ``initialize_from_trained_model_folder`` does with its own loader and
hands the result to the predictor's ``manual_initialization``: each checkpoint is read with
``torch.load(weights_only=True)``, which builds only tensors, containers and numbers, plus the
few numpy types nnU-Net's training log holds (:data:`CHECKPOINT_GLOBALS`); anything else in it
refuses the package. ``plans.json`` names the network class and its layers, which nnU-Net
imports by name, so the class must be in ``dynamic_network_architectures`` and each imported
layer in ``torch.nn`` (:data:`ARCHITECTURE_MODULES`, :data:`LAYER_MODULES`); the trainer class
is looked up only inside nnU-Net itself, as nnU-Net does.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

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
        import nnunetv2
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
except ImportError as exc:  # the [nnunet] extra is optional
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

_numpy_scalar = importlib.import_module("numpy._core.multiarray").scalar
# What an nnU-Net v2 checkpoint holds besides tensors, dicts, lists, strings and numbers: numpy
# scalars (and their dtypes) in the training log. Nothing else is unpickled.
CHECKPOINT_GLOBALS: list[Any] = [
    _numpy_scalar,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),  # the name numpy 1.x wrote into checkpoints
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
    np.dtypes.Int64DType,
]
_UNSUPPORTED = re.compile(r"(?i)unsupported (global|operand)[^\n]*")
ARCHITECTURE_MODULES = ("dynamic_network_architectures.",)  # plans.json network_class_name
LAYER_MODULES = ("torch.nn.",)  # plans.json conv_op, norm_op, dropout_op, nonlin


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
            _initialise(self._predictor, model, folds, settings.checkpoint)
        except (RuntimeError, ValueError, KeyError, OSError, AttributeError, TypeError) as exc:
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


def load_checkpoint(path: Path, spec: str) -> dict[str, Any]:
    """A checkpoint read as data (see the module doc); ModelError if it holds anything else."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED.search(str(exc))
        what = found.group(0) if found else "objects torch's weights-only loader does not build"
        raise ModelError(f"{spec}: {path.parent.name}/{path.name} holds more than weights, refused ({what})") from exc
    if not isinstance(content, dict) or not isinstance(content.get("network_weights"), dict):
        raise ModelError(f"{spec}: {path.parent.name}/{path.name} is not an nnU-Net checkpoint")
    return content


def _initialise(predictor: Any, model: ModelVersion, folds: list[int | str], checkpoint_name: str) -> None:
    """``initialize_from_trained_model_folder`` with checkpoints loaded as data and the plans'
    imports held to the allow-lists, then nnU-Net's own ``manual_initialization``."""
    dataset_json = json.loads((model.path / "dataset.json").read_text(encoding="utf-8"))
    plans_manager = PlansManager(json.loads((model.path / "plans.json").read_text(encoding="utf-8")))
    checkpoints = [load_checkpoint(model.path / f"fold_{fold}" / checkpoint_name, model.spec) for fold in folds]
    first = checkpoints[0]
    trainer_name = str(first["trainer_name"])
    configuration = plans_manager.get_configuration(first["init_args"]["configuration"])
    _check_architecture(configuration, model.spec)
    trainer_class = recursive_find_python_class(
        os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), trainer_name, "nnunetv2.training.nnUNetTrainer"
    )
    if trainer_class is None:
        raise ModelError(f"{model.spec}: trainer {trainer_name} is not one of nnU-Net's")
    network = trainer_class.build_network_architecture(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    parameters = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration,
        parameters,
        dataset_json,
        trainer_name,
        first.get("inference_allowed_mirroring_axes"),
    )


def _check_architecture(configuration: Any, spec: str) -> None:
    """The classes plans.json makes nnU-Net import must come from the allow-listed modules."""
    name = str(configuration.network_arch_class_name)
    if not name.startswith(ARCHITECTURE_MODULES):
        raise ModelError(f"{spec}: plans.json network class {name!r} is outside {ARCHITECTURE_MODULES}")
    kwargs = configuration.network_arch_init_kwargs
    for key in configuration.network_arch_init_kwargs_req_import:
        value = kwargs.get(key)
        if value is not None and not str(value).startswith(LAYER_MODULES):
            raise ModelError(f"{spec}: plans.json {key} {value!r} is outside {LAYER_MODULES}")


def _fold_id(file: str) -> int | str:
    """``fold_3/checkpoint_final.pth`` → 3 (``fold_all`` → "all"), as nnU-Net names folds."""
    name = file.split("/", 1)[0].removeprefix("fold_")
    return name if name == "all" else int(name)
