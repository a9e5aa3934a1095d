"""Review by looking, in a real browser: a named reviewer (``ie-gateway users add``) must sign in
even to look; a result the plausibility gate held has its QA picture and a slice viewer on its
job page; the viewer scrolls by key and wheel and toggles a structure; the reviewer releases it
with a comment, and the job's history and `ie-gateway audit` name them. Screenshots are left
beside the test's files."""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ie_gateway.web.auth import COOKIE
from tests.peers import storescu, wait_until
from tests.test_delivery import StoreSCP, destination, make_node, misplaced_heart_model, rt_only_tps
from tests.web_server import admin_page, chromium, page_text, signed_in

pytestmark = [pytest.mark.peer, pytest.mark.slow]

TOKEN = "viewer-test-token-1b7e"
PASSWORD = "reviewer's long passphrase"
COMMENT = "heart outside the body is the model's known air artefact; External checked"
COMMENTED = f"released by alice: {COMMENT}"
__all__ = ["rt_only_tps"]  # the fixture, shared with test_delivery


def shown(browser: Any) -> tuple[str, np.ndarray]:
    """The viewer image's URL and pixels, once the browser has loaded it."""
    from selenium.webdriver.common.by import By

    img = browser.find_element(By.ID, "slice")
    wait_until(
        lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img),
        60,
        what="the slice image",
    )
    src = str(img.get_attribute("src"))
    cookie = browser.get_cookie(COOKIE)["value"]  # the page needs the reviewer's session
    request = urllib.request.Request(src, headers={"Cookie": f"{COOKIE}={cookie}"})
    with urllib.request.urlopen(request, timeout=10) as rsp:  # the same PNG the browser shows
        return src, np.asarray(Image.open(io.BytesIO(rsp.read())).convert("RGB"))


def test_a_held_result_is_reviewed_by_looking_and_released_with_a_comment(
    node_factory: Any, rt_only_tps: StoreSCP, small_series: list[Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    node = make_node(
        node_factory,
        misplaced_heart_model(tmp_path / "models"),
        {"TPS": destination(rt_only_tps.port, accepts=["rtstruct"])},
        {"model": "toy-heart", "outputs": ["rtstruct"], "send_to": ["TPS"]},
    ).start()
    assert storescu(node.port, small_series).returncode == 0
    [job] = node.wait_state({"needs_review", "delivered", "failed"}, timeout=180)
    assert job["state"] == "needs_review", job
    add_user = subprocess.run(
        [
            sys.executable,
            "-m",
            "ie_gateway.cli",
            "users",
            "add",
            "alice",
            "--password-stdin",
            "--config",
            str(node.config),
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert add_user.returncode == 0, add_user.stderr
    with admin_page(node.config, TOKEN) as base, chromium() as browser:
        # with named accounts, even the read-only pages need a sign-in
        browser.get(f"{base}/jobs/{job['id']}")
        wait_until(lambda: "/login" in browser.current_url, 60, what="the sign-in page")
        browser.find_element(By.NAME, "name").send_keys("alice")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        signed_in(browser)
        assert browser.current_url.endswith(f"/jobs/{job['id']}")
        assert browser.find_element(By.CSS_SELECTOR, "header .user").text == "alice"
        qa = browser.find_element(By.ID, "qa")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", qa) > 100
        label = browser.find_element(By.ID, "slice-label")
        first_src, first = shown(browser)
        assert label.text == "axial 16 / 30" and first_src.endswith("/slice/axial/15.png?window=soft&hide=&approved=0")
        browser.save_screenshot(str(tmp_path / "viewer-axial-16.png"))

        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_UP)
        wait_until(lambda: label.text == "axial 17 / 30", 30, what="the next slice")
        browser.execute_script(
            "arguments[0].dispatchEvent(new WheelEvent('wheel', {deltaY: -100, bubbles: true, cancelable: true}))",
            browser.find_element(By.ID, "slice"),
        )
        wait_until(lambda: label.text == "axial 18 / 30", 30, what="the wheel's slice")
        src, pixels = shown(browser)
        assert "/axial/17.png" in src and not np.array_equal(pixels, first)

        heart_red = tuple(int(c) for c in bytes.fromhex(heart_colour(browser).lstrip("#")))
        assert (pixels == heart_red).all(axis=2).any()  # the Heart's outline is drawn
        browser.find_element(By.CSS_SELECTOR, "input.structure[value=Heart]").click()
        wait_until(
            lambda: "hide=Heart" in str(browser.find_element(By.ID, "slice").get_attribute("src")),
            60,
            what="the Heart hidden",
        )
        _, hidden = shown(browser)
        assert not (hidden == heart_red).all(axis=2).any()
        browser.save_screenshot(str(tmp_path / "viewer-heart-hidden.png"))

        browser.find_element(By.CSS_SELECTOR, "button.plane[data-plane=coronal]").click()
        wait_until(lambda: label.text.startswith("coronal "), 60, what="the coronal plane")

        browser.find_element(By.CSS_SELECTOR, "form.review input[name=comment]").send_keys(
            "heart outside the body is the model's known air artefact; External checked"
        )
        browser.find_element(By.CSS_SELECTOR, "form.review button[value=release]").click()
        wait_until(lambda: "release done" in page_text(browser, "main"), 60, what="the release")
    [job] = node.wait_state({"delivered", "failed"}, timeout=60)
    released = [t for t in node_transitions(node, job["id"]) if t["to_state"] == "inferred" and t["who"]]
    assert released[0]["reason"].endswith(
        ": heart outside the body is the model's known air artefact; External checked"
    )


def heart_colour(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    swatch = browser.find_element(By.XPATH, "//input[@value='Heart']/following-sibling::span")
    rgb = browser.execute_script("return getComputedStyle(arguments[0]).color", swatch)
    r, g, b = (int(v) for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def node_transitions(node: Any, job_id: int) -> list[dict[str, Any]]:
    from ie_gateway.store import Store

    return [
        {"to_state": t.to_state, "reason": t.reason or "", "who": t.who}
        for t in Store(node.root).index.transitions(job_id)
    ]
