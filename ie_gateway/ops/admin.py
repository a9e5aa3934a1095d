"""What an admin may do to a job: reroute it, release it from review or reject it, retry its
deliveries.

The command line and the admin's web page call these; each is recorded in the job's
transitions with who did it and when, so `status` and an audit can tell the node's own moves
from a person's. Each raises :class:`~ie_gateway.errors.AdminError` with a sentence for the
admin when the job is not in a state the action applies to.
"""

from __future__ import annotations

import time
from dataclasses import replace

import structlog

from ie_gateway.errors import AdminError
from ie_gateway.store import Job, JobState, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import OutputPlan, Review
from ie_gateway.vocab import ReviewPolicy

log = structlog.get_logger(__name__)

#: States `reroute` takes a job from: nothing was delivered, or it was held before sending.
REROUTABLE = frozenset({JobState.UNROUTED, JobState.REFUSED, JobState.FAILED, JobState.NEEDS_REVIEW})


def reroute(store: Store, job_id: int, who: str) -> Job:
    """Route the job again from the start (after a rules fix): it goes back to `complete`.

    Its earlier outputs and undelivered deliveries are dropped, so the rules in force now decide
    the model, the outputs and the destinations, and new results get new UIDs. Its attempts and
    crashes per stage start again from zero: the admin has taken the crash loop in hand.
    """
    job = store.index.job(job_id)
    if job.state not in REROUTABLE:
        raise AdminError(
            f"job {job_id} is {job.state.value}; only "
            f"{', '.join(sorted(s.value for s in REROUTABLE))} jobs can be rerouted"
        )
    cancelled = Outbox(store.index).cancel(job_id)
    store.index.forget_stages(job_id)
    # what the earlier routing produced goes; what the series is (files, links, sync) stays
    detail = replace(
        job.detail, plan=OutputPlan(), outputs=(), review=None, not_sent={}, deliveries=None, empty_structures=()
    )
    store.index.transition(
        job_id,
        JobState.COMPLETE,
        reason=f"rerouted by {who}",
        who=who,
        routes=(),
        detail=detail,
        completed_at=time.time(),
    )
    log.info("job rerouted", job=job_id, who=who, was=job.state.value, cancelled_deliveries=cancelled)
    return store.index.job(job_id)


def release(store: Store, job_id: int, who: str, comment: str = "") -> Job:
    """Let a result held for review go out (marked NEEDS REVIEW, as its checks failed);
    ``comment``, the reviewer's why, is kept in the transition's reason."""
    job = store.index.job(job_id)
    if job.state is not JobState.NEEDS_REVIEW:
        raise AdminError(f"job {job_id} is {job.state.value}, not needs_review: nothing to release")
    review = job.detail.review or Review(reasons=(), policy=ReviewPolicy.HOLD)
    released = replace(review, released_by=who, released_at=time.time())
    store.index.update_detail(job_id, lambda d: replace(d, review=released))
    store.index.transition(job_id, JobState.INFERRED, reason=_with_comment(f"released by {who}", comment), who=who)
    log.info("job released", job=job_id, who=who)
    return store.index.job(job_id)


def reject(store: Store, job_id: int, who: str, comment: str = "") -> Job:
    """Refuse a result held for review: nothing is written or sent, the job ends failed with
    who rejected it and why (``reroute`` can still run it again)."""
    job = store.index.job(job_id)
    if job.state is not JobState.NEEDS_REVIEW:
        raise AdminError(f"job {job_id} is {job.state.value}, not needs_review: nothing to reject")
    store.index.transition(job_id, JobState.FAILED, reason=_with_comment(f"rejected by {who}", comment), who=who)
    log.info("job rejected", job=job_id, who=who)
    return store.index.job(job_id)


def _with_comment(reason: str, comment: str) -> str:
    """The reason with the person's comment, on one line and of bounded length."""
    text = " ".join(comment.split())[:500]
    return f"{reason}: {text}" if text else reason


def retry(store: Store, job_id: int, who: str) -> int:
    """Queue a failed job's dead-lettered deliveries again; return how many."""
    job = store.index.job(job_id)
    queued = Outbox(store.index).retry(job_id)
    if not queued:
        raise AdminError(f"job {job_id} has no dead-lettered deliveries to replay (state {job.state.value})")
    if job.state is JobState.FAILED:
        store.index.transition(job_id, JobState.SENDING, reason=f"replayed by {who}", who=who)
    log.info("deliveries replayed", job=job_id, who=who, queued=queued)
    return queued
