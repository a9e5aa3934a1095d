"""Commissioning: a model version run over a department's own past cases before it goes live.

``commission(cfg, spec, cases_dir, out_dir)`` runs every case (a folder with a CT series and
the clinician's approved RT-STRUCT, see :mod:`.cases`) through the node's own path
(:mod:`.run`), writes ``figures.json``, ``report.html`` and ``report.pdf`` (:mod:`.report`), and,
once every case has run, makes the run's median Dice per structure the version's drift baseline
(:data:`ie_gateway.qa.drift.COMMISSIONED_FILE`, beside the index).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ie_gateway.commission.run import FIGURES_FILE, CaseResult, Progress, Run, figure_rows
from ie_gateway.config import GatewayConfig
from ie_gateway.errors import CommissionError
from ie_gateway.infer.registry import registry_for
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.qa import drift
from ie_gateway.vocab import Device


@dataclass(frozen=True)
class Outcome:
    """What a run left: its report files, its cases, and whether it set the drift baseline."""

    html: Path
    pdf: Path
    figures: Path
    results: list[CaseResult]
    failed_structures: list[str]  # structures with a case that fails its criteria
    baseline_set: bool


def commission(
    cfg: GatewayConfig,
    spec: str,
    cases_dir: Path,
    out_dir: Path,
    progress: Progress = lambda line: None,
    runner: InferenceRunner | None = None,
) -> Outcome:
    """Run model ``spec`` (NAME or NAME@VERSION) over ``cases_dir`` into the report ``out_dir``."""
    from ie_gateway.commission.report import structure_summary, write_report

    if runner is None:  # the child's own log lines would break up the progress lines
        device = None if cfg.inference.device is Device.AUTO else cfg.inference.device
        with InferenceRunner(cfg.inference.timeout_s, device=device, log_level="warning") as own:
            return commission(cfg, spec, cases_dir, out_dir, progress, own)
    model = registry_for(cfg).resolve(spec)
    progress(f"commissioning {model.spec} on the cases in {cases_dir}")
    run = Run(cfg, model, runner, cases_dir, out_dir, progress)
    results = run.run()
    done = [r for r in results if r.done]
    if not done:
        raise CommissionError(f"no case could be run; the reasons: {'; '.join(r.reason for r in results)}")
    rows = figure_rows(model, results)
    html, pdf = write_report(run, results, rows)
    baseline = len(done) == len(results)
    if baseline:
        dice: dict[str, list[float]] = {}
        for row in rows:
            dice.setdefault(row["structure"], []).append(row["dice"])
        drift.record_commissioned(
            cfg.storage.root / drift.COMMISSIONED_FILE,
            model.name,
            model.version,
            {name: statistics.median(values) for name, values in dice.items()},
            {"at": time.time(), "cases": len(done), "report": str(html.resolve())},
        )
        progress(f"the run's median Dice per structure is now the drift baseline of {model.spec}")
    else:
        progress(f"{len(results) - len(done)} case(s) not run: the drift baseline is left as it was")
    failed = [s["structure"] for s in structure_summary(model, rows) if s["verdict"] == "FAIL"]
    return Outcome(html, pdf, out_dir / FIGURES_FILE, results, failed, baseline)


__all__ = ["Outcome", "commission"]
