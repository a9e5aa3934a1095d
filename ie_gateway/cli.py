"""`ie-gateway`: the admin's command line. Each command parses, builds objects, calls one function.

Exit status 0 on success; non-zero with a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ie_gateway import log as logsetup
from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.errors import AuthError, ConfigError, GatewayError
from ie_gateway.infer.modelref import parse_model_ref
from ie_gateway.vocab import JobState, Role

if TYPE_CHECKING:
    from collections.abc import Callable

    from ie_gateway.infer.manifest import Manifest
    from ie_gateway.infer.registry import Registry
    from ie_gateway.route import RuleSet

DEFAULT_CONFIG = Path("/etc/ie-gateway/gateway.yaml")
#: commands that set up logging themselves, at the level they need
CONFIGURES_LOGGING = ("serve", "demo", "sync")
#: where deploy/install.sh keeps the secrets the unit loads with LoadCredential=
DEFAULT_CREDENTIALS = Path("/etc/ie-gateway/credentials")


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after a sub-command's own words (`models list --config X`);
    # SUPPRESS keeps a later parser's default from overwriting a value given earlier.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help=f"gateway.yaml (default {DEFAULT_CONFIG})"
    )
    config.add_argument(
        "--credentials-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"the secrets the service gets as systemd credentials (default {DEFAULT_CREDENTIALS}, "
        "unless $CREDENTIALS_DIRECTORY is set)",
    )
    parser = argparse.ArgumentParser(prog="ie-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ie-gateway {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, help_text: str, parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub
    ) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_text, parents=[config])

    serve = command("serve", "run the node (DICOM listener, worker, scheduler)")
    serve.add_argument(
        "--role",
        choices=[role.value for role in Role],
        default="all",
        help="all: everything on this VM; receiver: DICOM listener and spool; worker: claims jobs "
        "(receivers and workers share a PostgreSQL index and a mounted storage.root)",
    )
    check = command("check-config", "validate gateway.yaml and its routing rules; exit 0 only when the node may start")
    check.add_argument("--echo", action="store_true", help="also ask every destination (C-ECHO; DICOMweb: QIDO-RS)")
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
    imp.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="import a package no trusted key signed (recorded with your user name in the audit)",
    )
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
    keygen = command("keygen", "make a publisher's signing key pair (training side; no config needed)", models_sub)
    keygen.add_argument("--out", type=Path, required=True, help="writes OUT (private, mode 0600) and OUT.pub")
    sign = command("sign", "sign a package as its model.yaml describes it: writes model.sig", models_sub)
    sign.add_argument("package", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the publisher's private key (models keygen)")
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
    agree.add_argument("--since", help="only approvals received since: 7d, 12h, 30m, or an ISO date/time (UTC)")
    agree.add_argument("--json", action="store_true", help="a JSON list, one object per version and structure")
    send = command("send", "replay deliveries")
    send.add_argument(
        "--retry", type=int, metavar="JOB", required=True, help="queue a failed job's dead-lettered results again"
    )
    reroute = command("reroute", "route an unrouted, refused, failed or held job again (after a rules fix)")
    reroute.add_argument("job", type=int)
    release = command("release", "send a result held for review (needs_review), marked NEEDS REVIEW")
    release.add_argument("job", type=int)
    release.add_argument("--comment", default="", help="why: kept in the job's history and the audit")
    reject = command("reject", "refuse a result held for review: nothing is sent, the job ends failed")
    reject.add_argument("job", type=int)
    reject.add_argument("--comment", default="", help="why: kept in the job's history and the audit")
    _operations_commands(command)
    _commission_parser(command)
    _users_parser(command)
    fetch = command("fetch", "have a source (sources:) send a study to this node, which routes it")
    fetch.add_argument("--source", required=True, help="a name under sources: in gateway.yaml")
    which = fetch.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="the StudyInstanceUID")
    which.add_argument(
        "--patient", metavar="ID", help="every study of this PatientID (C-FIND), see --since, --modality"
    )
    fetch.add_argument("--since", help="with --patient: studies from this date on (YYYY-MM-DD)")
    fetch.add_argument("--modality", help="with --patient: studies holding this modality (e.g. CT)")
    return parser


def _operations_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """backup, restore: the node's records (see ie_gateway/ops/backup.py)."""
    backup = command("backup", "copy the index, models state, pseudonym map, keys and config into a new folder")
    backup.add_argument("folder", type=Path)
    restore = command(
        "restore", "put a backup back (same ie-gateway version only): config beside --config, records, key"
    )
    restore.add_argument("folder", type=Path)
    restore.add_argument("--force", action="store_true", help="replace the node's existing files (stop it first)")
    conformance = command("conformance", "the DICOM Conformance Statement (PS3.2) of this node's config")
    conformance.add_argument("--html", action="store_true", help="a self-contained HTML page instead of Markdown")


