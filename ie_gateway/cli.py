"""`ie-gateway`: the admin's command line. Each command parses, builds objects, calls one function.

Exit status 0 on success; non-zero with a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ie_gateway import log as logsetup
from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.errors import ConfigError, GatewayError
from ie_gateway.infer.modelref import parse_model_ref
from ie_gateway.log import uid_hash
from ie_gateway.vocab import JobState

if TYPE_CHECKING:
    from collections.abc import Callable

    from ie_gateway.infer.manifest import Manifest
    from ie_gateway.infer.registry import Registry
    from ie_gateway.route import RuleSet

DEFAULT_CONFIG = Path("/etc/ie-gateway/gateway.yaml")


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after a sub-command's own words (`models list --config X`);
    # SUPPRESS keeps a later parser's default from overwriting a value given earlier.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help=f"gateway.yaml (default {DEFAULT_CONFIG})"
    )
    parser = argparse.ArgumentParser(prog="ie-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, help_text: str, parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub
    ) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_text, parents=[config])

    serve = command("serve", "run the node (DICOM listener, worker, scheduler)")
    serve.add_argument(
        "--role",
        choices=["all", "receiver", "worker"],
        default="all",
        help="all: everything on this VM; receiver: DICOM listener and spool; worker: claims jobs "
        "(receivers and workers share a PostgreSQL index and a mounted storage.root)",
    )
    command("check-config", "validate gateway.yaml and its routing rules")
    status = command("status", "series jobs, their states and reasons")
    status.add_argument("--json", action="store_true", help="a JSON list, one object per series job")
    explain = command("explain", "show how the routing rules judge a series (exit 0 when one matches)")
    explain.add_argument("path", help="a folder of DICOM files, or a job id from `status`")
    explain.add_argument("--calling-ae", default="", help="the sender's AE title to assume for a folder")
    models = command("models", "installed model versions: list, verify, import, activate")
    models_sub = models.add_subparsers(dest="action", required=True)
    command("list", "every version, verified or not, and which is active", models_sub)
    verify = command("verify", "check checksums and that each fold loads and runs", models_sub)
    verify.add_argument("spec", nargs="?", help="name@version (default: every version)")
    imp = command(
        "import",
        "install a model package (native, nnU-Net v2 folder, MONAI bundle) as an immutable version",
        models_sub,
    )
    imp.add_argument("package", type=Path)
    imp.add_argument("--name", help="model name (needed when the folder has no model.yaml yet)")
    imp.add_argument("--version", help="model version (needed when the folder has no model.yaml yet)")
    describe = command(
        "describe",
        "write model.yaml for an nnU-Net v2 folder or MONAI bundle, to edit before `models import`",
        models_sub,
    )
    describe.add_argument("package", type=Path)
    describe.add_argument("--name", required=True)
    describe.add_argument("--version", required=True)
    act = command("activate", "make a version the one `model: name` routes to", models_sub)
    act.add_argument("name")
    act.add_argument("version")
    demo = command("demo", "run a node and a stand-in TPS on loopback, send a synthetic CT, show the results")
    demo.add_argument("--workdir", type=Path, default=Path("ie-gateway-demo"), help="where the demo keeps its files")
    demo.add_argument("--slices", type=int, default=120, help="slices of the synthetic CT (512x512 each)")
    demo.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    demo.add_argument(
        "--model",
        default="demo-thorax",
        help="model to route to (demo-thorax-nnunet: the nnU-Net v2 demo, needs the [nnunet] extra)",
    )
    sync = command("sync", "upload anonymised cases and pull model versions")
    command(
        "now",
        "run the case upload and the model pull once, with a progress bar",
        sync.add_subparsers(dest="action", required=True),
    )
    audit = command("audit", "received, routed, delivered, synced and admin actions, oldest first")
    audit.add_argument("--since", help="7d, 12h, 30m, or an ISO date/time (UTC)")
    audit.add_argument("--job", type=int, help="only this job")
    audit.add_argument("--csv", action="store_true", help="CSV with a header row")
    agree = command("agreement", "how much clinicians changed the AI's contours, per model version and structure")
    agree.add_argument("--model", help="NAME or NAME@VERSION")
    agree.add_argument("--structure", help="a structure name of the model (any case)")
    agree.add_argument("--since", type=_since, help="only approvals received from this date (YYYY-MM-DD, UTC) on")
    agree.add_argument("--json", action="store_true", help="a JSON list, one object per version and structure")
    send = command("send", "replay deliveries")
    send.add_argument(
        "--retry", type=int, metavar="JOB", required=True, help="queue a failed job's dead-lettered results again"
    )
    reroute = command("reroute", "route an unrouted, refused, failed or held job again (after a rules fix)")
    reroute.add_argument("job", type=int)
    release = command("release", "send a result held for review (needs_review), marked NEEDS REVIEW")
    release.add_argument("job", type=int)
    return parser


def _since(text: str) -> float:
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = DEFAULT_CONFIG
    try:
        return int(COMMANDS[args.command](args))
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"ie-gateway {args.command}: {exc}", file=sys.stderr)
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    logsetup.configure(cfg.log_level)
    from ie_gateway.service import Role, Service

    Service(cfg, role=Role(args.role)).run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from ie_gateway import tls
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.roinames import rule_roi_name_problems

    cfg = load_config(args.config)
    rules = _load_rules(cfg)
    problems = rule_roi_name_problems(cfg, rules, registry_for(cfg))
    tls_problems = tls.config_problems(cfg)
    problems += [f"{cfg.source}: {p}" for p in tls_problems if ": warning: " not in p]
    if problems:
        raise ConfigError(problems)
    for warning in tls_problems:
        print(f"{cfg.source}: {warning}", file=sys.stderr)
    print(f"{cfg.source}: ok")
    print(f"{cfg.routing_file}: ok ({len(rules.rules)} rules)")
    return 0


def _load_rules(cfg: GatewayConfig) -> RuleSet:
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.route.load import rules_loader

    return rules_loader(cfg, registry_for(cfg))(cfg.routing_file)


def cmd_explain(args: argparse.Namespace) -> int:
    from ie_gateway.route import SeriesFacts
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    rules = _load_rules(cfg)
    facts: list[tuple[str, SeriesFacts]] = []
    if args.path.isdigit():
        job = Store.for_settings(cfg.storage).index.job(int(args.path))
        facts.append((f"job {job.id}", SeriesFacts(job.header, job.calling_ae, job.called_ae, job.instances)))
    else:
        for label, (header, count) in _series_in_folder(Path(args.path)).items():
            facts.append((label, SeriesFacts(header, args.calling_ae, cfg.node.ae_title, count)))
    if not facts:
        raise GatewayError(f"no DICOM series found in {args.path}")
    matched = False
    for label, series in facts:
        decision = rules.route(series)
        matched |= decision.routed
        routes = ", ".join(f"{r.model}@{r.version or 'active'} -> {','.join(r.send_to)}" for r in decision.routes)
        print(f"{label}: {series.instances} instances: {routes or 'unrouted'}")
        print(decision.explanation.render())
    return 0 if matched else 1


def _series_in_folder(folder: Path) -> dict[str, tuple[Mapping[str, Any], int]]:
    import pydicom

    from ie_gateway.store import header_values

    found: dict[str, tuple[Mapping[str, Any], int]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        key = f"series {uid_hash(str(ds.get('SeriesInstanceUID', '')))}"
        header, count = found.get(key, (header_values(ds), 0))
        found[key] = (header, count + 1)
    return found


def cmd_models(args: argparse.Namespace) -> int:
    from ie_gateway.infer.formats import describe_package
    from ie_gateway.infer.manifest import load_manifest

    cfg = load_config(args.config)
    if args.action == "describe":
        print(
            f"{describe_package(args.package, args.name, args.version)}: written; edit it, then "
            f"ie-gateway models import {args.package}"
        )
        return 0
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.infer.runner import runner_for

    with runner_for(cfg) as runner:
        return _models(args, registry_for(cfg, runner.verify), describe_package, load_manifest)


def _models(
    args: argparse.Namespace,
    registry: Registry,
    describe: Callable[..., Path],
    load_manifest: Callable[[Path], Manifest],
) -> int:
    if args.action == "list":
        for info in registry.list():
            print(
                f"{info.name}@{info.version}  {'active' if info.active else '      '}  "
                f"{'verified' if info.verified else 'NOT VERIFIED: ' + (info.problem or '')}"
            )
    elif args.action == "verify":
        specs = [args.spec] if args.spec else [f"{i.name}@{i.version}" for i in registry.list()]
        for spec in specs:
            name, version = parse_model_ref(spec)
            registry.verify(name, version or registry.resolve(name).version)
            print(f"{spec}: verified")
    elif args.action == "import":
        manifest = args.package / "model.yaml"
        if not manifest.is_file():
            if not (args.name and args.version):
                raise GatewayError(
                    f"{args.package} has no model.yaml: give --name and --version "
                    f"(or write one first with `ie-gateway models describe`)"
                )
            print(f"{describe(args.package, args.name, args.version)}: written from the package")
        else:
            declared = load_manifest(args.package)
            for option, value in (("--name", declared.name), ("--version", declared.version)):
                given = getattr(args, option[2:])
                if given is not None and given != value:
                    raise GatewayError(f"{manifest} says {option[2:]} {value!r}, not {given!r}")
        model = registry.import_version(args.package)
        print(
            f"{model.name}@{model.version}: imported (activate with: ie-gateway models activate "
            f"{model.name} {model.version})"
        )
    elif args.action == "activate":
        activation = registry.activate(args.name, args.version, by=_who())
        print(f"{args.name}@{args.version}: active (was {activation.previous or 'none'})")
    return 0


def _who() -> str:
    import getpass

    return getpass.getuser()


def cmd_demo(args: argparse.Namespace) -> int:
    from ie_gateway.demo import run_demo

    logsetup.configure("warning")
    result = run_demo(args.config, args.workdir.resolve(), args.slices, args.timeout, args.model)
    print(f"job {result.state} after {result.seconds:.0f} s" + (f": {result.reason}" if result.reason else ""))
    for path in result.received:
        print(f"  received by the demo TPS: {path}")
    if result.qa_png:
        print(f"  QA picture: {result.qa_png}")
    serve = f"ie-gateway serve --config {result.config}"
    if result.page:
        print(f"  admin page: {result.page} (while `{serve}` runs)")
    else:
        print(f"  admin page: needs the node's HTTP endpoint (an `http` section in {result.config})")
    return 0 if result.state == JobState.DELIVERED else 1


class TextProgress:
    """A one-line text progress bar on a stream (stderr): ``case 1/3 [#####-----] 48% 1.2/2.5 MiB``.

    Redraws only when the whole percentage changes and ends each case's line when it completes.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self._stream = stream or sys.stderr
        self._width = width
        self._last: tuple[str, int] | None = None

    def __call__(self, what: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if self._last == (what, percent):
            return
        self._last = (what, percent)
        filled = self._width * percent // 100
        bar = "#" * filled + "-" * (self._width - filled)
        end = "\n" if done >= total else ""
        self._stream.write(f"\r{what} [{bar}] {percent:3d}% {done / 2**20:.1f}/{total / 2**20:.1f} MiB{end}")
        self._stream.flush()


def cmd_sync(args: argparse.Namespace) -> int:
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.infer.runner import runner_for
    from ie_gateway.store import Store
    from ie_gateway.sync.run import sync_now

    cfg = load_config(args.config)
    logsetup.configure(cfg.log_level)
    progress = TextProgress(sys.stderr) if sys.stderr.isatty() else None
    with runner_for(cfg) as runner:
        report = sync_now(cfg, Store.for_settings(cfg.storage), registry_for(cfg, runner.verify), progress=progress)
    print(report.summary())
    if report.cases.failed:
        print(
            f"ie-gateway sync: {len(report.cases.failed)} case(s) failed; see sync_error in `ie-gateway status`",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_audit(args: argparse.Namespace) -> int:

    from ie_gateway import audit
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    try:
        since = audit.parse_since(args.since, time.time()) if args.since else None
    except ValueError as exc:
        raise GatewayError(str(exc)) from exc
    events = audit.audit_events(Store.for_settings(cfg.storage), registry_for(cfg), since, args.job)
    sys.stdout.write(audit.render(events, args.csv))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from ie_gateway.admin import retry
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    queued = retry(Store.for_settings(cfg.storage), args.retry, _who())
    print(f"job {args.retry}: {queued} deliveries queued; the running node sends them within seconds")
    return 0


def cmd_reroute(args: argparse.Namespace) -> int:
    from ie_gateway.admin import reroute
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    reroute(Store.for_settings(cfg.storage), args.job, _who())
    print(f"job {args.job}: queued for routing; the running node applies the rules in force within seconds")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from ie_gateway.admin import release
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    release(Store.for_settings(cfg.storage), args.job, _who())
    print(f"job {args.job}: released; its results are written, marked NEEDS REVIEW, and sent")
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ie_gateway import agreement, drift
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    index = Store.for_settings(cfg.storage).index
    rows = agreement.summary(agreement.rows(index, model=args.model, structure=args.structure, since=args.since))
    states = {(s.model, s.version, s.structure): s for s in drift.current(index, cfg.agreement, cfg.models_dir)}
    for row in rows:
        state = states.get((row["model"], row["version"], row["structure"]))
        row["drift"] = asdict(state) if state is not None else None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no agreement figures yet: they come with clinicians' approved structure sets")
        return 0
    print(
        (f"{'model':<20} {'structure':<14} {'cases':>5}  " + "  ".join(f"{f:<20}" for f in agreement.FIGURES)).rstrip()
    )
    for row in rows:
        cells = "  ".join(f"{_spread(row[f]):<20}" for f in agreement.FIGURES)
        print(f"{row['model'] + '@' + row['version']:<20} {row['structure']:<14} {row['cases']:>5}  {cells}".rstrip())
    print("each figure: median [first quartile, third quartile]")
    shown = {(r["model"], r["version"], r["structure"]) for r in rows}
    for key, state in states.items():
        if state.alarm and key in shown:
            print(state.message())
    return 0


def _spread(spread: dict[str, Any]) -> str:
    if not spread["n"]:
        return "-"
    return f"{spread['median']:.3g} [{spread['q1']:.3g}, {spread['q3']:.3g}]"


def cmd_status(args: argparse.Namespace) -> int:
    from ie_gateway import drift
    from ie_gateway.status import status_rows
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    store = Store.for_settings(cfg.storage)
    rows = status_rows(store)
    for state in drift.alarms(store.index, cfg.agreement, cfg.models_dir):
        print(state.message(), file=sys.stderr)
    try:
        _load_rules(cfg)
    except ConfigError as exc:
        print(
            f"routing rules refused, the last valid rules stay in force: {exc.errors[0]}"
            + (f" (+{len(exc.errors) - 1} more; see check-config)" if len(exc.errors) > 1 else ""),
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>5}  {'state':<12} {'inst':>5} {'age':>8}  {'model':<24} {'held by':<20} reason")
    for r in rows:
        model = f"{r['model']}@{r['model_version']}" if r["model"] else "-"
        print(
            f"{r['id']:>5}  {r['state']:<12} {r['instances']:>5} {_age(r['age_s']):>8}  {model:<24} "
            f"{r.get('held_by', '-'):<20} {r['reason'] or ''}"
        )
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


COMMANDS = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "audit": cmd_audit,
    "status": cmd_status,
    "explain": cmd_explain,
    "models": cmd_models,
    "send": cmd_send,
    "reroute": cmd_reroute,
    "release": cmd_release,
    "agreement": cmd_agreement,
    "demo": cmd_demo,
    "sync": cmd_sync,
}


if __name__ == "__main__":
    sys.exit(main())
