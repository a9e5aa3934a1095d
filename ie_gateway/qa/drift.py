"""Drift alarms: a model version whose contours clinicians now change more than they used to.

For each (model, version, structure) with agreement figures, the rolling median Dice of the last
``window`` cases is compared with the version's baseline: the median Dice of the version's
commissioning run on this site's cases (``ie-gateway commission``, kept in
``<storage.root>/commissioned-baselines.json``) when there was one, else ``baseline_dice`` of the
structure in model.yaml when given, else the median Dice of the version's first ``window`` cases. The alarm is
raised when the rolling median is below the baseline by more than ``margin``. With a baseline
from the data, the alarm waits for ``2 * window`` cases so the two windows never share a case.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from ie_gateway.config import AgreementSettings
from ie_gateway.errors import ModelError
from ie_gateway.infer.manifest import load_manifest
from ie_gateway.infer.modelref import parse_model_ref
from ie_gateway.store import Index

log = structlog.get_logger(__name__)

#: (model, version, structure)
Key = tuple[str, str, str]

#: Beside the index: per ``model@version``, the median Dice per structure of its commissioning run.
COMMISSIONED_FILE = "commissioned-baselines.json"


@dataclass(frozen=True)
class DriftState:
    """Where one structure of one model version stands against its baseline."""

    model: str
    version: str
    structure: str
    cases: int
    baseline: float | None
    baseline_from: str  # "model.yaml", "first N cases", or "" while there are too few cases
    recent: float | None  # median Dice of the last ``window`` cases
    margin: float
    alarm: bool

    def message(self) -> str:
        if self.baseline is None or self.recent is None:
            return f"{self.model}@{self.version} {self.structure}: {self.cases} cases, too few for a baseline"
        verdict = "DRIFT" if self.alarm else "ok"
        return (
            f"{verdict}: {self.model}@{self.version} {self.structure}: median Dice of the last cases "
            f"{self.recent:.3f}, baseline {self.baseline:.3f} ({self.baseline_from}), margin {self.margin:g}"
        )


def states(
    index: Index,
    settings: AgreementSettings,
    baselines: Mapping[Key, float] | None = None,
    model: str | None = None,
    sources: Mapping[Key, str] | None = None,
) -> list[DriftState]:
    """The drift state of every structure of every version with figures (of ``model`` only).

    ``sources`` says where each of ``baselines`` comes from (default "model.yaml")."""
    name, version = parse_model_ref(model) if model is not None else (None, None)
    by_key: dict[Key, list[float]] = {}
    for row in index.agreement(model=name, version=version or None):
        by_key.setdefault((row.model, row.model_version, row.structure), []).append(row.dice)
    return [
        evaluate(key, dice, settings, (baselines or {}).get(key), (sources or {}).get(key, "model.yaml"))
        for key, dice in sorted(by_key.items())
    ]


def evaluate(
    key: Key, dice: list[float], settings: AgreementSettings, declared: float | None, declared_from: str = "model.yaml"
) -> DriftState:
    """The state of one structure from its Dice values, oldest first."""
    n = settings.window
    baseline: float | None
    if declared is not None:
        baseline, source, needed = declared, declared_from, n
    else:
        baseline, source, needed = (
            (statistics.median(dice[:n]), f"first {n} cases", 2 * n) if len(dice) >= n else (None, "", 2 * n)
        )
    recent = statistics.median(dice[-n:]) if len(dice) >= needed else None
    alarm = baseline is not None and recent is not None and recent < baseline - settings.margin
    return DriftState(
        *key,
        cases=len(dice),
        baseline=baseline,
        baseline_from=source if recent is not None else "",
        recent=recent,
        margin=settings.margin,
        alarm=alarm,
    )


def manifest_baselines(models_dir: Path, pairs: Iterable[tuple[str, str]]) -> dict[Key, float]:
    """``baseline_dice`` of each structure in the model.yaml of these (model, version) pairs.

    Reads only the manifest (no checksums): a removed or broken package just has no baseline.
    """
    out: dict[Key, float] = {}
    for name, version in set(pairs):
        try:
            manifest = load_manifest(models_dir / name / version)
        except ModelError:
            continue
        for s in manifest.structures:
            if s.baseline_dice is not None:
                out[(name, version, s.name)] = s.baseline_dice
    return out


def commissioned_baselines(path: Path | None) -> dict[Key, float]:
    """The median Dice per structure of each version's commissioning run, from ``path``
    (:data:`COMMISSIONED_FILE`); an absent or unreadable file gives none."""
    if path is None:
        return {}
    try:
        runs = json.loads(path.read_text())
        return {
            (*spec.partition("@")[::2], structure): float(dice)
            for spec, run in runs.items()
            for structure, dice in run["dice"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if path.exists():
            log.warning("commissioned baselines unreadable", file=str(path), error=type(exc).__name__)
        return {}


def record_commissioned(
    path: Path, model: str, version: str, dice: Mapping[str, float], detail: Mapping[str, object]
) -> None:
    """Make ``dice`` (structure → median Dice of a commissioning run) the drift baseline of
    ``model@version``, replacing an earlier run's; written atomically."""
    runs: dict[str, object] = {}
    if path.is_file():
        try:
            runs = json.loads(path.read_text())
        except ValueError:
            log.warning("commissioned baselines unreadable, rewritten", file=str(path))
    runs[f"{model}@{version}"] = {**detail, "dice": dict(dice)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(runs, indent=2, sort_keys=True))
    tmp.replace(path)


