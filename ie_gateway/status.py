"""One status view of the jobs, shared by `ie-gateway status` and the admin's page.

A job is shown by internal id, state, reason, model and figures, never with patient data (the
series UID only hashed); paths the index keeps relative are shown where they are on this node.
"""

from __future__ import annotations

import time
from typing import Any

from ie_gateway.log import uid_hash
from ie_gateway.store import Job, Store
from ie_gateway.store.index import MAX_WAIT_S
from ie_gateway.store.states import QUEUED


def status_rows(store: Store, max_wait_s: float | None = None) -> list[dict[str, Any]]:
    """One object per series job, without patient data (the series UID only hashed); a job
    waiting for the worker has its ``queue`` place (1 is taken next, see Index.queue_order;
    ``max_wait_s``: the worker's aging, ``worker.max_wait_s``)."""
    now = time.time()
    queue = store.index.queue_order(QUEUED, max_wait_s=max_wait_s or MAX_WAIT_S)
    places = {job.id: place for place, job in enumerate(queue, 1)}
    crashes = store.index.crashes()
    return [
        {
            **job_status(store, job, now, places.get(job.id)),
            **({"crashes": crashes[job.id]} if job.id in crashes else {}),
        }
        for job in store.index.jobs()
    ]


def job_status(store: Store, job: Job, now: float, queue: int | None = None) -> dict[str, Any]:
    """One job as `status` prints it and the admin's page starts from (``queue``: its place
    among the jobs waiting for the worker)."""
    return {
        "id": job.id,
        "state": job.state.value,
        "instances": job.instances,
        "series": uid_hash(job.series_uid),
        "modality": job.header.get("Modality"),
        "calling_ae": job.calling_ae,
        "age_s": round(now - job.created_at, 1),
        "quiet_s": round(now - job.last_instance_at, 1),
        "model": job.model,
        "model_version": job.model_version,
        "reason": job.reason,
        "priority": job.priority.value,
        **({"queue": queue} if queue is not None else {}),
        **({"late_instances": job.late_instances} if job.late_instances else {}),
        **(_holder(job, now) if job.claimed_by else {}),
        **_shown_detail(store, job),
    }


#: detail kept for the stages, not for an admin reading `status`
HIDDEN_DETAIL = ("slice_files", "plan")


def _shown_detail(store: Store, job: Job) -> dict[str, Any]:
    shown = job.detail.shown()
    if job.detail.qa_png:
        shown["qa_png"] = str(store.qa_png(job))  # where it is on this node's mount
    return {k: v for k, v in shown.items() if k not in HIDDEN_DETAIL}


def _holder(job: Job, now: float) -> dict[str, Any]:
    """Which node works on the job, and for how much longer its lease runs unless renewed."""
    left = (job.lease_until or now) - now
    return {"held_by": job.claimed_by, "lease_s": round(left, 1)} if left > 0 else {}
