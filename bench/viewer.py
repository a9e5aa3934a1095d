"""Benchmark: the slice viewer's time to show a slice after a key press, measured in the browser
(Debian chromium, headless, 1366 px wide), on a held job with a 512² CT (goal <= 150 ms).

Usage: .venv/bin/python bench/viewer.py [--slices 100] [--size 512] [--presses 30]

A job is made by hand in a temporary node folder (index rows as the worker leaves a held result,
ct.mha and labels-0.mha from a phantom), the admin page is served by uvicorn as the node serves
it, and chromium presses the up arrow; the page's own script times from the keydown event to the
image's load event. The peer in the same run is the server alone: the same slices drawn by
``Volumes.render`` in this process, without HTTP, PNG decoding or painting.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import SimpleITK as sitk
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from starlette.applications import Starlette

from ie_gateway.config import load_config
from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.infer.registry import registry_for
from ie_gateway.store import JobState, OutputKind, Store
from ie_gateway.store.records import JobRoute
from ie_gateway.web import web_routes
from ie_gateway.web.viewer import SliceViewer

REPO = Path(__file__).resolve().parent.parent
GOAL_MS = 150.0
TIMER = """
window.shown = [];
const img = document.getElementById('slice');
document.addEventListener('keydown', () => { window.pressed = performance.now(); }, true);
img.addEventListener('load', () => { if (window.pressed) window.shown.push(performance.now() - window.pressed); });
"""


def held_job(root: Path, slices: int, size: int) -> int:
    """A job held for review, with its CT and label map where the worker leaves them."""
    store = Store(root)
    job_id, _ = store.index.add_instance(
        sop_uid="1.2.3.4.1",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        path="x.dcm",
        size=1,
        calling_ae="PACS",
        called_ae="IE_GATEWAY",
        header=lambda: {"Modality": "CT"},
    )
    route = JobRoute("thorax", "demo-thorax", "3", (OutputKind.RTSTRUCT,), ("TPS",))
    for state in (JobState.COMPLETE, JobState.ROUTED, JobState.INFERRING, JobState.INFERRED):
        store.index.transition(job_id, state, routes=[route] if state is JobState.ROUTED else None)
    store.index.transition(job_id, JobState.NEEDS_REVIEW, reason="needs review: bench")
    phantom = make_phantom(7, slices=slices, size=size, pixel_mm=500.0 / size, slice_mm=2.5)
    folder = store.job_dir(job_id)
    for name, array in (("ct.mha", phantom.hu), ("labels-0.mha", phantom.labels)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm))
        sitk.WriteImage(image, str(folder / name))
    return job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--presses", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        root = Path(tmp)
        (root / "routing.yaml").write_text("rules: []\n")
        (root / "gateway.yaml").write_text(
            f"storage: {{root: var}}\nrouting_file: routing.yaml\nmodels_dir: {REPO / 'models'}\n"
            # the demo package's publisher, as the example config trusts it
            f"trusted_keys: [{{name: demo, public_key: {REPO / 'keys' / 'demo-only-publisher.pub'}}}]\n"
        )
        job_id = held_job(root / "var", args.slices, args.size)
        cfg = load_config(root / "gateway.yaml")
        app = Starlette(routes=web_routes(cfg, Store(cfg.storage.root), registry_for(cfg), token="bench"))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))  # a free port
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        while not server.started and serving.is_alive():
            time.sleep(0.05)  # uvicorn's own start flag: the bench waits for its server
        if not server.started:
            raise SystemExit("the admin page's server did not start (see its log above)")
        port = server.servers[0].sockets[0].getsockname()[1]
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,900"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
        try:
            started = time.monotonic()
            driver.get(f"http://127.0.0.1:{port}/jobs/{job_id}")
            page_s = time.monotonic() - started
            driver.execute_script(TIMER)
            body = driver.find_element(By.TAG_NAME, "body")
            for n in range(1, args.presses + 1):
                body.send_keys(Keys.ARROW_UP)
                deadline = time.monotonic() + 10
                while driver.execute_script("return window.shown.length") < n and time.monotonic() < deadline:
                    time.sleep(0.005)
            shown = [float(v) for v in driver.execute_script("return window.shown")]
        finally:
            driver.quit()
            server.should_exit = True
        viewer = SliceViewer(cfg, Store(cfg.storage.root), registry_for(cfg))
        vols = viewer.volumes(Store(cfg.storage.root).index.job(job_id))
        server_ms = []
        for k in range(args.presses):
            t0 = time.perf_counter()
            vols.render("axial", (args.slices // 2 + k) % args.slices, "soft", set(), True)
            server_ms.append(1000 * (time.perf_counter() - t0))
    browser = statistics.median(shown)
    server_side = statistics.median(server_ms)
    print(f"{args.slices} x {args.size}^2 CT; job page with its viewer loaded in {page_s:.2f} s (volumes read once)")
    print(
        f"key press to slice shown, in chromium: median {browser:.0f} ms, max {max(shown):.0f} ms "
        f"over {len(shown)} presses; goal {GOAL_MS:.0f} ms: {'met' if browser <= GOAL_MS else 'not met'}"
    )
    print(f"server's drawing alone: median {server_side:.0f} ms; browser / server {browser / server_side:.2f}")


if __name__ == "__main__":
    main()
