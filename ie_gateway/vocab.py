"""The node's vocabulary: every closed set of words that crosses a module boundary.

Config, routing, the store, the stages, the admin's page and the CLI read and write these
enums, never the bare strings behind them, so a state, kind or policy cannot be spelt one way
in one module and another way in the next. Each is a ``StrEnum``: its value is what YAML, the
index, the log and `status` show.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """States of a series job, as `ie-gateway status` shows them (the moves between them are
    ``store.states.ALLOWED``)."""

    RECEIVING = "receiving"  # instances arriving; not yet quiet for stable_after_s
    COMPLETE = "complete"  # quiet period passed; waiting for routing
    ROUTED = "routed"  # a rule chose a model; waiting for the worker
    REFUSED = "refused"  # the series cannot be processed (geometry, modality); see reason
    UNROUTED = "unrouted"  # no rule matched; kept until retention
    PREPARED = "prepared"  # volume loaded, checked and stored in the job's folder; waiting for the model
    INFERRING = "inferring"  # the worker is running the model
    INFERRED = "inferred"  # label map stored; the RT-STRUCTs being written
    WRITING = "writing"  # the RT-STRUCTs queued; the SEGs and the QA picture being made
    NEEDS_REVIEW = "needs_review"  # failed its model's plausibility checks; held until released
    SENDING = "sending"  # results in the outbox
    DELIVERED = "delivered"  # every destination has every result
    FAILED = "failed"  # gave up; see reason (dead-lettered deliveries, inference errors)
    ASSESSING = "assessing"  # a clinician's structure set linked to a CT job, awaiting its figures
    EXCLUDED = "excluded"  # delivered, but sync can never take it (cannot be anonymised); see reason


class Stage(StrEnum):
    """The worker's stages: what a claimed job is advanced by (metrics and logs name them)."""

    ROUTE = "route"
    PREPARE = "prepare"  # the volume loaded, checked and stored as the inference child reads it
    INFER = "infer"
    WRITE = "write"  # the RT-STRUCTs, queued as soon as they are validated
    FINISH = "finish"  # the rest of the results (SEGs, QA picture), then the job is sending
    ASSESS = "assess"  # a clinician's structure set against the AI's contours


class OutputKind(StrEnum):
    """Objects a route asks the writer to produce (and a destination may accept)."""

    RTSTRUCT = "rtstruct"
    SEG = "seg"


class SegEncoding(StrEnum):
    """How a SEG stores its segments (the route's ``seg_encoding``)."""

    BINARY = "binary"  # Segmentation Storage: a bit per voxel per segment; masks may overlap
    LABELMAP = "labelmap"  # Label Map Segmentation Storage (Supplement 243): a segment per voxel


class Priority(StrEnum):
    """How urgently a job is wanted (its routing rule's ``priority``, or low for a caller listed so).

    The index stores the rank, so that claims can order by it: high before normal before low.
    """

    HIGH = "high"  # e.g. a patient waiting on the couch
    NORMAL = "normal"  # today's patients from the scanners: the default
    LOW = "low"  # commissioning runs, retrieves of old studies, research

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low: the order in which claims take them."""
        return _PRIORITY_RANKS[self]

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        return _PRIORITY_BY_RANK[rank]

    @staticmethod
    def highest(*priorities: Priority) -> Priority:
        """The most urgent of ``priorities`` (a series that several rules match)."""
        return min(priorities, key=lambda p: p.rank)


_PRIORITY_RANKS = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
_PRIORITY_BY_RANK = {rank: priority for priority, rank in _PRIORITY_RANKS.items()}


class OutboxState(StrEnum):
    """Where one (result file, destination) delivery stands."""

    PENDING = "pending"  # due now or after its backoff
    COMMITTING = "committing"  # the peer took it; its storage commitment report is awaited
    DELIVERED = "delivered"  # the peer answered success (or a warning that means it has it)
    FAILED = "failed"  # dead-lettered: refused at association, or the retry limit reached
    CANCELLED = "cancelled"  # the job was routed again before it went


class ReviewPolicy(StrEnum):
    """What a result failing its model's plausibility checks does (the route's ``review``)."""

    HOLD = "hold"  # nothing is sent until an admin releases it
    FLAG = "flag"  # sent, marked NEEDS REVIEW


class ApprovalStatus(StrEnum):
    """A structure set's Approval Status (300E,0002); UNKNOWN when it has none."""

    APPROVED = "APPROVED"
    UNAPPROVED = "UNAPPROVED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def of(cls, value: object) -> ApprovalStatus:
        """The status a file's value says; anything outside the defined terms is UNKNOWN."""
        text = str(value or "").strip().upper()
        return cls(text) if text in cls.__members__ else cls.UNKNOWN


