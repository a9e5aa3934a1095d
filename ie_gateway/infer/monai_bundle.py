"""Run a ``monai_bundle`` package with the bundle's own inference config (the ``[monai]`` extra).

A job runs the bundle as ``python -m monai.bundle run`` would (:class:`monai.bundle.ConfigWorkflow`
with ``workflow_type="infer"``: the bundle's transforms, inferer and post-processing), with the
overrides the MONAI model zoo's bundles read: ``bundle_root`` (the package folder),
``dataset_dir`` (a folder holding the CT as ``ct.nii.gz``) and ``output_dir`` (where its
``SaveImage`` writes). The one image written there is the label map; it must lie on the CT's
grid (a bundle whose post-processing inverts its spatial transforms, ``Invertd``, does that),
else the job fails with the reason. Data loading runs in the inference child itself: a bundle
whose config starts DataLoader workers needs ``num_workers: 0``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import structlog
import torch

from ie_gateway.errors import InferenceError, ModelError
from ie_gateway.infer.ensemble import default_device
from ie_gateway.infer.manifest import MonaiSettings
from ie_gateway.infer.postprocess import label_volumes_cc, postprocess_labels
from ie_gateway.infer.registry import ModelVersion, check_code_policy
from ie_gateway.infer.types import Segmentation

log = structlog.get_logger(__name__)

try:
    from monai.bundle.config_parser import ConfigParser
    from monai.bundle.workflows import ConfigWorkflow
except ImportError as exc:  # the [monai] extra is optional
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
_GRID_TOLERANCE_VOXELS = 0.01


class MonaiBundle:
    """A MONAI bundle run through its inference config, one workflow per CT."""

    def __init__(self, model: ModelVersion, device: str | torch.device | None = None) -> None:
        if _MISSING is not None:
            raise ModelError(
                f"{model.spec} is a MONAI bundle; install the extra: pip install 'ie-gateway[monai]' ({_MISSING})"
            )
        check_code_policy(model)  # again here, in the child, right before MONAI reads the config
        self.model = model
        self.device = torch.device(device) if device is not None else default_device()
        self.settings = model.manifest.monai or MonaiSettings()

    def probe(self) -> None:
        """The bundle's network maps a zero patch to background + N channels, and the whole
        workflow runs on a small blank CT; ModelError otherwise."""
        parser = ConfigParser()
        try:
            parser.read_config(str(self.model.path / self.settings.config))
            parser.read_meta(str(self.model.path / self.settings.meta))
            parser.update({"bundle_root": str(self.model.path), "device": self.device})
            network = parser.get_parsed_content("network")
            with torch.inference_mode():
                out = network(torch.zeros((1, 1, *self.settings.probe_size), device=self.device))
        except Exception as exc:  # a bundle's config runs arbitrary code; any
            # failure to build or run its network means the package is unusable, said in one line
            raise ModelError(f"{self.model.spec}: the bundle's network does not run: {_why(exc)}") from exc
        channels = int(out.shape[1]) if isinstance(out, torch.Tensor) else -1
        if channels != self.model.manifest.channels:
            raise ModelError(
                f"{self.model.spec}: the bundle's network gives {channels} channels, model.yaml has "
                f"background + {len(self.model.manifest.structures)} structures"
            )
        blank = sitk.Image([*self.settings.probe_size], sitk.sitkInt16)
        blank.SetSpacing((2.0, 2.0, 2.0))
        with tempfile.TemporaryDirectory(prefix="ie-gateway-probe-") as tmp:
            ct_path = Path(tmp) / "probe.mha"
            sitk.WriteImage(blank - 1000, str(ct_path))
            self.segment_file(ct_path, scratch=Path(tmp))

    def segment_file(self, ct_path: Path, scratch: Path | None = None) -> Segmentation:
        """Run the bundle on the CT in ``ct_path``; the label map has the CT's exact grid.
        ``scratch``: where its working folder goes (None: ``TMPDIR``, the child's exchange
        folder; the CT's own folder may be read-only to the child)."""
        start = time.perf_counter()
        reference = sitk.ReadImage(str(ct_path))
        work = Path(tempfile.mkdtemp(prefix="ie-gateway-monai-", dir=scratch))
        try:
            (work / "in").mkdir()
            sitk.WriteImage(reference, str(work / "in" / "ct.nii.gz"))
            self._run(work / "in", work / "out")
            written = [p for p in (work / "out").rglob("*") if p.name.endswith(_OUTPUT_SUFFIXES)]
            if len(written) != 1:
                raise InferenceError(
                    f"{self.model.spec}: the bundle wrote {len(written)} images to output_dir, expected one label map"
                )
            labels = _on_grid(sitk.ReadImage(str(written[0])), reference, self.model.spec)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        timings = {"bundle": time.perf_counter() - start}
        mark = time.perf_counter()
        voxel_cc = float(np.prod(reference.GetSpacing())) / 1000.0
        structures = self.model.manifest.structures
        if labels.max(initial=0) > len(structures):
            raise InferenceError(
                f"{self.model.spec}: the bundle's output has label {labels.max()}, model.yaml "
                f"knows 1..{len(structures)}"
            )
        postprocess_labels(labels, structures, voxel_cc)
        volumes = label_volumes_cc(labels, structures, voxel_cc)
        timings["postprocess"] = time.perf_counter() - mark
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(reference)
        timings["total"] = time.perf_counter() - start
        log.info(
            "segmented",
            model=self.model.spec,
            framework="monai",
            device=self.device.type,
            **{f"{k}_s": round(v, 3) for k, v in timings.items()},
        )
        return Segmentation(out, volumes, timings, 0, 1)

    def _run(self, dataset_dir: Path, output_dir: Path) -> None:
        overrides: dict[str, Any] = {
            "bundle_root": str(self.model.path),
            "dataset_dir": str(dataset_dir),
            "output_dir": str(output_dir),
            "device": self.device,
        }
        try:
            workflow = ConfigWorkflow(
                config_file=str(self.model.path / self.settings.config),
                meta_file=str(self.model.path / self.settings.meta),
                workflow_type="infer",
                **overrides,
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as exc:  # the bundle's own code runs here; whatever it
            # raises fails this job with its first line (the runner keeps serving)
            raise InferenceError(f"{self.model.spec}: the bundle's workflow failed: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    """The first line of the innermost cause: MONAI wraps a config's errors in "Failed to
    instantiate component ..." and the reason is underneath."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _on_grid(labels: sitk.Image, reference: sitk.Image, spec: str) -> np.ndarray:
    """The label image as a (z, y, x) uint8 array on ``reference``'s grid; InferenceError if it
    is on another grid (a half voxel off, another size or orientation)."""
    if labels.GetSize() != reference.GetSize():
        raise InferenceError(
            f"{spec}: the bundle's label map is {labels.GetSize()}, the CT {reference.GetSize()}: "
            f"its post-processing must invert its spatial transforms"
        )
    for corner in ((0, 0, 0), tuple(n - 1 for n in reference.GetSize())):
        a = np.array(reference.TransformIndexToPhysicalPoint(corner))
        b = np.array(labels.TransformIndexToPhysicalPoint(corner))
        if np.any(np.abs(a - b) > _GRID_TOLERANCE_VOXELS * np.array(reference.GetSpacing())):
            raise InferenceError(
                f"{spec}: the bundle's label map lies on another grid than the CT "
                f"(voxel {corner} at {b.round(2).tolist()} mm, the CT's at {a.round(2).tolist()})"
            )
    return sitk.GetArrayFromImage(sitk.Cast(labels, sitk.sitkUInt8))
