"""The assess stage: a clinician's structure set, linked to a CT job the node contoured, against
the AI's contours of that case (agreement figures, then the drift check).

The worker runs it for jobs in ``assessing`` after every other stage, so a CT never waits
behind a comparison. The AI side is the RT-STRUCT each route's output plan delivered (what the
clinician edited, under the names the TPS showed), else the route's label map. A draft gets no
figures; a case that cannot be compared (files purged, model removed) says why in the
structure set job's reason. A structure the delivered file's names file left out is not
compared (the clinician never saw it); one the model found empty is (it scores 0).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import structlog

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import AgreementError, ConfigError, ModelError, WriteError
from ie_gateway.imaging import structures_of
from ie_gateway.infer.registry import Registry
from ie_gateway.log import scrub
from ie_gateway.plan import labels_file
from ie_gateway.qa import drift
from ie_gateway.qa.agreement import Bounds, ModelContours, assess_approval
from ie_gateway.qa.approvals import approved_sets
from ie_gateway.roinames import load_roi_names, site_aliases
from ie_gateway.store import Job, Store

log = structlog.get_logger(__name__)


def assess_structure_set(cfg: GatewayConfig, store: Store, registry: Registry, rt_job: int, ct_job_id: int) -> str:
    """Figures of the approved set in ``rt_job`` against the AI's contours of ``ct_job_id``;
    what the structure set job's reason should add."""
    approved = approved_sets(store, rt_job)
    if not approved:
        return ""
    ct_job = store.index.job(ct_job_id)
    settings = cfg.agreement
    try:
        contours = [_contours(store, registry, ct_job, index) for index in range(len(ct_job.routes))]
        aliases = site_aliases(cfg.destinations, [d for r in ct_job.routes for d in r.send_to])
        geometry = store.geometry(ct_job)
        bounds = Bounds(settings.max_contours, settings.max_points, settings.timeout_s)
        rows = assess_approval(
            store.index, ct_job, geometry, rt_job, approved[-1], contours, settings.tolerance_mm, aliases, bounds
        )
    except (AgreementError, ModelError, ConfigError, WriteError, OSError, pydicom.errors.InvalidDicomError) as exc:
        log.warning("agreement not computed", ct_job=ct_job.id, reason=scrub(str(exc)))
        return f"; no agreement figures: {scrub(str(exc))}"
    for model in {f"{c.model}@{c.version}" for c in contours}:
        drift.log_alarms(store.index, settings, cfg.models_dir, model, cfg.storage.root / drift.COMMISSIONED_FILE)
    return f"; agreement figures of {rows} structures"


def _contours(store: Store, registry: Registry, ct_job: Job, index: int) -> ModelContours:
    """Where route ``index`` of a contoured job left its contours, and what they are."""
    model = registry.resolve(ct_job.routes[index].spec)
    folder = store.job_dir(ct_job.id)
    delivered = ct_job.detail.plan.delivered_rtstruct(index)
    rtstruct = folder / delivered.file if delivered is not None else None
    structures = structures_of(model.manifest)
    if delivered is not None and delivered.names_file:  # what the names file left out, no one saw
        names = load_roi_names(Path(delivered.names_file))
        structures = [s for s in structures if names.local_name(s.name) is not None]
    return ModelContours(model.name, model.version, structures, rtstruct, folder / labels_file(index))