class InterpretedType(StrEnum):
    """RT ROI Interpreted Type (3006,00A4) defined terms, carried into the RT-STRUCT."""

    EXTERNAL = "EXTERNAL"
    PTV = "PTV"
    CTV = "CTV"
    GTV = "GTV"
    TREATED_VOLUME = "TREATED_VOLUME"
    IRRAD_VOLUME = "IRRAD_VOLUME"
    BOLUS = "BOLUS"
    AVOIDANCE = "AVOIDANCE"
    ORGAN = "ORGAN"
    MARKER = "MARKER"
    REGISTRATION = "REGISTRATION"
    ISOCENTER = "ISOCENTER"
    CONTRAST_AGENT = "CONTRAST_AGENT"
    CAVITY = "CAVITY"
    BRACHY_CHANNEL = "BRACHY_CHANNEL"
    BRACHY_ACCESSORY = "BRACHY_ACCESSORY"
    BRACHY_SRC_APP = "BRACHY_SRC_APP"
    BRACHY_CHNL_SHLD = "BRACHY_CHNL_SHLD"
    SUPPORT = "SUPPORT"
    FIXATION = "FIXATION"
    DOSE_REGION = "DOSE_REGION"
    CONTROL = "CONTROL"


class PeerProtocol(StrEnum):
    """How the node talks to a destination or a source (its ``protocol``)."""

    DIMSE = "dimse"  # a DICOM AE: C-STORE, C-FIND, C-MOVE
    DICOMWEB = "dicomweb"  # a DICOMweb service: STOW-RS, QIDO-RS, WADO-RS


class PeerAuth(StrEnum):
    """How the node signs in to a DICOMweb peer (its ``auth``)."""

    NONE = "none"
    BASIC = "basic"  # username, and the password from the environment or a systemd credential
    AZURE = "azure"  # a Microsoft Entra token for Azure's DICOM service


class Device(StrEnum):
    """Where inference runs (``inference.device``)."""

    AUTO = "auto"  # CUDA when a GPU is present, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


class DateMode(StrEnum):
    """What anonymising for sync does to dates (``sync.date_shift``): shifted per patient
    (Retain Longitudinal Temporal Information Modified Dates, 113107) or removed per the basic
    profile."""

    SHIFT = "shift"
    REMOVE = "remove"


class ActivationPolicy(StrEnum):
    """What happens after sync imports a model version (``sync.activation``)."""

    MANUAL = "manual"  # imported inactive: an admin activates it (the default)
    AUTO = "auto"  # activated at once


class NotifyEvent(StrEnum):
    """What a webhook may listen for (its ``on:``)."""

    NEEDS_REVIEW = "needs_review"
    FAILED = "failed"
    DELIVERED = "delivered"
    DRIFT = "drift"  # a model version's drift alarm was raised


class Role(StrEnum):
    """What a node does (``serve --role``)."""

    ALL = "all"  # one VM: receiver and worker
    RECEIVER = "receiver"  # the DICOM listener, the spool, series completion
    WORKER = "worker"  # claims jobs: routing, inference, writing, delivery

    @property
    def receives(self) -> bool:
        return self is not Role.WORKER

    @property
    def works(self) -> bool:
        return self is not Role.RECEIVER


class ModelFormat(StrEnum):
    """``format:`` of model.yaml: whose code runs the package."""

    NATIVE = "native"
    NNUNETV2 = "nnunetv2"
    MONAI_BUNDLE = "monai_bundle"


class Side(StrEnum):
    """The patient's side a structure lies on (model.yaml ``expect.side``), as plausibility finds it."""

    LEFT = "left"
    RIGHT = "right"


class FailureKind(StrEnum):
    """Why the inference child says a request failed (its ``InferenceFailure``)."""

    MODEL = "model"  # the package cannot be used (ModelError)
    INFERENCE = "inference"  # anything else (InferenceError)
    OOM = "oom"  # CUDA out of memory: the worker may run it once on the CPU
    DISK_FULL = "disk_full"  # the worker retries later


class PullStatus(StrEnum):
    """What sync's model pull did with one published version."""

    ACTIVE = "active"  # imported and activated (policy auto)
    AVAILABLE = "available"  # imported, not active (policy manual): `ie-gateway models activate`
    REFUSED = "refused"  # not imported; ``reason`` says why
