"""The life of a series job, and the moves between states that the node allows."""

from __future__ import annotations

from ie_gateway.vocab import JobState

__all__ = ["ALLOWED", "UNFINISHED", "JobState"]

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.ROUTED, S.UNROUTED, S.REFUSED, S.FAILED, S.ASSESSING}),
    S.ASSESSING: frozenset({S.UNROUTED, S.FAILED}),  # figures stored (or why not), then parked
    # straight to inferring: a worker of an earlier version of the node sharing the index
    S.ROUTED: frozenset({S.PREPARED, S.INFERRING, S.REFUSED, S.FAILED}),
    # back to routed: its stored volume went missing, prepared again
    S.PREPARED: frozenset({S.INFERRING, S.ROUTED, S.FAILED}),
    # back to prepared: interrupted, run again on the stored volume; to routed: a job inferring
    # under an earlier version of the node, which stored no volume before it
    S.INFERRING: frozenset({S.INFERRED, S.PREPARED, S.ROUTED, S.REFUSED, S.FAILED}),
    S.INFERRED: frozenset({S.WRITING, S.SENDING, S.NEEDS_REVIEW, S.FAILED}),
    S.WRITING: frozenset({S.SENDING, S.FAILED}),
    S.NEEDS_REVIEW: frozenset({S.INFERRED, S.COMPLETE, S.FAILED}),  # `release`, or `reroute`
    S.SENDING: frozenset({S.DELIVERED, S.FAILED}),
    S.DELIVERED: frozenset({S.EXCLUDED}),
    S.EXCLUDED: frozenset(),
    # an admin's replay (`send --retry`) or `reroute` after fixing the rules (ie_gateway.ops.admin)
    S.FAILED: frozenset({S.SENDING, S.ROUTED, S.COMPLETE}),
    S.REFUSED: frozenset({S.COMPLETE}),
    S.UNROUTED: frozenset({S.ROUTED, S.COMPLETE}),
}
UNFINISHED = frozenset(
    {S.RECEIVING, S.COMPLETE, S.ROUTED, S.PREPARED, S.INFERRING, S.INFERRED, S.WRITING, S.SENDING, S.ASSESSING}
)
#: waiting for the worker (routing, volume, then inference): `status` and the page show them in queue order
QUEUED = (S.COMPLETE, S.ROUTED, S.PREPARED)
