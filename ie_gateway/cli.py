"""`ie-gateway`: the admin's command line. Each command parses, builds objects, calls one function.

Exit status 0 on success; non-zero with a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ie_gateway import log as logsetup
from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.errors import ConfigError, GatewayError
from ie_gateway.log import uid_hash

DEFAULT_CONFIG = Path("/etc/ie-gateway/gateway.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ie-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="gateway.yaml")
        return p

    command("serve", "run the node (DICOM listener, worker, scheduler)")
    command("check-config", "validate gateway.yaml and its routing rules")
    status = command("status", "series jobs, their states and reasons")
    status.add_argument("--json", action="store_true", help="a JSON list, one object per series job")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    from ie_gateway.service import Service

    Service(cfg).run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"{cfg.source}: ok")
    return 0


def status_rows(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """One object per series job, without patient data (the series UID only hashed)."""
    from ie_gateway.store import Store

    store = Store(cfg.storage.root)
    now = time.time()
    rows = []
    for job in store.index.jobs():
        rows.append({
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
            **{k: v for k, v in job.detail.items() if k in STATUS_DETAIL_KEYS},
        })
    return rows


STATUS_DETAIL_KEYS = ("late_instances", "missing_instances", "outputs", "deliveries", "qa_png", "volumes_cc")


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    rows = status_rows(cfg)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>5}  {'state':<10} {'inst':>5} {'age':>8}  {'model':<24} reason")
    for r in rows:
        model = f"{r['model']}@{r['model_version']}" if r["model"] else "-"
        print(f"{r['id']:>5}  {r['state']:<10} {r['instances']:>5} {_age(r['age_s']):>8}  {model:<24} {r['reason'] or ''}")
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
    "status": cmd_status,
}


if __name__ == "__main__":
    sys.exit(main())
