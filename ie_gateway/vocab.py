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
