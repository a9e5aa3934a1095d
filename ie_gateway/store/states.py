"""The life of a series job, and the moves between states that the node allows."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """States of a series job, as `ie-gateway status` shows them."""

    RECEIVING = "receiving"  # instances arriving; not yet quiet for stable_after_s
    COMPLETE = "complete"  # quiet period passed; waiting for routing
    ROUTED = "routed"  # a rule chose a model; waiting for the worker
    REFUSED = "refused"  # the series cannot be processed (geometry, modality); see reason
    UNROUTED = "unrouted"  # no rule matched; kept until retention
    INFERRING = "inferring"  # the worker is running the model
    INFERRED = "inferred"  # label map stored; outputs being written
    NEEDS_REVIEW = "needs_review"  # failed its model's plausibility checks; held until released
    SENDING = "sending"  # results in the outbox
    DELIVERED = "delivered"  # every destination has every result
    FAILED = "failed"  # gave up; see reason (dead-lettered deliveries, inference errors)


S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.ROUTED, S.UNROUTED, S.REFUSED, S.FAILED}),
    S.ROUTED: frozenset({S.INFERRING, S.REFUSED, S.FAILED}),
    S.INFERRING: frozenset({S.INFERRED, S.ROUTED, S.REFUSED, S.FAILED}),
    S.INFERRED: frozenset({S.SENDING, S.NEEDS_REVIEW, S.FAILED}),
    S.NEEDS_REVIEW: frozenset({S.INFERRED, S.COMPLETE, S.FAILED}),  # `release`, or `reroute`
    S.SENDING: frozenset({S.DELIVERED, S.FAILED}),
    S.DELIVERED: frozenset(),
    # an admin's replay (`send --retry`) or `reroute` after fixing the rules (ie_gateway.admin)
    S.FAILED: frozenset({S.SENDING, S.ROUTED, S.COMPLETE}),
    S.REFUSED: frozenset({S.COMPLETE}),
    S.UNROUTED: frozenset({S.ROUTED, S.COMPLETE}),
}
UNFINISHED = frozenset({S.RECEIVING, S.COMPLETE, S.ROUTED, S.INFERRING, S.INFERRED, S.SENDING})
#: waiting for the worker (routing, then inference): `status` and the page show them in queue order
QUEUED = (S.COMPLETE, S.ROUTED)
