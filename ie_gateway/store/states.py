"""The life of a series job, and the moves between states that the node allows."""

from __future__ import annotations

from ie_gateway.vocab import JobState

__all__ = ["ALLOWED", "UNFINISHED", "JobState"]

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.ROUTED, S.UNROUTED, S.REFUSED, S.FAILED, S.ASSESSING}),
    S.ASSESSING: frozenset({S.UNROUTED, S.FAILED}),  # figures stored (or why not), then parked
    S.ROUTED: frozenset({S.INFERRING, S.REFUSED, S.FAILED}),
    S.INFERRING: frozenset({S.INFERRED, S.ROUTED, S.REFUSED, S.FAILED}),
    S.INFERRED: frozenset({S.SENDING, S.NEEDS_REVIEW, S.FAILED}),
    S.NEEDS_REVIEW: frozenset({S.INFERRED, S.COMPLETE, S.FAILED}),  # `release`, or `reroute`
    S.SENDING: frozenset({S.DELIVERED, S.FAILED}),
    S.DELIVERED: frozenset({S.EXCLUDED}),
    S.EXCLUDED: frozenset(),
    # an admin's replay (`send --retry`) or `reroute` after fixing the rules (ie_gateway.ops.admin)
    S.FAILED: frozenset({S.SENDING, S.ROUTED, S.COMPLETE}),
    S.REFUSED: frozenset({S.COMPLETE}),
    S.UNROUTED: frozenset({S.ROUTED, S.COMPLETE}),
}
UNFINISHED = frozenset({S.RECEIVING, S.COMPLETE, S.ROUTED, S.INFERRING, S.INFERRED, S.SENDING, S.ASSESSING})
#: waiting for the worker (routing, then inference): `status` and the page show them in queue order
QUEUED = (S.COMPLETE, S.ROUTED)
