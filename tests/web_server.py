"""The admin page served as the node serves it, for tests: a Starlette app with ``web_routes``
under uvicorn on 127.0.0.1 in a thread, and Debian's chromium driven by selenium."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
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


def loaded(browser: Any) -> bool:
    """Whether the browser's current page has finished loading (a click does not wait for it)."""
    return bool(browser.execute_script("return document.readyState") == "complete")


def page_text(browser: Any, tag: str) -> str:
    """The text of the loaded page's first ``tag`` element, or "" while a click's page replaces it
    (an element found on the old page goes stale as it is read)."""
    try:
        return str(browser.find_element(By.TAG_NAME, tag).text) if loaded(browser) else ""
    except StaleElementReferenceException:
        return ""


def signed_in(browser: Any) -> None:
    """Wait for the page after signing in to say so."""
    wait_until(lambda: "Sign out" in page_text(browser, "header"), 60, what="the signed-in page")
