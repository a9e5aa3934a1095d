"""The commissioning report a physicist files: ``report.html`` (one self-contained file) and
``report.pdf`` with the same content, beside ``figures.json``.

It says which model version was run (name, version, format, the package's checksums) by which
node version on how many cases; per structure the acceptance criteria of model.yaml
(``commissioning:``), how many cases met them, and the spread of every figure (box and strip
plots, failing cases in red); the worst cases of each structure as pictures (the AI's outline in
the structure's colour, the clinician's in white, on the same slices); and the cases that could
not be run, with the reason. Plots are drawn with matplotlib (no pyplot, no global state), the
pictures by ``pictures``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from ie_gateway import __version__
from ie_gateway.commission.cases import read_case
from ie_gateway.commission.run import RTSTRUCT_FILE, WORK_DIR, CaseResult, Run, criteria_of, work_name
from ie_gateway.imaging import SliceGeometry, rasterize_roi, read_headers
from ie_gateway.infer.manifest import MANIFEST_NAME, Commissioning
from ie_gateway.infer.registry import ModelVersion
from ie_gateway.pictures import render_comparison_png
from ie_gateway.qa.agreement import FIGURES, match_structures
from ie_gateway.volume import load_volume

HTML_FILE = "report.html"
PDF_FILE = "report.pdf"
PICTURES_DIR = "pictures"
#: Pictures per structure: its failing cases first, then the lowest Dice.
WORST_PER_STRUCTURE = 3
PDF_NOTES = 40  # problem and plausibility lines on the PDF's first page

LABELS = {
    "dice": "Dice",
    "hd95_mm": "HD95 (mm)",
    "msd_mm": "mean surface distance (mm)",
    "surface_dice": "surface Dice",
    "volume_diff_pct": "volume difference (%)",
}


@dataclass(frozen=True)
class Picture:
    case: str
    structure: str
    caption: str
    path: Path


def identity(model: ModelVersion) -> dict[str, Any]:
    """What identifies the run: model version, package checksums, node version, time."""
    manifest = model.manifest
    return {
        "model": model.name,
        "version": model.version,
        "format": str(manifest.format),
        "description": manifest.description,
        "model_yaml_sha256": hashlib.sha256((model.path / MANIFEST_NAME).read_bytes()).hexdigest(),
        "files": [(f.file, f.sha256) for f in (*manifest.folds, *manifest.files)],
        "node_version": __version__,
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def criteria_text(criteria: Commissioning | None) -> str:
    if criteria is None:
        return "none"
    parts = [f"Dice ≥ {criteria.dice_min:g}"] if criteria.dice_min is not None else []
    parts += [f"HD95 ≤ {criteria.hd95_max_mm:g} mm"] if criteria.hd95_max_mm is not None else []
    return ", ".join(parts) or "none"


def structure_summary(model: ModelVersion, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per structure (model order): cases, passes, fails, verdict and the median of each figure."""
    out = []
    for name, criteria in criteria_of(model).items():
        mine = [r for r in rows if r["structure"] == name]
        if not mine:
            continue
        failed = [r for r in mine if r["pass"] is False]
        judged = criteria is not None and any(r["pass"] is not None for r in mine)
        out.append(
            {
                "structure": name,
                "criteria": criteria_text(criteria),
                "cases": len(mine),
                "passed": sum(1 for r in mine if r["pass"] is True),
                "failed": len(failed),
                "failed_cases": [r["case"] for r in failed],
                "verdict": ("FAIL" if failed else "PASS") if judged else "no criteria",
                "medians": {f: _median([r[f] for r in mine]) for f in FIGURES},
            }
        )
    return out


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def distribution_plot(model: ModelVersion, rows: Sequence[dict[str, Any]], figure: str) -> Figure:
    """One figure for all structures: a box per structure, each case a dot (red: failed), and
    the structure's criterion for this figure as a red dash."""
    names = [n for n in criteria_of(model) if any(r["structure"] == n for r in rows)]
    fig = Figure(figsize=(8.0, 3.2), layout="constrained")
    ax = fig.add_subplot()
    data = [[r[figure] for r in rows if r["structure"] == n and r[figure] is not None] for n in names]
    ax.boxplot(data, tick_labels=names, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)  # the same jitter on every run of the report
    for i, name in enumerate(names, start=1):
        mine = [r for r in rows if r["structure"] == name and r[figure] is not None]
        x = i + rng.uniform(-0.12, 0.12, len(mine))
        colours = ["#c00000" if r["pass"] is False else "#1f4e9c" for r in mine]
        ax.scatter(x, [r[figure] for r in mine], c=colours, s=18, zorder=3)
        limit = _limit(criteria_of(model)[name], figure)
        if limit is not None:
            ax.hlines(limit, i - 0.35, i + 0.35, colors="#c00000", linestyles="dashed")
    ax.set_ylabel(LABELS[figure])
    ax.grid(axis="y", alpha=0.3)
    return fig


