"""What an admin may do to a job; the command line and the admin's web page call these.

Each action takes ``(store, job_id, who)``, records who acted in the job's transitions, and
raises :class:`~ie_gateway.errors.AdminError` with a sentence for the admin when the job is
not in a state the action applies to.
"""

from __future__ import annotations

import structlog

from ie_gateway.errors import AdminError
from ie_gateway.store import JobState, Store
from ie_gateway.store.outbox import Outbox

log = structlog.get_logger(__name__)


def retry(store: Store, job_id: int, who: str) -> int:
    """Queue a failed job's dead-lettered deliveries again; return how many."""
    job = store.index.job(job_id)
    queued = Outbox(store.index).retry(job_id)
    if not queued:
        raise AdminError(f"job {job_id} has no dead-lettered deliveries to replay (state {job.state.value})")
    if job.state is JobState.FAILED:
        store.index.transition(job_id, JobState.SENDING, reason=f"replayed by {who}")
    log.info("deliveries replayed", job=job_id, who=who, queued=queued)
    return queued
