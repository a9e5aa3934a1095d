"""The running node as an admin meets it: rule hot reload, explain, the model commands, and the
worker's behaviour when inference is interrupted or runs too long."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from tests.infer_packages import Spin, threshold_model, write_package
from tests.peers import Node, storescu, wait_until

pytestmark = pytest.mark.peer


def series(folder: Path, seed: int, description: str, counted: bool = False) -> list[Path]:
    """A 24-slice CT. ``counted``: its header says how many images the acquisition has, so a node
    with a long quiet period completes it at its last instance; on a loaded machine a pause in
    storescu's sending can outlast the tests' 1 s quiet period and split a series into jobs."""
    slices = 24
    phantom = make_phantom(seed, slices=slices, size=128, pixel_mm=3.9, slice_mm=5.0)
    extra: dict[str, object] = {"SeriesDescription": description}
    if counted:
        extra["ImagesInAcquisition"] = slices
    return write_ct_series(phantom, folder, seed=seed, extra=extra)


def models(root: Path, spin_iterations: int = 0) -> Path:
    write_package(root, [threshold_model(2, level=0.25)], name="toy-body", version="1", structures=1,
                  patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0))
    if spin_iterations:
        # slow per window, quick on the registry's small probe patch
        write_package(root, [Spin(2, iterations=spin_iterations)], name="slow-body", version="1", structures=1,
                      patch=(16, 32, 32), spacing=(2.0, 2.0, 2.5), batch_size=1)
    return root


def rule(name: str, description: str, model: str) -> dict[str, Any]:
    return {"name": name, "match": {"Modality": "CT", "SeriesDescription": {"regex": description}},
            "model": model, "outputs": ["rtstruct"], "send_to": ["TPS"]}


def node_with(node_factory: Any, tmp_path: Path, rules: list[dict[str, Any]], **settings: Any) -> Node:
    return node_factory(settings={
        "models_dir": str(models(tmp_path / "models", settings.pop("spin", 0))),
        # nobody listens on the TPS port: results wait in the outbox, which is all these tests need
        "destinations": {"TPS": {"ae_title": "TPS", "host": "127.0.0.1", "port": 9}},
        **settings}, rules={"rules": rules})


def transitions(index: Path, job_id: int) -> list[tuple[str, str]]:
    with sqlite3.connect(index, timeout=5) as db:
        return list(db.execute("SELECT from_state, to_state FROM transitions WHERE job_id = ? ORDER BY rowid",
                               (job_id,)))


def test_sighup_reloads_the_rules_and_sigterm_stops_the_node_cleanly(node_factory: Any, tmp_path: Path) -> None:
    node = node_with(node_factory, tmp_path, [rule("thorax", "Thorax", "toy-body")]).start()
    proc = node.proc
    assert proc is not None

    def loads() -> int:
        return sum(e["event"] == "routing rules loaded" for e in node.log_events())

    assert loads() == 1  # at start; the file is unchanged, so only the signal loads it again
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: loads() == 2, 60, what="the rules to reload on SIGHUP")
    assert proc.poll() is None
    node.stop()
    assert proc.returncode == 0
    events = node.log_events()
    assert [e.get("signal") for e in events if e["event"] == "stopping"] == ["SIGTERM"]
    assert events[-1]["event"] == "stopped"


@pytest.mark.slow
def test_changed_rules_apply_to_later_series_and_invalid_rules_are_refused(
        node_factory: Any, tmp_path: Path) -> None:
    node = node_with(node_factory, tmp_path, [rule("nothing", "^no such series$", "toy-body")]).start()
    assert storescu(node.port, series(tmp_path / "a", 1, "Thorax A")).returncode == 0
    [first] = node.wait_state({"unrouted"})
    assert "no rule matched" in first["reason"]

    routing = node.workdir / "routing.yaml"
    routing.write_text(yaml.safe_dump({"rules": [rule("thorax", "Thorax", "toy-body")]}))
    # the first "routing rules loaded" is the start-up load; wait for the second
    wait_until(lambda: sum(e["event"] == "routing rules loaded" for e in node.log_events()) >= 2, 30,
               what="the new rules to load")
    assert storescu(node.port, series(tmp_path / "b", 2, "Thorax B")).returncode == 0
    node.wait_state({"sending"})

    routing.write_text("rules:\n  - name: broken\n    match: {Modality: CT}\n    model: no-such-model\n"
                       "    outputs: [rtstruct]\n    send_to: [TPS]\n")
    wait_until(lambda: any(e["event"].startswith("routing rules refused") for e in node.log_events()), 30,
               what="the refusal in the log")
    status = node.cli("status")
    assert "routing rules refused" in status.stderr and "routing.yaml:4" in status.stderr
    assert storescu(node.port, series(tmp_path / "c", 3, "Thorax C")).returncode == 0
    rows = node.wait_state({"sending"}, count=2)
    assert {r["model"] for r in rows} == {"toy-body"}  # the valid rules stayed in force


def test_explain_shows_every_rule_with_the_values_seen(node_factory: Any, tmp_path: Path) -> None:
    node = node_with(node_factory, tmp_path, [rule("pelvis", "Pelvis", "toy-body"),
                                              rule("thorax", "Thorax", "toy-body")])
    folder = tmp_path / "ct"
    series(folder, 4, "Thorax planning")
    matched = node.cli("explain", str(folder), check=False)
    assert matched.returncode == 0, matched.stderr
    assert "'pelvis': no match" in matched.stdout
    assert "'thorax': MATCH" in matched.stdout
    assert "Thorax planning" in matched.stdout  # the admin sees the value each matcher saw
    (node.workdir / "routing.yaml").write_text(yaml.safe_dump({"rules": [rule("pelvis", "Pelvis", "toy-body")]}))
    unmatched = node.cli("explain", str(folder), check=False)
    assert unmatched.returncode == 1
    assert "unrouted" in unmatched.stdout


def test_the_model_of_a_series_still_arriving_is_loaded_before_the_series_completes(
        node_factory: Any, tmp_path: Path) -> None:
    """The inference child's start, torch's import and the model's probe happen while the series
    arrives, not on the path after its quiet period (a series no rule routes asks for none)."""
    node = node_with(node_factory, tmp_path, [rule("thorax", "Thorax", "toy-body")],
                     series={"stable_after_s": 600}).start()  # the series stay `receiving` throughout
    assert storescu(node.port, series(tmp_path / "other", 5, "Pelvis")).returncode == 0
    assert storescu(node.port, series(tmp_path / "thorax", 6, "Thorax")).returncode == 0
    verified = wait_until(lambda: [e for e in node.log_events() if e["event"] == "model_verified"], 120,
                          what="the routed model to be verified")
    assert [e["model"] for e in verified] == ["toy-body@1"]
    assert sorted(r["state"] for r in node.jobs()) == ["receiving", "receiving"]
    assert sum(e["event"] == "inference_child_started" for e in node.log_events()) == 1


@pytest.mark.slow
def test_model_commands_import_activate_and_list(node_factory: Any, tmp_path: Path) -> None:
    node = node_with(node_factory, tmp_path, [rule("thorax", "Thorax", "toy-body")])
    package = write_package(tmp_path / "incoming", [threshold_model(2, level=0.3)], name="toy-body",
                            version="2", structures=1, patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0))
    assert "toy-body@2: imported" in node.cli("models", "import", str(package)).stdout
    assert "toy-body@2: verified" in node.cli("models", "verify", "toy-body@2").stdout
    assert "active (was none)" in node.cli("models", "activate", "toy-body", "2").stdout
    listing = node.cli("models", "list").stdout
    assert "toy-body@2  active" in listing and "toy-body@1" in listing
    changed = write_package(tmp_path / "changed", [threshold_model(2, level=0.9)], name="toy-body",
                            version="2", structures=1, patch=(16, 32, 32), spacing=(4.0, 4.0, 5.0))
    refused = node.cli("models", "import", str(changed), check=False)
    assert refused.returncode != 0 and "toy-body" in refused.stderr


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid``, from every one of its threads (a thread that ends while
    they are read had none left to list)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return children


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_kill_9_mid_inference_reruns_only_the_interrupted_job(node_factory: Any, tmp_path: Path) -> None:
    node = node_with(node_factory, tmp_path, [rule("fast", "Fast", "toy-body"), rule("slow", "Slow", "slow-body")],
                     spin=1000).start()
    assert node.proc is not None and not child_pids(node.proc.pid)  # no inference child before there is work
    assert storescu(node.port, series(tmp_path / "fast", 5, "Fast")).returncode == 0
    [done] = node.wait_state({"sending"})
    assert storescu(node.port, series(tmp_path / "slow", 6, "Slow")).returncode == 0
    [busy] = node.wait_state({"inferring"})
    index = node.root / "index.sqlite3"
    done_before = transitions(index, done["id"])
    assert node.proc is not None
    children = child_pids(node.proc.pid)  # the inference child (and multiprocessing's tracker)
    assert children
    node.kill9()
    wait_until(lambda: not any(running(pid) for pid in children), 30, every=0.2,
               what="the killed node's inference child to stop computing")
    node.start()
    rows = {r["id"]: r for r in node.wait_state({"sending"}, count=2, timeout=300)}
    assert rows[busy["id"]]["model"] == "slow-body"
    assert transitions(index, done["id"]) == done_before
    moves = transitions(index, busy["id"])
    # a crash repeats at most one stage: the volume stored before inference is not prepared again
    assert moves.count(("prepared", "inferring")) == 2 and ("inferring", "prepared") in moves
    assert moves.count(("routed", "prepared")) == 1


@pytest.mark.slow
def test_inference_past_its_time_limit_fails_the_job_and_the_worker_goes_on(
        node_factory: Any, tmp_path: Path) -> None:
    node = node_with(node_factory, tmp_path, [rule("fast", "Fast", "toy-body"), rule("slow", "Slow", "slow-body")],
                     spin=400000, inference={"timeout_s": 8}).start()
    assert storescu(node.port, series(tmp_path / "slow", 7, "Slow")).returncode == 0
    assert storescu(node.port, series(tmp_path / "fast", 8, "Fast")).returncode == 0
    [failed] = node.wait_state({"failed"}, timeout=120)
    assert "inference exceeded 8 s" in failed["reason"]
    [ok] = node.wait_state({"sending"}, timeout=120)
    assert ok["model"] == "toy-body"
