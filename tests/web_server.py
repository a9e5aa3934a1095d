"""The admin page served as the node serves it, for tests: a Starlette app with ``web_routes``
under uvicorn on 127.0.0.1 in a thread, and Debian's chromium driven by selenium."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from starlette.applications import Starlette

from ie_gateway.config import load_config
from ie_gateway.infer.registry import registry_for
from ie_gateway.store import Store
from ie_gateway.web import web_routes
from tests.peers import free_port, port_open, wait_until


@contextmanager
def admin_page(config: Path, token: str | None) -> Iterator[str]:
    """Serve the admin page of the node configured by ``config``; yields its base URL."""
    cfg = load_config(config)
    app = Starlette(routes=web_routes(cfg, Store(cfg.storage.root), registry_for(cfg), token=token))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="admin-page", daemon=True)
    thread.start()
    try:
        wait_until(lambda: port_open(port), 30, what="the admin page to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def chromium(width: int = 1366, height: int = 900) -> Iterator[webdriver.Chrome]:
    """Headless Debian chromium at a hospital workstation's width."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()
