"""The upload page in a real browser: Debian's headless Chromium via its chromedriver."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import make_image
from tests.integration.conftest import processes, reference

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")

HOSTILE = '<img src=x onerror="document.title=\'pwned\'">.png'


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_window_size(1200, 1400)
    try:
        yield driver
    finally:
        driver.quit()


def test_many_images_from_the_page(stack, browser, reference_model, tmp_path):
    from selenium.webdriver.common.by import By

    files = {f"page_{i}.jpg": make_image(500 + i) for i in range(5)}
    files[HOSTILE] = make_image(505, fmt="PNG")
    files["not-an-image.jpg"] = b"plain text pretending to be a JPEG"
    paths = []
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(str(path))

    browser.get(stack.web_url + "/")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        items = browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")
        states = [i.get_attribute("data-state") for i in items]
        if len(items) == len(files) and all(s in ("done", "failed") for s in states):
            break
        time.sleep(0.2)
    else:
        browser.save_screenshot(str(stack.run_dir / "page-timeout.png"))
        raise AssertionError(f"page did not finish: {states}")

    shown = {i.get_attribute("data-filename"): i for i in items}
    assert set(shown) == set(files)
    for name, data in files.items():
        item = shown[name]
        if name == "not-an-image.jpg":
            assert item.get_attribute("data-state") == "failed"
            assert "image" in item.text.lower()
            continue
        assert item.get_attribute("data-state") == "done", (name, item.text)
        assert item.get_attribute("data-label") == reference(reference_model, data).label
    # The hostile name is shown as text, never parsed as HTML.
    assert HOSTILE in shown[HOSTILE].text
    assert browser.find_elements(By.CSS_SELECTOR, "#results img") == []
    assert browser.title != "pwned"
    # Untrained weights are announced, not hidden.
    banner = browser.find_element(By.ID, "untrained-banner")
    assert banner.is_displayed() and "UNTRAINED" in banner.text
    # No API key is configured, so the page does not ask for one.
    assert not browser.find_element(By.ID, "api-key-box").is_displayed()
    browser.save_screenshot(str(stack.run_dir / "page.png"))


def test_a_waiting_page_reconnects_after_the_web_tier_restarts(stack, browser, reference_model, tmp_path):
    import psutil
    from selenium.webdriver.common.by import By

    files = {f"reconnect_{i}.jpg": make_image(700 + i) for i in range(6)}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    browser.get(stack.web_url + "/")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))

    def results():
        return browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")

    def states():
        return [i.get_attribute("data-state") for i in results()]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (len(states()) == 6 and "uploading" not in states()):
        time.sleep(0.05)
    assert len(states()) == 6 and "uploading" not in states(), states()
    # Kill the web tier's worker process (its master starts a new one) while the page waits.
    master = next(p for p in processes(stack, "gunicorn") if p.children())
    master.children()[0].kill()

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(s in ("done", "failed") for s in states()):
        time.sleep(0.2)
    items = {i.get_attribute("data-filename"): i for i in results()}
    for name, data in files.items():
        assert items[name].get_attribute("data-state") == "done", items[name].text
        assert items[name].get_attribute("data-label") == reference(reference_model, data).label
    assert psutil.pid_exists(master.pid)