def _limit(criteria: Commissioning | None, figure: str) -> float | None:
    if criteria is None:
        return None
    return {"dice": criteria.dice_min, "hd95_mm": criteria.hd95_max_mm}.get(figure)


def worst_cases(model: ModelVersion, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per structure, its failing cases then its lowest Dice, at most WORST_PER_STRUCTURE."""
    worst = []
    for name in criteria_of(model):
        mine = sorted((r for r in rows if r["structure"] == name), key=lambda r: (r["pass"] is not False, r["dice"]))
        worst += mine[:WORST_PER_STRUCTURE]
    return worst


def draw_pictures(run: Run, rows: Sequence[dict[str, Any]]) -> list[Picture]:
    """The worst cases' pictures, into ``REPORT_DIR/pictures`` (the CT is read again from the
    case folder: the run keeps only label maps and RT-STRUCTs)."""
    folder = run.out_dir / PICTURES_DIR
    folder.mkdir(exist_ok=True)
    colours = {s.name: s.color for s in run.model.manifest.structures}
    pictures = []
    by_case: dict[str, list[dict[str, Any]]] = {}
    for row in worst_cases(run.model, rows):
        by_case.setdefault(row["case"], []).append(row)
    for case_name, wanted in sorted(by_case.items()):
        case = read_case(run.cases_dir / case_name)
        volume = load_volume(case.ct_files, run.checks)
        hu = sitk.GetArrayViewFromImage(volume.image)
        spacing = tuple(float(s) for s in volume.image.GetSpacing())
        headers = read_headers(volume.paths)
        geometry = SliceGeometry.from_headers(headers)
        shape = hu.shape
        ai = _rois(run.out_dir / WORK_DIR / work_name(case_name) / RTSTRUCT_FILE)
        approved = _rois(case.approved)
        matched = match_structures(
            [r["structure"] for r in wanted], {n: name for n, (name, _) in approved.items()}, run.aliases
        )
        ai_by_name = {name: item for name, item in ai.values()}
        for row in wanted:
            name = row["structure"]
            ai_mask = _mask(ai_by_name.get(name), geometry, shape)
            approved_mask = _mask(approved[matched[name]][1] if name in matched else None, geometry, shape)
            verdict = {True: "passes", False: "FAILS", None: "no criteria"}[row["pass"]]
            caption = f"{case_name} · {name}: Dice {row['dice']:.3f}, HD95 {_mm(row['hd95_mm'])} ({verdict})"
            path = folder / f"{work_name(case_name)}-{name}.png"
            render_comparison_png(
                hu, ai_mask, approved_mask, (spacing[0], spacing[1], spacing[2]), colours[name], caption, path
            )
            pictures.append(Picture(case_name, name, caption, path))
    return pictures


def _rois(path: Path) -> dict[int, tuple[str, Any]]:
    """ROI number → (name, ROIContourSequence item) of a structure set file (none if absent)."""
    if not path.is_file():
        return {}
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    return {int(c.ReferencedROINumber): (names.get(int(c.ReferencedROINumber), ""), c) for c in ds.ROIContourSequence}


def _mask(item: Any, geometry: SliceGeometry, shape: tuple[int, ...]) -> np.ndarray:
    if item is None:
        return np.zeros(shape, dtype=bool)
    return rasterize_roi(item, geometry, (shape[0], shape[1], shape[2]))


def _mm(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} mm"


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode()


def write_report(run: Run, results: Sequence[CaseResult], rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.pdf`` of a run; their paths."""
    started = time.monotonic()
    model = run.model
    ident = identity(model)
    summary = structure_summary(model, rows)
    plots = {f: distribution_plot(model, rows, f) for f in FIGURES if any(r[f] is not None for r in rows)}
    pictures = draw_pictures(run, rows)
    done = [r for r in results if r.done]
    context = {
        "identity": ident,
        "summary": summary,
        "cases": results,
        "done": done,
        "not_run": [r for r in results if not r.done],
        "flagged": [r for r in done if r.findings],
        "plots": {LABELS[f]: _png(fig) for f, fig in plots.items()},
        "pictures": [(p.caption, base64.b64encode(p.path.read_bytes()).decode()) for p in pictures],
        "node_seconds": _median([r.seconds.get("node") for r in done]),
        "inference_seconds": _median([r.seconds.get("inference") for r in done]),
        "fmt": _fmt,
    }
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape())
    html = run.out_dir / HTML_FILE
    html.write_text(env.get_template("report.html").render(context))
    pdf = run.out_dir / PDF_FILE
    _write_pdf(pdf, ident, summary, results, plots, pictures)
    run.progress(f"report written in {time.monotonic() - started:.1f} s: {html}, {pdf}")
    return html, pdf


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _write_pdf(
    path: Path,
    ident: dict[str, Any],
    summary: Sequence[dict[str, Any]],
    results: Sequence[CaseResult],
    plots: dict[str, Figure],
    pictures: Sequence[Picture],
) -> None:
    """The same report on A4 pages: identity and verdicts, the plots, the pictures, problems."""
    a4 = (8.27, 11.69)
    tmp = path.with_name(f".{path.name}.tmp")
    with PdfPages(tmp, metadata={"Title": f"Commissioning of {ident['model']}@{ident['version']}"}) as pdf:
        page = Figure(figsize=a4)
        lines = [
            f"Commissioning of {ident['model']} version {ident['version']} ({ident['format']})",
            f"ie_gateway {ident['node_version']}, {ident['written']}",
            f"model.yaml sha256 {ident['model_yaml_sha256']}",
            *(f"{file} sha256 {digest}" for file, digest in ident["files"]),
            "",
            f"{sum(1 for r in results if r.done)} cases run, {sum(1 for r in results if not r.done)} not run",
            "",
        ]
        for s in summary:
            medians = s["medians"]
            lines.append(
                f"{s['structure']}: {s['verdict']} ({s['criteria']}): {s['passed']} passed, {s['failed']} failed "
                f"of {s['cases']}; median Dice {_fmt(medians['dice'])}, HD95 {_fmt(medians['hd95_mm'], 1)} mm"
            )
            if s["failed_cases"]:
                lines.append(f"    failed: {', '.join(s['failed_cases'])}")
        notes = [f"not run: {r.case}: {r.reason}" for r in results if not r.done]
        notes += [f"flagged by the plausibility gate: {r.case}: {'; '.join(r.findings)}" for r in results if r.findings]
        shown = notes[:PDF_NOTES]  # one page holds so many; the HTML lists them all
        lines += [
            "",
            *shown,
            *([f"... and {len(notes) - len(shown)} more in {HTML_FILE}"] if notes[PDF_NOTES:] else []),
        ]
        page.text(0.06, 0.96, "\n".join(lines), va="top", ha="left", fontsize=7.5, family="monospace", wrap=True)
        pdf.savefig(page)
        for title, fig in plots.items():
            fig.suptitle(LABELS[title])
            pdf.savefig(fig)
        for picture in pictures:
            fig = Figure(figsize=(a4[0], a4[0] * 0.45), layout="constrained")
            ax = fig.add_subplot()
            ax.imshow(np.asarray(_read_png(picture.path)))
            ax.set_axis_off()
            ax.set_title(picture.caption, fontsize=8)
            pdf.savefig(fig)
    tmp.replace(path)


def _read_png(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