def _baselines(
    models_dir: Path, commissioned: Path | None, pairs: Iterable[tuple[str, str]]
) -> tuple[dict[Key, float], dict[Key, str]]:
    """Declared baselines and where each comes from: a commissioning run before model.yaml."""
    pairs = set(pairs)
    values: dict[Key, float] = manifest_baselines(models_dir, pairs)
    sources = dict.fromkeys(values, "model.yaml")
    for key, dice in commissioned_baselines(commissioned).items():
        if key[:2] in pairs:
            values[key], sources[key] = dice, "commissioning"
    return values, sources


def current(
    index: Index, settings: AgreementSettings, models_dir: Path, commissioned: Path | None = None
) -> list[DriftState]:
    """Every structure's state, with baselines from commissioning runs (``commissioned``, the
    node's :data:`COMMISSIONED_FILE`) and the installed model.yaml files."""
    pairs = {(r.model, r.model_version) for r in index.agreement()}
    values, sources = _baselines(models_dir, commissioned, pairs)
    return states(index, settings, values, sources=sources)


def alarms(
    index: Index, settings: AgreementSettings, models_dir: Path, commissioned: Path | None = None
) -> list[DriftState]:
    """The structures in alarm now: what `status`, the page and the log show."""
    return [s for s in current(index, settings, models_dir, commissioned) if s.alarm]


def gauge_values(
    index: Index, settings: AgreementSettings, models_dir: Path, commissioned: Path | None = None
) -> dict[Key, int]:
    """1 for each (model, version, structure) in alarm, 0 otherwise: for a Prometheus gauge
    with labels model, version, structure."""
    return {(s.model, s.version, s.structure): int(s.alarm) for s in current(index, settings, models_dir, commissioned)}


def log_alarms(
    index: Index, settings: AgreementSettings, models_dir: Path, model: str, commissioned: Path | None = None
) -> list[DriftState]:
    """After new figures of ``model@version``: log each of its structures in alarm."""
    name, version = parse_model_ref(model)
    pairs = [(name, version)] if version else []
    values, sources = _baselines(models_dir, commissioned, pairs)
    found = [s for s in states(index, settings, values, model=model, sources=sources) if s.alarm]
    for s in found:
        log.warning(
            "agreement drift",
            model=s.model,
            version=s.version,
            structure=s.structure,
            recent_dice=round(s.recent or 0.0, 4),
            baseline_dice=round(s.baseline or 0.0, 4),
            baseline_from=s.baseline_from,
            margin=s.margin,
            cases=s.cases,
        )
    return found