def _users_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    users = command("users", "named accounts of the admin page: add, remove, list")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = command("add", "create an account (asks for its password, or reads it from stdin)", users_sub)
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    add.add_argument("--replace", action="store_true", help="give an existing account a new password")
    command("remove", "delete an account", users_sub).add_argument("name")
    command("list", "the accounts' names", users_sub)


def cmd_users(args: argparse.Namespace) -> int:
    from ie_gateway.web.accounts import USERS_FILE, Accounts

    cfg = load_config(args.config)
    accounts = Accounts(cfg.storage.root / USERS_FILE)
    if args.action == "list":
        print("\n".join(accounts.names()))
    elif args.action == "remove":
        accounts.remove(args.name)
        print(f"account {args.name} removed")
    else:
        accounts.add(args.name, _new_password(args.password_stdin), replace=args.replace)
        print(f"account {args.name} {'updated' if args.replace else 'created'} in {accounts.path}")
    return 0


def _new_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    import getpass

    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise AuthError("the two passwords differ")
    return password


def _commission_parser(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    com = command("commission", "run a model version over local cases with approved contours; write a report")
    com.add_argument("--model", required=True, help="NAME or NAME@VERSION")
    com.add_argument(
        "--cases", type=Path, required=True, help="one folder per case: its CT series and one approved RT-STRUCT"
    )
    com.add_argument("--out", type=Path, required=True, help="report folder (a rerun continues where it stopped)")


def cmd_commission(args: argparse.Namespace) -> int:
    """Exit 0 when every structure meets its criteria in every case, 1 otherwise."""
    from ie_gateway.commission import commission

    cfg = load_config(args.config)
    logsetup.configure("warning")

    def show(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    outcome = commission(cfg, args.model, args.cases, args.out, show)
    print(f"report: {outcome.html}\nreport: {outcome.pdf}\nfigures: {outcome.figures}")
    not_run = [r.case for r in outcome.results if not r.done]
    if outcome.failed_structures or not_run:
        failed = ", ".join(outcome.failed_structures) or "none"
        print(
            f"ie-gateway commission: structures failing their criteria: {failed}; cases not run: {len(not_run)}",
            file=sys.stderr,
        )
        return 1
    return 0


def package_version() -> str:
    """The installed package's version (pyproject), as `pip show ie-gateway` says it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ie-gateway")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def use_credentials(given: Path | None, environ: MutableMapping[str, str] = os.environ) -> None:
    """Read the same secrets as the service: ``given``, else ``$CREDENTIALS_DIRECTORY`` (set by
    systemd for the unit), else the installed folder when this user can read it."""
    if given is not None:
        environ["CREDENTIALS_DIRECTORY"] = str(given)
    elif "CREDENTIALS_DIRECTORY" not in environ and os.access(DEFAULT_CREDENTIALS, os.R_OK | os.X_OK):
        environ["CREDENTIALS_DIRECTORY"] = str(DEFAULT_CREDENTIALS)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = DEFAULT_CONFIG
    use_credentials(getattr(args, "credentials_dir", None))
    if args.command not in CONFIGURES_LOGGING:
        # JSON on stderr, patient data dropped: stdout stays the command's own (status --json)
        logsetup.configure("warning")
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
    several = cfg.node.listener_processes > 1 and Role(args.role).receives
    logsetup.configure(cfg.log_level, process="main" if several else None)
    from ie_gateway.service import Service

    Service(cfg, role=Role(args.role)).run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.ops import checks, tls

    cfg = load_config(args.config)
    rules = _load_rules(cfg)
    problems = checks.rule_roi_name_problems(cfg, rules, registry_for(cfg))
    tls_problems = tls.config_problems(cfg)
    problems += [f"{cfg.source}: {p}" for p in tls_problems if ": warning: " not in p]
    site_errors, site_warnings = checks.split(checks.site_findings(cfg, rules))
    problems += [f"{cfg.source}: {p}" for p in site_errors]
    if problems:
        raise ConfigError(problems)
    for warning in [*tls_problems, *(f"warning: {w}" for w in site_warnings)]:
        print(f"{cfg.source}: {warning}", file=sys.stderr)
    print(f"{cfg.source}: ok")
    print(f"{cfg.routing_file}: ok ({len(rules.rules)} rules)")
    return _echo_destinations(cfg) if args.echo else 0


def _echo_destinations(cfg: GatewayConfig) -> int:
    """Ask each destination (C-ECHO, QIDO-RS for DICOMweb); exit 1 when any does not answer."""
    from ie_gateway.ops import checks

    results = checks.echo(cfg)
    for result in results:
        print(f"{result.destination}: {'ok' if result.ok else 'FAILED'}: {result.detail}")
    if not results:
        print("no destinations to echo")
    return 0 if all(r.ok for r in results) else 1


def _load_rules(cfg: GatewayConfig) -> RuleSet:
    from ie_gateway.infer.registry import registry_for
    from ie_gateway.route.load import rules_loader

    return rules_loader(cfg, registry_for(cfg))(cfg.routing_file)


def cmd_explain(args: argparse.Namespace) -> int:
    from ie_gateway.route import SeriesFacts
    from ie_gateway.route.explain import folder_facts
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    rules = _load_rules(cfg)
    facts: list[tuple[str, SeriesFacts]] = []
    if args.path.isdigit():
        job = Store.for_settings(cfg.storage).index.job(int(args.path))
        facts.append((f"job {job.id}", SeriesFacts(job.header, job.calling_ae, job.called_ae, job.instances)))
    else:
        facts = folder_facts(Path(args.path), args.calling_ae, cfg.node.ae_title)
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


def cmd_models(args: argparse.Namespace) -> int:
    from ie_gateway.infer.formats import describe_package
    from ie_gateway.infer.manifest import load_manifest

    if args.action in ("keygen", "sign"):
        return _models_publisher(args)
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
        return _models(args, registry_for(cfg, runner.verify), load_manifest)


def _models(args: argparse.Namespace, registry: Registry, load_manifest: Callable[[Path], Manifest]) -> int:
    if args.action == "list":
        for info in registry.list():
            print(
                f"{info.name}@{info.version}  {'active' if info.active else '      '}  "
                f"{'verified' if info.verified else 'NOT VERIFIED: ' + (info.problem or '')}"
            )
    elif args.action == "verify":
        return _verify_models(args, registry, load_manifest)
    elif args.action == "import":
        _import(args, registry)
    elif args.action == "activate":
        activation = registry.activate(args.name, args.version, by=_who())
        print(f"{args.name}@{args.version}: active (was {activation.previous or 'none'})")
    return 0


def _verify_models(args: argparse.Namespace, registry: Registry, load_manifest: Callable[[Path], Manifest]) -> int:
    """Verify each version on its own: one that fails, or whose framework is missing, is reported
    and the others are still verified. Exit 1 only when a version fails (a missing framework is
    this node's choice, not a broken package)."""
    from ie_gateway.infer.formats import missing_framework

    specs = [args.spec] if args.spec else [f"{i.name}@{i.version}" for i in registry.list()]
    failed = 0
    for spec in specs:
        try:
            name, version = parse_model_ref(spec)
            version = version or registry.resolve(name).version
            manifest = load_manifest(registry.models_dir / name / version)
            missing = missing_framework(manifest.format.value)
            if missing is not None:
                print(f"{spec}: not checked: {missing}")
                continue
            registry.verify(name, version)
        except GatewayError as exc:
            failed += 1
            print(f"{spec}: FAILED: {exc}")
            continue
        print(f"{spec}: verified")
    return 1 if failed else 0


def _import(args: argparse.Namespace, registry: Registry) -> None:
    from ie_gateway.infer.registry import import_package

    by = _who() if args.allow_unsigned else None
    model, written = import_package(registry, args.package, name=args.name, version=args.version, allow_unsigned_by=by)
    if written is not None:
        print(f"{written}: written from the package")
    print(
        f"{model.name}@{model.version}: imported (activate with: ie-gateway models activate "
        f"{model.name} {model.version})"
    )


def _models_publisher(args: argparse.Namespace) -> int:
    """``models keygen`` and ``models sign``: the training side, without a node's config."""
    from ie_gateway.infer.signing import generate_key, sign_model

    if args.action == "keygen":
        public = args.out.with_name(args.out.name + ".pub")
        key = generate_key(args.out, public)
        print(f"{args.out}: private key (keep it with the publisher, never on a node)")
        print(f"{public}: public key, id {key[:16]}… (add it to the nodes' trusted_keys)")
    else:
        print(f"{sign_model(args.package, args.key)}: written")
    return 0


def _who() -> str:
    """The person acting, for the audit trail: under sudo the one who ran sudo, not root."""
    import getpass

    return os.environ.get("SUDO_USER") or getpass.getuser()


def cmd_demo(args: argparse.Namespace) -> int:
    from ie_gateway.demo.run import run_demo

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

    from ie_gateway.infer.registry import registry_for
    from ie_gateway.ops import audit
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    since = audit.parse_since(args.since, time.time()) if args.since else None
    events = audit.audit_events(Store.for_settings(cfg.storage), registry_for(cfg), since, args.job)
    sys.stdout.write(audit.render(events, args.csv))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from ie_gateway.ops.admin import retry
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    queued = retry(Store.for_settings(cfg.storage), args.retry, _who())
    print(f"job {args.retry}: {queued} deliveries queued; the running node sends them within seconds")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from ie_gateway.interop.retrieve import fetch_study, find_studies, study_date

    cfg = load_config(args.config)
    since = study_date(args.since) if args.since else None
    studies = [args.study] if args.study else find_studies(cfg, args.source, args.patient, since, args.modality)
    if not studies:
        print(f"{args.source} holds no study that matches")
        return 0
    for study in studies:
        result = fetch_study(cfg, args.source, study)
        failed = f", {result.failed} failed" if result.failed else ""
        print(
            f"{result.completed} instances sent by {args.source}{failed}; the node routes the series once it is complete"
        )
    return 0


def cmd_reroute(args: argparse.Namespace) -> int:
    from ie_gateway.ops.admin import reroute
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    reroute(Store.for_settings(cfg.storage), args.job, _who())
    print(f"job {args.job}: queued for routing; the running node applies the rules in force within seconds")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from ie_gateway.ops.admin import release
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    release(Store.for_settings(cfg.storage), args.job, _who(), args.comment)
    print(f"job {args.job}: released; its results are written, marked NEEDS REVIEW, and sent")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from ie_gateway.ops.admin import reject
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    reject(Store.for_settings(cfg.storage), args.job, _who(), args.comment)
    print(f"job {args.job}: rejected; nothing was sent (`reroute {args.job}` runs it again)")
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ie_gateway.ops import audit
    from ie_gateway.qa import agreement, drift
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    since = audit.parse_since(args.since, time.time()) if args.since else None
    index = Store.for_settings(cfg.storage).index
    rows = agreement.summary(agreement.rows(index, model=args.model, structure=args.structure, since=since))
    states = {
        (s.model, s.version, s.structure): s
        for s in drift.current(index, cfg.agreement, cfg.models_dir, cfg.storage.root / drift.COMMISSIONED_FILE)
    }
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
    from ie_gateway.qa import drift
    from ie_gateway.status import status_rows
    from ie_gateway.store import Store

    cfg = load_config(args.config)
    store = Store.for_settings(cfg.storage)
    rows = status_rows(store, cfg.worker.max_wait_s)
    for state in drift.alarms(store.index, cfg.agreement, cfg.models_dir, cfg.storage.root / drift.COMMISSIONED_FILE):
        print(state.message(), file=sys.stderr)
    _print_model_refusals(cfg)
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
    print(f"{'id':>5}  {'state':<12} {'inst':>5} {'age':>8}  {'priority':<10} {'model':<24} {'held by':<20} reason")
    for r in rows:
        model = f"{r['model']}@{r['model_version']}" if r["model"] else "-"
        priority = r["priority"] + (f" #{r['queue']}" if "queue" in r else "")
        print(
            f"{r['id']:>5}  {r['state']:<12} {r['instances']:>5} {_age(r['age_s']):>8}  {priority:<10} {model:<24} "
            f"{r.get('held_by', '-'):<20} {r['reason'] or ''}"
        )
    return 0


def _print_model_refusals(cfg: GatewayConfig) -> None:
    """Published model versions the pull refused (unsigned, untrusted, changed), on stderr."""
    from ie_gateway.infer.registry import Registry

    registry = Registry(cfg.models_dir, cfg.storage.root / "models-state.json")  # reads state only
    for spec, refusal in sorted(registry.refusals().items()):
        print(f"model {spec} refused by the pull at {refusal['at']}: {refusal['reason']}", file=sys.stderr)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_backup(args: argparse.Namespace) -> int:
    from ie_gateway.ops.backup import KEY, backup

    cfg = load_config(args.config)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    info = backup(cfg, args.folder, package_version(), Path(creds) if creds else None)
    print(f"{args.folder}: backup of ie-gateway {info.version}: {', '.join(info.files)}")
    if info.index != "sqlite":
        print(f"the index is on PostgreSQL: back it up with pg_dump -Fc {cfg.storage.index}")
    if KEY not in info.files:
        print(
            f"no anonymisation key under {creds or '(no credentials folder)'}: back it up yourself "
            "(--credentials-dir; run as root)",
            file=sys.stderr,
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ie_gateway.ops.backup import restore

    creds = getattr(args, "credentials_dir", None) or Path(os.environ.get("CREDENTIALS_DIRECTORY", DEFAULT_CREDENTIALS))
    info = restore(args.folder, args.config, package_version(), creds, force=args.force)
    print(f"{args.folder}: restored {', '.join(info.files)} (ie-gateway {info.version})")
    if info.models:
        print("model packages are not in a backup; install these versions again (models import, or sync):")
        for line in info.models:
            print(f"  {line}")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from ie_gateway.interop.conformance import statement

    sys.stdout.write(statement(load_config(args.config), package_version(), as_html=args.html))
    return 0


COMMANDS = {
    "conformance": cmd_conformance,
    "backup": cmd_backup,
    "restore": cmd_restore,
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
    "commission": cmd_commission,
    "users": cmd_users,
    "reject": cmd_reject,
    "fetch": cmd_fetch,
}


if __name__ == "__main__":
    sys.exit(main())
