"""What crosses the inference child's pipe, and what a framework adapter hands back.

The node (``runner.InferenceRunner``) sends the child one message at a time: an
``InferenceRequest`` (contour this CT file with this model, write the label map there), a
``VerifyRequest`` (load and probe a model) or ``Close``. The child answers ``Ready`` once when
it has started, then one reply per request: an ``InferenceResult``, ``Verified`` or an
``InferenceFailure``. Every adapter (native ensemble, nnU-Net, MONAI bundle) returns a
``Segmentation``. No bare tuples or dicts cross the pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from ie_gateway.infer.registry import ModelVersion
from ie_gateway.vocab import FailureKind


@dataclass(frozen=True)
class Segmentation:
    """A label map on the CT grid (uint8, 0 = background, labels as the manifest) and its figures.

    ``volumes_cc`` is measured on the label map (the write stage measures the structures again
    as contoured, which `status` shows). ``timings_s`` has ``resample``, ``windows`` (the whole
    sliding-window loop), ``forward`` (time inside the folds; CPU only, since CUDA runs
    asynchronously), ``resample_back``, ``postprocess`` and ``total``.
    """

    labels: sitk.Image
    volumes_cc: dict[str, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    folds: int = 0


@dataclass(frozen=True)
class InferenceRequest:
    """Contour the CT at ``ct_path`` with ``model``; write the label map to ``labels_path``."""

    model: ModelVersion
    ct_path: Path
    labels_path: Path


@dataclass(frozen=True)
class VerifyRequest:
    """Load ``model`` afresh with its framework and run the probe; keep it resident."""

    model: ModelVersion


@dataclass(frozen=True)
class Close:
    """Exit the child's loop."""


@dataclass(frozen=True)
class Ready:
    """The child has imported what it needs: a job's time limit starts counting now.
    ``sandbox`` says, in words, how the child is confined (network, environment, memory)."""

    sandbox: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceResult:
    """A label map written to the request's ``labels_path``, and its figures (the
    ``Segmentation`` without the image)."""

    volumes_cc: dict[str, float]
    timings_s: dict[str, float]
    windows: int
    folds: int


@dataclass(frozen=True)
class Verified:
    """The model loaded and ran its probe."""


@dataclass(frozen=True)
class InferenceFailure:
    """Why a request failed: ``model`` for a package that cannot be used (ModelError), ``oom``
    for CUDA out of memory and ``disk_full`` (both retried by the worker), else ``inference``
    (InferenceError)."""

    kind: FailureKind
    text: str


Request = InferenceRequest | VerifyRequest | Close
Reply = InferenceResult | Verified | InferenceFailure
