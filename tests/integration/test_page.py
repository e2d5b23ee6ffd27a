"""The upload page in a real browser: Debian's headless Chromium via its chromedriver."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.conftest import make_image
from tests.integration.conftest import (
    SCORE_TOLERANCE,
    assert_row_shows,
    processes,
    reference,
    references,
    wait_for,
    workers_held,
)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.needs_tools("chromium", "chromedriver",
                                     why="Debian's chromium and chromium-driver drive the page")

HOSTILE = '<img src=x onerror="document.title=\'pwned\'">.png'

# WCAG's relative luminance of a CSS colour, in JavaScript, for the contrast tests.
LUMINANCE = """
  const luminance = (colour) => {
    const [r, g, b] = colour.match(/[\\d.]+/g).slice(0, 3).map((v) => {
      const c = Number(v) / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
"""


@contextlib.contextmanager
def chromium(profile: str, javascript: bool = True) -> Iterator:
    """Headless Chromium driven by selenium, its profile in the folder `profile`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for errors
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_window_size(1200, 1400)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(tmp_path):
    with chromium(str(tmp_path / "profile")) as driver:
        yield driver


def finished_rows(browser, stack, count: int, timeout_s: float) -> dict:
    """The page's result rows by file name, once there are `count` and each is done or
    failed; a screenshot and an AssertionError if that takes longer than `timeout_s`."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items = browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")
        states = [i.get_attribute("data-state") for i in items]
        if len(items) == count and all(s in ("done", "failed") for s in states):
            return {i.get_attribute("data-filename"): i for i in items}
        time.sleep(0.2)
    browser.save_screenshot(str(stack.run_dir / "page-timeout.png"))
    raise AssertionError(f"page did not finish: {states}")


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

    shown = finished_rows(browser, stack, len(files), timeout_s=180)
    assert set(shown) == set(files)
    refs = references(reference_model, {n: d for n, d in files.items() if n != "not-an-image.jpg"},
                      top1_only=True)
    for name in files:
        item = shown[name]
        if name == "not-an-image.jpg":
            assert item.get_attribute("data-state") == "failed"
            assert "image" in item.text.lower()
            continue
        assert item.get_attribute("data-state") == "done", (name, item.text)
        assert_row_shows(item, refs[name], name)
        # The top 5, folded: open, 500 rows make a page of 76,000 px.
        guesses = item.find_element(By.CSS_SELECTOR, "details.guesses")
        assert guesses.is_displayed() and guesses.get_attribute("open") is None
        assert len(item.find_elements(By.CSS_SELECTOR, ".top5 li")) == 5
    assert not shown["not-an-image.jpg"].find_element(By.CSS_SELECTOR, "details.guesses").is_displayed()
    # The hostile name is shown as text, never parsed as HTML.
    assert HOSTILE in shown[HOSTILE].text
    assert browser.find_elements(By.CSS_SELECTOR, "#results img") == []
    assert browser.title != "pwned"
    # Untrained weights are announced, not hidden.
    banner = browser.find_element(By.ID, "untrained-banner")
    assert banner.is_displayed() and "UNTRAINED" in banner.text
    # No API key is configured, so the page does not ask for one.
    assert not browser.find_element(By.ID, "api-key-box").is_displayed()
    # Nothing went wrong in the page's console (a script error, a missing resource).
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    browser.save_screenshot(str(stack.run_dir / "page.png"))


def test_without_javascript_one_image_is_classified_by_the_plain_form(stack, reference_model, tmp_path):
    """With JavaScript off the page would show "Connecting…" for ever, its controls doing
    nothing: they are hidden, and a plain form answers with a page."""
    from selenium.webdriver.common.by import By

    data = make_image(530)
    path = tmp_path / "plain.jpg"
    path.write_bytes(data)
    with chromium(str(tmp_path / "profile"), javascript=False) as page:
        page.get(stack.web_url + "/")
        assert not page.find_element(By.ID, "drop-zone").is_displayed()
        assert not page.find_element(By.ID, "status-line").is_displayed()
        page.find_element(By.ID, "plain-file").send_keys(str(path))
        page.find_element(By.CSS_SELECTOR, ".plain-form button[type=submit]").click()
        label = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, ".plain-answer .label"), 120,
                         "the answer page")[0]
        assert label.text == reference(reference_model, data).label
        assert page.find_element(By.CSS_SELECTOR, ".plain-answer .name").text == "plain.jpg"
        assert "UNTRAINED" in page.find_element(By.CLASS_NAME, "banner").text
        # A page of its own, which a reload asks for again, sending nothing.
        assert "/answers/" in page.current_url
        shown = label.text
        page.refresh()
        assert page.find_element(By.CSS_SELECTOR, ".plain-answer .label").text == shown


# The page sends its uploads by XMLHttpRequest (for its upload progress); the tests
# below fake their failures (or watch them) in window.fetch. This makes the page's
# XMLHttpRequest send by window.fetch as it is at each send (wrappers added later
# apply), its body taken as sent at once: then only its answer is waited for (within
# data-answer-timeout-ms), and abort() ends it at once, as a real one's does.
UPLOADS_BY_FETCH = """
if (!window.uploadsByFetch) {
  window.uploadsByFetch = true;
  window.XMLHttpRequest = class {
    constructor() {
      this.upload = {};
      this.headers = {};
      this.status = 0;
      this.responseText = "";
      this.ended = false;
      this.abortion = new AbortController();
    }
    open(method, url) { this.method = method; this.url = url; }
    setRequestHeader(name, value) { this.headers[name] = value; }
    fire(target, type) { if (target["on" + type]) target["on" + type](new ProgressEvent(type)); }
    end(type) {
      if (this.ended) return;
      this.ended = true;
      this.fire(this, type);
    }
    abort() {
      this.abortion.abort();
      this.end("abort");
    }
    async send(body) {
      setTimeout(() => {
        if (this.ended) return;
        this.fire(this.upload, "progress");
        this.fire(this.upload, "load");
      });
      try {
        const response = await window.fetch(this.url, {method: this.method, body, headers: this.headers,
                                                       signal: this.abortion.signal});
        const text = await response.text();
        if (this.ended) return;
        this.status = response.status;
        this.responseText = text;
        this.end("load");
      } catch {
        this.end("error");
      }
    }
  };
}
"""


# The page's first POST /api/jobs fail, one way each, as listed in arguments[0]:
# "503" is answered as a stopping web tier answers one (nothing stored, each file
# rejected with 503); "unreachable" is not answered at all, as while the next web
# tier starts (a refused connection); "lost" reaches the server, which stores the
# files, but its answer does not reach the page (a connection cut mid-answer);
# "hang" too, but the answer never comes and the request never fails; "cut-body" too,
# but the answer's headers come and its body is cut off; "504" too, but a proxy's 504
# page comes in place of the answer (its timeout passed while the web tier stored them).
# Later ones reach the server.
FAIL_FIRST_POSTS = UPLOADS_BY_FETCH + """
const ways = arguments[0];
const realFetch = window.fetch;
window.fakedPosts = 0;
window.fetch = async (url, options) => {
  if (url === "/api/jobs" && window.fakedPosts < ways.length) {
    const way = ways[window.fakedPosts];
    window.fakedPosts += 1;
    if (way === "pass") return realFetch(url, options);
    if (way === "unreachable") throw new TypeError("Failed to fetch");
    if (way === "lost") {
      await realFetch(url, options);
      throw new TypeError("Failed to fetch");
    }
    if (way === "cut-body") {  // stored, answered 202, the answer's body cut off
      const real = await realFetch(url, options);
      return new Response(new ReadableStream({start(c) { c.error(new TypeError("network error")); }}),
                          {status: real.status, headers: {"Content-Type": "application/json"}});
    }
    if (way === "504") {
      await realFetch(url, options);
      return new Response("<html><body><h1>504 Gateway Time-out</h1></body></html>",
                          {status: 504, headers: {"Content-Type": "text/html"}});
    }
    if (way === "hang") {  // stored, and the answer never comes: the connection left open
      await realFetch(url, options);
      return new Promise((resolve, reject) => options.signal && options.signal.addEventListener(
        "abort", () => reject(new DOMException("The operation was aborted.", "AbortError"))));
    }
    const reason = "not stored: the web tier is stopping; send this file again";
    const rejected = options.body.getAll("files").map((file, index) =>
      ({index, filename: file.name, error: reason, status: 503}));
    return new Response(JSON.stringify({error: reason, filename: rejected[0].filename, items: [], rejected}),
                        {status: 503, headers: {"Content-Type": "application/json"}});
  }
  return realFetch(url, options);
};
"""


def server_items(stack, batch_id: str) -> list[dict]:
    """The items the server holds for `batch_id`: none while it knows no such batch."""
    import requests

    answer = requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10)
    return answer.json()["items"] if answer.ok else []


def choose(browser, tmp_path, files: dict[str, bytes]) -> None:
    """Choose `files` (written to tmp_path) in the page's file input."""
    from selenium.webdriver.common.by import By

    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(tmp_path / n) for n in files))


def choose_folder(browser, folder, files: dict[str, bytes]) -> None:
    """Choose `folder`, holding `files` (by path within it), in the page's folder input."""
    from selenium.webdriver.common.by import By

    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    browser.find_element(By.ID, "folder-input").send_keys(str(folder))


def upload_failing_first(browser, stack, tmp_path, files: dict[str, bytes], ways: list[str],
                         per_request: int = 20, setup: str = "", timeout_s: float = 120) -> dict:
    """Choose `files` on a fresh page (after the script `setup`) whose first POSTs fail as
    `ways` says; the rows once finished. The page's resends come after a twentieth of
    their delays (0.25 s, 0.5 s...): the failures are faked, nothing needs time to pass."""
    browser.get(stack.web_url + "/")
    browser.execute_script(setup + f"document.body.dataset.filesPerRequest = '{per_request}';"
                           "document.body.dataset.resendDelayScale = '0.05';")
    browser.execute_script(FAIL_FIRST_POSTS, ways)
    choose(browser, tmp_path, files)
    shown = finished_rows(browser, stack, len(files), timeout_s=timeout_s)
    assert browser.execute_script("return window.fakedPosts") == len(ways)
    return shown


def assert_stored_once(browser, stack, files: dict[str, bytes]) -> None:
    """The page follows one batch, and the server holds each file in it once."""
    batches = browser.current_url.split("#batches=")[1].split(",")
    assert len(batches) == 1
    items = server_items(stack, batches[0])
    assert sorted(i["filename"] for i in items) == sorted(files)


def assert_classified(shown: dict, files: dict[str, bytes], reference_model) -> None:
    refs = references(reference_model, files, top1_only=True)
    for name in files:
        assert shown[name].get_attribute("data-state") == "done", shown[name].text
        assert_row_shows(shown[name], refs[name], name)


def test_files_a_stopping_web_tier_did_not_store_are_sent_again(stack, browser, reference_model, tmp_path):
    """They were shown failed for good, though nothing was wrong with them."""
    files = {f"resent_{i}.jpg": make_image(800 + i) for i in range(3)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["503", "unreachable"])
    assert_classified(shown, files, reference_model)


def test_files_whose_answer_was_lost_are_sent_again_and_classified_once(stack, browser, reference_model,
                                                                         tmp_path):
    """A send may be cut off after the server stored its files (a web tier killed
    mid-answer). Shown failed, though stored and classified, and sent again without
    tokens, they would be classified twice, in a batch of their own when the chunk is
    the first. They are sent again under the same batch and tokens."""
    files = {f"lost_{i}.jpg": make_image(830 + i, size=(64, 48)) for i in range(4)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["lost", "lost"], per_request=2)
    assert_classified(shown, files, reference_model)
    assert_stored_once(browser, stack, files)


def test_files_whose_answer_was_cut_off_after_its_headers_are_sent_again_and_classified_once(
        stack, browser, reference_model, tmp_path):
    """Not "upload refused (HTTP 202)", with the batch dropped from the address: the
    server has stored and classified them."""
    files = {f"cut_{i}.jpg": make_image(875 + i, size=(64, 48)) for i in range(2)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["cut-body"])
    assert_classified(shown, files, reference_model)
    assert_stored_once(browser, stack, files)


def test_files_a_proxy_answered_504_for_are_sent_again_and_classified_once(
        stack, browser, reference_model, tmp_path):
    """A proxy's 504 (its timeout passed while the web tier stored the chunk) on a first
    send must not fail the files for good, "upload refused (HTTP 504)": the server may
    hold them. It is an answer lost: sent again under the same tokens."""
    files = {f"proxied_{i}.jpg": make_image(1440 + i, size=(64, 48)) for i in range(2)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["504"], per_request=2)
    assert_classified(shown, files, reference_model)
    assert_stored_once(browser, stack, files)


def test_files_a_proxy_answered_504_for_at_each_send_are_shown_once_after_a_reload(stack, browser, tmp_path):
    """Every send answered 504 by a proxy, the server storing the files at each: failed
    once the resends are over, not as refused (else a reload shows each file twice,
    failed and with its result), and offered again."""
    files = {"proxied.jpg": make_image(1442, size=(64, 48))}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["504"] * 5)
    assert shown["proxied.jpg"].get_attribute("data-state") == "failed"
    assert "HTTP 504" in shown["proxied.jpg"].text and "may have stored" in shown["proxied.jpg"].text
    wait_for(send_again_button(browser).is_displayed, 10, "the file offered again")
    assert_stored_once(browser, stack, files)
    browser.refresh()
    wait_for(lambda: [(name, state) for name, state, _ in rows_shown(browser)] == [("proxied.jpg", "done")],
             60, "the server's result, once")


def polls_answered_as(each_item: str, only_while: str = "true") -> str:
    """A script after which the page polls GET /api/jobs/<id> (its event stream off) and
    sees each item of each answer as `each_item` (JavaScript, `item` in scope) leaves it,
    while `only_while` (JavaScript) holds. The page's own fetch is window.realFetchForTest."""
    return (r"""
  window.EventSource = undefined;
  const realFetch = window.realFetchForTest = window.fetch;
  window.fetch = async (url, options) => {
    const response = await realFetch(url, options);
    if (!(""" + only_while + r""") || !/^\/api\/jobs\/[0-9a-f]{32}$/.test(String(url))) return response;
    const body = await response.json();
    for (const item of body.items) { """ + each_item + r""" }
    return new Response(JSON.stringify(body),
                        { status: 200, headers: { "Content-Type": "application/json" } });
  };""")


# The page polls GET /api/jobs/<id> (no event stream), and while window.deadLetter is
# set, sees "late.jpg" failed as a dead letter and every other file queued.
LATE_JPG_DEAD_LETTERED = "window.deadLetter = true;" + polls_answered_as("""
      Object.assign(item, item.filename === "late.jpg"
        ? { state: "failed", label: null, score: null, top5: [], code: "dead_letter",
            error: "no worker answered it in 3 attempts" }
        : { state: "queued", label: null, score: null, top5: [] });""", only_while="window.deadLetter")


def test_a_late_answer_replaces_a_rows_dead_letter_failure(stack, browser, reference_model, tmp_path):
    """A request no worker answered in its attempts is failed by its dead letter, and
    replaced if a copy of it is answered later, as GET /api/jobs then says: the page must
    not keep the first outcome it showed. Faked in the page's polls (its event stream
    off): "late.jpg" failed, "other.jpg" queued, then the truth."""
    from selenium.webdriver.common.by import By

    files = {"late.jpg": make_image(890), "other.jpg": make_image(891)}
    browser.get(stack.web_url + "/")
    browser.execute_script(LATE_JPG_DEAD_LETTERED)
    choose(browser, tmp_path, files)

    def states() -> dict:
        rows = browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")
        return {row.get_attribute("data-filename"): row.get_attribute("data-state") for row in rows}

    wait_for(lambda: states() == {"late.jpg": "failed", "other.jpg": "queued"}, 60, "the dead letter shown")
    browser.execute_script("window.deadLetter = false;")
    shown = finished_rows(browser, stack, len(files), timeout_s=60)
    wait_for(lambda: states() == {"late.jpg": "done", "other.jpg": "done"}, 30, "the late answer shown")
    assert_classified(shown, files, reference_model)
    assert shown["late.jpg"].find_element(By.CLASS_NAME, "error").text == ""


def test_a_file_deleted_after_it_was_chosen_fails_alone(stack, browser, reference_model, tmp_path):
    """The browser refuses to send a chunk with a file it cannot read: sent again, all 20
    of a chunk would be retried for 75 s, then said to have found no server."""
    from selenium.webdriver.common.by import By

    files = {f"kept_{i}.jpg": make_image(860 + i) for i in range(2)}
    for name, data in {**files, "deleted.jpg": make_image(862)}.items():
        (tmp_path / name).write_bytes(data)
    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      document.body.dataset.filesPerRequest = '1';
      const realFetch = window.fetch;
      window.held = true;  // the first POST waits until the file is gone
      window.fetch = async (url, options) => {
        while (url === "/api/jobs" && window.held) await new Promise((r) => setTimeout(r, 50));
        return realFetch(url, options);
      };""")
    browser.find_element(By.ID, "file-input").send_keys(
        "\n".join(str(tmp_path / n) for n in ("kept_0.jpg", "kept_1.jpg", "deleted.jpg")))
    rows = (By.CSS_SELECTOR, "#results [data-state]")
    wait_for(lambda: len(browser.find_elements(*rows)) == 3, 30, "the rows")
    (tmp_path / "deleted.jpg").unlink()
    browser.execute_script("window.held = false;")
    shown = finished_rows(browser, stack, 3, timeout_s=120)
    assert shown["deleted.jpg"].get_attribute("data-state") == "failed"
    assert "the file could not be read: changed, moved or deleted" in shown["deleted.jpg"].text
    assert_classified({n: shown[n] for n in files}, files, reference_model)


def hold_posts_until_stopped(browser, files_per_request: int) -> None:
    """Uploads by fetch, `files_per_request` files each; every POST to /api/jobs waits
    while `window.held` (set false to let them go), and `window.posts` counts them."""
    browser.execute_script(UPLOADS_BY_FETCH + f"""
      document.body.dataset.filesPerRequest = '{files_per_request}';""" + """
      const realFetch = window.fetch;
      window.held = true;
      window.posts = 0;
      window.fetch = async (url, options) => {
        if (url === "/api/jobs") window.posts += 1;
        while (url === "/api/jobs" && window.held) await new Promise((r) => setTimeout(r, 50));
        return realFetch(url, options);
      };""")


def test_stop_sending_ends_an_upload_leaving_what_was_sent(stack, browser, reference_model, tmp_path):
    """A wrong folder of thousands of files on a slow link must be stoppable without
    leaving the page. The chunk in flight ends as it would; no other is sent."""
    from selenium.webdriver.common.by import By

    files = {f"stop_{i}.jpg": make_image(880 + i, size=(64, 48)) for i in range(6)}
    browser.get(stack.web_url + "/")
    hold_posts_until_stopped(browser, files_per_request=1)
    choose(browser, tmp_path, files)
    stop = browser.find_element(By.ID, "stop-sending")
    wait_for(lambda: stop.is_displayed() and browser.execute_script("return window.posts") == 1, 30,
             "the first send, and the button")
    record_announcements(browser)
    stop.click()
    # Said: the rows on their way stay "uploading", and the press seems to do nothing;
    # in one text with the files left unsent, as said apart the first goes unheard. Not
    # as failures ("5 failed", the first named): the user stopped them.
    wait_for(lambda: last_announced(browser).startswith(
        "Stopped: files already on their way finish sending, the rest are not sent. 0 of 6 classified, "
        "5 not sent (stopped)"), 10, "the press and its count said")
    browser.execute_script("window.held = false;")
    shown = finished_rows(browser, stack, 6, timeout_s=60)
    first = "stop_0.jpg"
    assert_classified({first: shown[first]}, {first: files[first]}, reference_model)
    for name in list(files)[1:]:
        assert shown[name].get_attribute("data-state") == "failed"
        assert shown[name].get_attribute("data-stopped") == "true"
        assert "not sent: you stopped the upload" in shown[name].text
    assert browser.execute_script("return window.posts") == 1
    batch_id = browser.current_url.split("#batches=")[1]
    assert [i["filename"] for i in server_items(stack, batch_id)] == [first]
    wait_for(lambda: not stop.is_displayed(), 10, "the button to go")
    # Counted apart from failures: 900 of 1,000 stopped would read "910 failed".
    final = "1 of 6 classified, 5 not sent (stopped)"
    wait_for(lambda: last_announced(browser) == final, 10, "the end said")
    assert browser.find_element(By.ID, "summary").text == final
    assert browser.title == "Done: 1 classified, 5 not sent (stopped) · Image classification"
    assert not any("failed" in said for said in browser.execute_script("return window.announced"))
    assert not browser.find_element(By.ID, "only-failed-box").is_displayed()  # none failed
    # Stopped is not refused: the rest are offered again, into the same batch, not left
    # to be chosen again by hand after a stray press.
    button = send_again_button(browser)
    wait_for(lambda: button.is_displayed() and button.text == "Send the 5 files not sent", 10, "the offer")
    button.click()
    wait_for(lambda: set(states_shown(browser).values()) == {"done"}, 60, "the rest classified")
    assert sorted(i["filename"] for i in server_items(stack, batch_id)) == sorted(files)
    # No longer stopped once sent: the mark goes with the failure.
    assert browser.find_elements(By.CSS_SELECTOR, "#results [data-stopped]") == []
    wait_for(lambda: browser.find_element(By.ID, "summary").text == "6 of 6 classified", 10, "the count")
    assert browser.title == "Done: 6 classified · Image classification"


def test_files_stopped_are_counted_apart_from_those_failed_after_a_reload_too(stack, browser, tmp_path):
    """The summary, the title and what screen readers hear at the end count the files
    the user stopped apart from those that failed; "Show only the failed files" shows
    the failed ones alone, which 900 stopped would bury; a reload shows the same."""
    from selenium.webdriver.common.by import By

    stopped = [f"halted_{i}.jpg" for i in range(3)]
    files = {"sent.jpg": make_image(1470, size=(64, 48)), "bad.jpg": b"not an image at all",
             **{name: make_image(1471 + i, size=(64, 48)) for i, name in enumerate(stopped)}}
    browser.get(stack.web_url + "/")
    hold_posts_until_stopped(browser, files_per_request=2)  # the first: sent.jpg, bad.jpg
    record_announcements(browser)
    choose(browser, tmp_path, files)
    stop = browser.find_element(By.ID, "stop-sending")
    wait_for(lambda: stop.is_displayed() and browser.execute_script("return window.posts") == 1, 30,
             "the first send, and the button")
    stop.click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#results [data-stopped]")) == 3, 10,
             "the rest stopped")
    browser.execute_script("window.held = false;")
    shown = finished_rows(browser, stack, 5, timeout_s=60)
    assert shown["sent.jpg"].get_attribute("data-state") == "done"
    assert shown["bad.jpg"].get_attribute("data-state") == "failed"

    final = "1 of 5 classified, 1 failed, 3 not sent (stopped)"
    title = "Done: 1 classified, 1 failed, 3 not sent (stopped) · Image classification"

    def counted_apart(what: str) -> None:
        rows = {name: (state, browser.find_element(By.CSS_SELECTOR, f'#results [data-filename="{name}"]')
                       .get_attribute("data-stopped")) for name, state in states_shown(browser).items()}
        assert rows == {"sent.jpg": ("done", None), "bad.jpg": ("failed", None),
                        **dict.fromkeys(stopped, ("failed", "true"))}, (what, rows)
        wait_for(lambda: browser.find_element(By.ID, "summary").text == final, 10, f"the count {what}")
        assert browser.title == title, what
        assert browser.find_element(By.ID, "only-failed-box").text == "Show only the failed files (1)", what

    counted_apart("at the end")
    wait_for(lambda: last_announced(browser) == final, 10, "the end said")
    said = browser.execute_script("return window.announced")
    # The failure named at once is the one that failed, not a file the user stopped.
    assert not any("halted_" in text for text in said), said
    assert any(re.match(r"[01] of 5 classified, 1 failed, 3 not sent \(stopped\)\. bad\.jpg: ", text)
               for text in said), said

    # The filter shows the failed file alone (its CSV too); "Send again" still offers the rest.
    only_failed = browser.find_element(By.ID, "only-failed")
    only_failed.click()
    visible = [row.get_attribute("data-filename")
               for row in browser.find_elements(By.CSS_SELECTOR, "#results .result") if row.is_displayed()]
    assert visible == ["bad.jpg"]
    assert browser.find_element(By.ID, "download-csv").text == "Download the failed files (CSV)"
    only_failed.click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    wait_for(lambda: all(row.is_displayed() for row in rows), 5, "every row shown again")
    button = send_again_button(browser)
    wait_for(lambda: button.is_displayed() and button.text == "Send the 3 files not sent", 10, "the offer")

    browser.refresh()
    finished_rows(browser, stack, 5, timeout_s=60)
    counted_apart("after a reload")
    for name in stopped:
        row = browser.find_element(By.CSS_SELECTOR, f'#results [data-filename="{name}"]')
        assert "not sent: you stopped the upload" in row.text
    # What screen readers hear of the page restored: its failure, with the same count.
    wait_for(lambda: browser.find_element(By.ID, "announce").get_attribute("textContent").startswith(
        f"{final}. bad.jpg: "), 10, "the count said")


def test_a_stopped_file_the_server_stored_after_all_is_not_counted_stopped_after_a_reload(stack, browser,
                                                                                          tmp_path):
    """Stopped while its send, whose answer was lost, waited to go again: the server may
    hold it ("reload to see"). The reload shows its result, neither failed nor stopped."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["lost"])  # stored; sent again 5 s later
    choose(browser, tmp_path, {"kept_after_all.jpg": make_image(1475, size=(64, 48))})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    browser.find_element(By.ID, "stop-sending").click()
    shown = finished_rows(browser, stack, 1, timeout_s=4.5)  # before the 5 s resend
    assert shown["kept_after_all.jpg"].get_attribute("data-stopped") == "true"
    assert "(the server may hold it: reload to see)" in shown["kept_after_all.jpg"].text
    wait_for(lambda: browser.find_element(By.ID, "summary").text == "0 of 1 classified, 1 not sent (stopped)",
             10, "the count")
    browser.refresh()
    wait_for(lambda: states_shown(browser) == {"kept_after_all.jpg": "done"}, 60, "the server's result")
    assert browser.find_elements(By.CSS_SELECTOR, "#results [data-stopped]") == []
    wait_for(lambda: browser.find_element(By.ID, "summary").text == "1 of 1 classified", 10, "the count")
    assert browser.title == "Done: 1 classified · Image classification"


def test_the_focus_on_stop_sending_moves_on_when_the_upload_ends_by_itself(stack, browser, tmp_path):
    """The button hides once nothing is being sent: with the focus on it, the focus would
    fall to the page's body, and a screen reader's place be lost."""
    browser.get(stack.web_url + "/")
    with upload_throttled(browser, 100_000):
        choose(browser, tmp_path, {"focused.jpg": make_image(1080, size=(800, 600))})
        wait_for(lambda: browser.execute_script(
            "const b = document.getElementById('stop-sending'); if (b.hidden) return false; b.focus(); "
            "return document.activeElement === b;"), 10, "Stop sending, shown and focused")
        wait_for(lambda: browser.execute_script("return document.getElementById('stop-sending').hidden"),
                 30, "the upload's end")
    assert browser.execute_script("return document.activeElement.id") == "download-csv"


def test_stop_sending_cancels_a_resend_waiting_its_turn(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["unreachable"])  # sent again 5 s later
    choose(browser, tmp_path, {"waiting.jpg": make_image(890)})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    browser.find_element(By.ID, "stop-sending").click()
    # At once, not after the resend's 5 s delay (3 s was tight for a loaded machine).
    shown = finished_rows(browser, stack, 1, timeout_s=4.5)
    assert "not sent again: you stopped the upload (the server may hold it" in shown["waiting.jpg"].text


def test_stop_sending_while_a_chunk_is_being_read_does_not_send_it(stack, browser, tmp_path):
    """A chunk taken to be sent, its files being read (readable) as "Stop sending" is
    pressed, must not be sent. Its reads held here until the press."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      window.readHeld = true;
      window.reads = 0;
      const realRead = Blob.prototype.arrayBuffer;
      Blob.prototype.arrayBuffer = async function () {
        window.reads += 1;
        while (window.readHeld) await new Promise((resolve) => setTimeout(resolve, 20));
        return realRead.call(this);
      };
      const realFetch = window.fetch;
      window.posts = 0;
      window.fetch = (url, options) => {
        if (url === "/api/jobs") window.posts += 1;
        return realFetch(url, options);
      };""")
    choose(browser, tmp_path, {"read_when_stopped.jpg": make_image(1460, size=(64, 48))})
    wait_for(lambda: browser.execute_script("return window.reads") >= 1, 30, "the file being read")
    browser.find_element(By.ID, "stop-sending").click()
    browser.execute_script("window.readHeld = false;")
    shown = finished_rows(browser, stack, 1, timeout_s=10)
    assert "not sent: you stopped the upload" in shown["read_when_stopped.jpg"].text
    # Said so where the post would have begun (send(), once its files were read): none did.
    assert browser.execute_script("return window.posts") == 0


def test_stop_sending_after_a_503_keeps_the_reasons_for_a_reload(stack, browser, tmp_path):
    """A 503 says nothing was stored: stopped during the wait to send again, the rows must
    not say "the server may hold it: reload to see", as the reload shows nothing."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["503"])  # sent again 5 s later
    choose(browser, tmp_path, {"refused_once.jpg": make_image(891)})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    browser.find_element(By.ID, "stop-sending").click()
    shown = finished_rows(browser, stack, 1, timeout_s=4.5)  # before the 5 s resend
    assert "not sent: you stopped the upload" in shown["refused_once.jpg"].text
    assert "#batches=" in browser.current_url
    browser.refresh()
    shown = finished_rows(browser, stack, 1, timeout_s=30)
    assert "not sent: you stopped the upload" in shown["refused_once.jpg"].text


def test_a_file_deleted_before_its_chunk_is_sent_again_fails_alone(stack, browser, reference_model, tmp_path):
    """Resends look at the files again: with one file of a chunk deleted while the web
    tier restarts, all five rows would otherwise fail as "could not be reached"."""
    files = {f"again_{i}.jpg": make_image(870 + i) for i in range(2)}
    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["unreachable"])  # resent 5 s later
    choose(browser, tmp_path, {**files, "gone.jpg": make_image(872)})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    (tmp_path / "gone.jpg").unlink()
    shown = finished_rows(browser, stack, 3, timeout_s=120)
    assert shown["gone.jpg"].get_attribute("data-state") == "failed"
    assert "the file could not be read" in shown["gone.jpg"].text
    assert_classified({n: shown[n] for n in files}, files, reference_model)


# After a first send: the page's later POSTs wait while window.resendsHeld.
HOLD_RESENDS = UPLOADS_BY_FETCH + """
window.resendsHeld = true;
const earlierFetch = window.fetch;
window.fetch = async (url, options) => {
  while (url === "/api/jobs" && window.resendsHeld) await new Promise((resolve) => setTimeout(resolve, 50));
  return earlierFetch(url, options);
};
"""


def test_a_file_deleted_after_a_send_that_stored_it_shows_the_servers_result_once(
        stack, browser, reference_model, tmp_path):
    """A file deleted while its chunk waited to be sent again, after a send whose answer
    was lost but which stored it, showed "could not be read", and twice after a reload
    (with the server's result too). The server's item, found by token, takes its row."""

    files = {f"kept_{i}.jpg": make_image(874 + i, size=(64, 48)) for i in range(2)}
    files["stored_then_gone.jpg"] = make_image(876, size=(64, 48))
    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["lost"])
    choose(browser, tmp_path, files)
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the lost answer")
    batch_id = browser.current_url.split("#batches=")[1]
    browser.execute_script(HOLD_RESENDS)  # the resend comes 5 s after the loss: held till then

    wait_for(lambda: len(server_items(stack, batch_id)) == 3, 30, "the server to hold every file")
    (tmp_path / "stored_then_gone.jpg").unlink()
    browser.execute_script("window.resendsHeld = false;")
    for moment in ("as sent", "after a reload"):
        wait_for(lambda: [state for _, state, _ in rows_shown(browser)] == ["done"] * 3, 60,
                 f"every row done, {moment}")
        shown = finished_rows(browser, stack, 3, timeout_s=10)
        assert sorted(shown) == sorted(files), moment
        assert_classified(shown, files, reference_model)
        browser.refresh()


def test_a_file_over_the_size_limit_is_refused_unsent_and_chunks_keep_under_the_body_limit(
        stack, browser, reference_model, tmp_path):
    """One 2.2 GB file had taken the whole request over the server's body limit: the 8
    photos sent with it failed too, said to be "larger than the server accepts"."""
    files = {f"small_{i}.jpg": make_image(880 + i, size=(64, 48)) for i in range(2)}
    big = make_image(883, size=(800, 600))
    limit = max(len(data) for data in files.values())
    assert len(big) > limit
    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      document.body.dataset.maxFileBytes = arguments[0];
      document.body.dataset.maxChunkBytes = arguments[0];  // one small file a request
      window.sent = [];
      const realFetch = window.fetch;
      window.fetch = (url, options) => {
        if (url === "/api/jobs") window.sent.push(options.body.getAll("files").map((file) => file.name));
        return realFetch(url, options);
      };""", str(limit))
    choose(browser, tmp_path, {**files, "big.jpg": big})
    shown = finished_rows(browser, stack, 3, timeout_s=120)
    assert shown["big.jpg"].get_attribute("data-state") == "failed"
    assert "file is larger than the limit of 10 MB" in shown["big.jpg"].text  # the server's words
    assert sorted(browser.execute_script("return window.sent")) == [[name] for name in sorted(files)]
    assert_classified({n: shown[n] for n in files}, files, reference_model)


def test_chunks_refused_before_their_batch_exists_all_join_one_batch(stack, browser, reference_model,
                                                                      tmp_path):
    """30 files chosen while the web tier restarts: both chunks refused, then sent again
    side by side without a batch id, would make two batches; the page would follow one,
    and the other's files stay "queued" for good."""
    files = {f"split_{i}.jpg": make_image(840 + i, size=(64, 48)) for i in range(4)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["503", "503"], per_request=2)
    assert_classified(shown, files, reference_model)
    assert browser.current_url.count("#batches=") == 1 and "," not in browser.current_url


def test_a_waiting_page_reconnects_after_the_web_tier_restarts(stack, browser, reference_model, tmp_path):
    import psutil
    from selenium.webdriver.common.by import By

    files = {f"reconnect_{i}.jpg": make_image(700 + i) for i in range(6)}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    browser.get(stack.web_url + "/")

    def results():
        return browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")

    def states():
        return [i.get_attribute("data-state") for i in results()]

    # Workers warm from earlier tests answered all 6 before the kill at times: nothing was
    # left for the page to wait for. Held, they answer only once the web tier is killed.
    with workers_held(stack):
        browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))
        wait_for(lambda: len(states()) == 6 and "uploading" not in states(), 30, "every file sent",
                 interval=0.05)
        assert "queued" in states(), f"every row finished before the kill: no reconnect tested {states()}"
        # Kill the web tier's worker process (its master starts a new one) while the page waits.
        master = next(p for p in processes(stack, "gunicorn") if p.children())
        master.children()[0].kill()

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(s in ("done", "failed") for s in states()):
        time.sleep(0.2)
    items = {i.get_attribute("data-filename"): i for i in results()}
    refs = references(reference_model, files, top1_only=True)
    for name in files:
        assert items[name].get_attribute("data-state") == "done", items[name].text
        assert_row_shows(items[name], refs[name], name)
    assert psutil.pid_exists(master.pid)


# What the page reads of the server, counted: window.batchReads (GET /api/jobs/<id>),
# window.streamsOpened (its event streams) and window.statusReads (GET /api/status,
# asked every 2 s whatever else the page does: a clock that needs no sleep).
COUNT_READS = r"""
  window.batchReads = 0; window.streamsOpened = 0; window.statusReads = 0;
  const countedFetch = window.fetch;
  window.fetch = (url, options) => {
    if (/^\/api\/jobs\/[0-9a-f]{32}$/.test(String(url))) window.batchReads += 1;
    if (String(url) === "/api/status") window.statusReads += 1;
    return countedFetch(url, options);
  };
  const CountedEventSource = window.EventSource;
  window.EventSource = class extends CountedEventSource {
    constructor(url, init) { super(url, init); window.streamsOpened += 1; }
  };"""


def forget_on_the_server(stack, batch_id: str) -> None:
    """The server loses `batch_id`, as `make run` started again does (its embedded AWS
    keeps nothing across a restart): the batch's objects deleted from both buckets, and
    the web tier's process killed (its master starts another, which holds nothing in
    memory). Returns once the new one says it knows no such batch."""
    import psutil
    import requests

    from tests.integration.conftest import clients

    s3, _, _ = clients(stack)
    settings = stack.settings()
    for bucket in (settings.input_bucket, settings.output_bucket):
        for stored in s3.list_objects_v2(Bucket=bucket, Prefix=f"{batch_id}/").get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=stored["Key"])
    master = next(p for p in processes(stack, "gunicorn") if p.children())
    old = master.children()[0]
    old.kill()
    with contextlib.suppress(psutil.NoSuchProcess):
        old.wait(10)

    def unknown() -> bool:
        try:
            return requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=5).status_code == 404
        except requests.RequestException:
            return False

    wait_for(unknown, 60, "a new web tier that knows no such batch")


def said_lost(browser, batch_id: str) -> str:
    """The summary line, once it says the server lost `batch_id` (AssertionError after 60 s)."""
    from selenium.webdriver.common.by import By

    summary = browser.find_element(By.ID, "summary")
    lost = f"batch {batch_id}: the server no longer holds it"
    return wait_for(lambda: lost in summary.text and summary.text, 60, "the page to say the batch is lost")


def assert_no_longer_read(browser) -> None:
    """The page asks nothing more of its lost batch: no poll, no event stream, while it
    asks for the status line three times (6 s, where it polled every 2 s)."""
    def reads() -> int:
        return browser.execute_script("return window.batchReads + window.streamsOpened")

    before, status_reads = reads(), browser.execute_script("return window.statusReads")
    wait_for(lambda: browser.execute_script("return window.statusReads") >= status_reads + 3, 30,
             "three reads of the status line")
    assert reads() == before


LOST_ROW = "not classified: the server no longer holds its batch (restarted with its storage reset, " \
           "or the batch expired)"


def test_a_batch_the_server_lost_is_said_so_and_its_queued_files_offered_again(
        stack, browser, reference_model, tmp_path):
    """`make run` started again keeps nothing, and the page went on showing the files
    still queued "queued" for ever, reading the batch every 2 s (the web tier listing S3
    each time), though each read answered 404 `unknown_batch`. Followed by its event
    stream, which the restart cuts off. Sent again, and so made anew, the batch was
    still said lost, "Send again" below, with every file classified and the button gone:
    the notice goes (not another batch's), and a loss after that is said again."""
    from selenium.webdriver.common.by import By

    files = {f"lost_{i}.jpg": make_image(1500 + i, size=(64, 48)) for i in range(3)}
    other = "0" * 32  # another batch's notice, which stays
    other_notice = f"batch {other} could not be loaded (unknown here, or expired)"
    browser.get(f"{stack.web_url}/#batches={other}")
    line = browser.find_element(By.ID, "summary")
    wait_for(lambda: line.text == other_notice, 30, "the other batch's notice")
    browser.execute_script(COUNT_READS)
    announce = record_announcements(browser)
    with workers_held(stack):  # nothing classified before the batch is lost
        choose(browser, tmp_path, files)
        wait_for(lambda: list(states_shown(browser).values()) == ["queued"] * 3, 30, "the files queued")
        assert browser.execute_script("return window.streamsOpened") == 1
        batch_id = browser.current_url.split("#batches=")[1]
        forget_on_the_server(stack, batch_id)

    summary = said_lost(browser, batch_id)
    assert summary.endswith('and 3 files of it not yet classified will not be: "Send again" below sends them '
                            "again"), summary
    assert any(said.startswith("a batch on this page was lost: the server no longer holds it")
               for said in browser.execute_script("return window.announced")), announce.text
    for name, state, text in rows_shown(browser):
        assert state == "failed" and f"{LOST_ROW}; send it again" in text, (name, text)
    assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 3
    assert_no_longer_read(browser)

    def said_lost_times() -> int:
        return sum(said.startswith("a batch on this page was lost")
                   for said in browser.execute_script("return window.announced"))

    # The way forward said: the files go again, into a batch made anew under the same id,
    # lost once more before any is classified (said again), then sent again once more.
    button = send_again_button(browser)
    assert button.text == "Send 3 failed files again"
    with workers_held(stack):
        button.click()
        wait_for(lambda: list(states_shown(browser).values()) == ["queued"] * 3, 30, "the files queued again")
        # Held again, and no row lost: a loss still said would contradict the rows, and
        # point to a "Send again" no longer shown.
        wait_for(lambda: line.text == f"0 of 3 classified · {other_notice}", 30, "the loss no longer said")
        assert said_lost_times() == 1, announce.text  # the notice's end is not said
        forget_on_the_server(stack, batch_id)
    assert said_lost(browser, batch_id).endswith('and 3 files of it not yet classified will not be: '
                                                 '"Send again" below sends them again')
    wait_for(lambda: said_lost_times() == 2, 30, "the second loss said to screen readers")

    send_again_button(browser).click()
    shown = finished_rows(browser, stack, len(files), timeout_s=120)
    refs = references(reference_model, files, top1_only=True)
    for name in files:
        assert shown[name].get_attribute("data-state") == "done", shown[name].text
        assert_row_shows(shown[name], refs[name], name)
        assert shown[name].get_attribute("data-lost") is None
    assert browser.current_url.split("#batches=")[1] == batch_id
    # As the title and the hidden "Send again" say: all done, nothing lost to act on.
    wait_for(lambda: line.text == f"3 of 3 classified · {other_notice}", 30, "the summary, the loss gone")
    assert browser.title.startswith("Done: 3 classified")
    assert said_lost_times() == 2, announce.text
    # Nor after a reload, which finds the batch held (the other one left the address).
    browser.refresh()
    wait_for(lambda: browser.find_element(By.ID, "summary").text == "3 of 3 classified", 30,
             "the batch restored, without the loss")


def test_a_lost_batch_opened_from_its_link_keeps_its_result_and_says_to_choose_the_rest_again(
        stack, browser, reference_model):
    """Opened from its link (polled, not streamed), with one file classified and one
    queued: the result stays; the other, whose File this page never held, is to be
    chosen again."""
    import uuid

    import requests
    from selenium.webdriver.common.by import By

    def send(name: str, data: bytes) -> None:
        answer = requests.post(f"{stack.web_url}/api/jobs", data={"batch_id": batch_id, "create": "1"},
                               files={"files": (name, data)}, timeout=30)
        assert answer.status_code == 202, answer.text

    batch_id = uuid.uuid4().hex
    done, queued = make_image(1510), make_image(1511)
    send("kept.jpg", done)
    wait_for(lambda: [i["state"] for i in server_items(stack, batch_id)] == ["done"], 60, "kept.jpg done")
    with workers_held(stack):
        send("queued.jpg", queued)
        browser.get(f"{stack.web_url}/#batches={batch_id}")
        wait_for(lambda: states_shown(browser) == {"kept.jpg": "done", "queued.jpg": "queued"}, 30,
                 "the batch shown")
        browser.execute_script(COUNT_READS)
        forget_on_the_server(stack, batch_id)

    summary = said_lost(browser, batch_id)
    assert summary.endswith("and 1 file of it not yet classified will not be: choose it again to have it "
                            "classified"), summary
    rows = {name: (state, text) for name, state, text in rows_shown(browser)}
    assert rows["kept.jpg"][0] == "done"
    kept = browser.find_element(By.CSS_SELECTOR, '#results [data-filename="kept.jpg"]')
    assert_row_shows(kept, references(reference_model, {"kept.jpg": done, "queued.jpg": queued},
                                      top1_only=True)["kept.jpg"], "kept.jpg")
    assert rows["queued.jpg"][0] == "failed" and f"{LOST_ROW}; choose it again" in rows["queued.jpg"][1]
    assert_no_longer_read(browser)
    assert not send_again_button(browser).is_displayed()  # no File to send


# The page's next read of GET /api/jobs/<id> is answered 404 `unknown_batch`, as if the
# server had lost the batch; those after it as the server answers them.
ONE_READ_UNKNOWN = r"""
  const realFetch = window.fetch;
  window.unknownOnce = true;
  window.fetch = (url, options) => {
    const batchRead = /^\/api\/jobs\/[0-9a-f]{32}$/.test(String(url));
    if (!window.unknownOnce || !batchRead) return realFetch(url, options);
    window.unknownOnce = false;
    return Promise.resolve(new Response(JSON.stringify({error: "no such batch", code: "unknown_batch"}),
                                        {status: 404, headers: {"Content-Type": "application/json"}}));
  };"""


def test_a_single_unknown_answer_does_not_lose_a_batch_the_server_holds(stack, browser):
    """Giving a batch up is for good: a 404 the next read does not confirm is passed over."""
    from selenium.webdriver.common.by import By

    with waiting_batch(stack, 1512) as batch_id:
        show_restored(browser, stack, batch_id)
        browser.execute_script(COUNT_READS + ONE_READ_UNKNOWN)
        wait_for(lambda: browser.execute_script("return !window.unknownOnce && window.batchReads >= 2"), 30,
                 "two reads after the one answered 404")  # (that one not counted)
        assert states_shown(browser) == {"waiting.jpg": "queued"}
        assert "no longer holds" not in browser.find_element(By.ID, "summary").text


# The page's reads of GET /api/jobs/<id> wait while `window.readsHeld` (from false):
# meanwhile the page hears nothing of the batch, neither a 404 nor a 200.
HOLD_READS = r"""
  window.readsHeld = false;
  const unheldFetch = window.fetch;
  window.fetch = async (url, options) => {
    const batchRead = /^\/api\/jobs\/[0-9a-f]{32}$/.test(String(url));
    while (batchRead && window.readsHeld) await new Promise((resolve) => setTimeout(resolve, 50));
    return unheldFetch(url, options);
  };"""


def test_files_stored_in_a_batch_lost_and_made_anew_midway_are_said_lost_and_the_rest_followed(
        stack, browser, reference_model, tmp_path):
    """The server lost the batch while the page was still sending it, and the next chunk
    (sent with create=1, as every chunk is) made it anew before two reads could both
    say "no such batch": every read then answered 200, listing only the file stored
    since. The files stored before stayed "queued" for ever, and the batch was polled
    every 2 s. Here the page's reads wait until the chunk has made the batch anew, as a
    chunk that lands first does."""
    from selenium.webdriver.common.by import By

    files = {f"midway_{i}.jpg": make_image(1520 + i, size=(64, 48)) for i in range(3)}
    late = "midway_2.jpg"
    before = [name for name in files if name != late]
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, [late])  # a file a chunk, `late`'s chunk held back
    # Held longer than the page waits for an answer otherwise (its upload is faked done at once).
    browser.execute_script("document.body.dataset.answerTimeoutMs = '300000';" + HOLD_READS + COUNT_READS)
    announce = record_announcements(browser)
    with workers_held(stack):  # nothing classified before the batch is lost
        choose(browser, tmp_path, files)
        wait_for(lambda: [states_shown(browser).get(name) for name in before] == ["queued"] * 2, 30,
                 "the files before the held one queued")
        batch_id = browser.current_url.split("#batches=")[1]
        browser.execute_script("window.readsHeld = true;")
        forget_on_the_server(stack, batch_id)
        browser.execute_script("window.held = [];")  # its chunk goes, and makes the batch anew
        wait_for(lambda: [i["filename"] for i in server_items(stack, batch_id)] == [late], 30,
                 "the batch made anew with the file sent since")
        wait_for(lambda: states_shown(browser)[late] == "queued", 30, "the file sent since queued")
        browser.execute_script("window.readsHeld = false;")

        wait_for(lambda: [states_shown(browser)[name] for name in before] == ["failed"] * 2, 30,
                 "the files stored before the loss failed")
        summary = browser.find_element(By.ID, "summary").text
        assert f"batch {batch_id}: the server lost the files stored in it earlier" in summary, summary
        assert summary.endswith('and 2 files of it not yet classified will not be: "Send again" below sends '
                                "them again"), summary
        assert any(said.startswith("a batch on this page was partly lost: the server lost the files")
                   for said in browser.execute_script("return window.announced")), announce.text
        rows = {name: (state, text) for name, state, text in rows_shown(browser)}
        for name in before:
            assert rows[name][0] == "failed" and f"{LOST_ROW}; send it again" in rows[name][1], (name, rows)
        assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 2
        assert rows[late][0] == "queued", rows  # the batch it is in is held: still followed

    # Followed to its end, with no reload: the file the batch holds is classified.
    wait_for(lambda: states_shown(browser)[late] == "done", 120, "the file stored since classified")
    kept = browser.find_element(By.CSS_SELECTOR, f'#results [data-filename="{late}"]')
    assert_row_shows(kept, references(reference_model, files, top1_only=True)[late], late)
    # The others go again, as new uploads into the batch made anew.
    button = send_again_button(browser)
    assert button.text == "Send 2 failed files again"
    button.click()
    shown = finished_rows(browser, stack, len(files), timeout_s=120)
    assert_classified(shown, files, reference_model)
    assert not browser.find_elements(By.CSS_SELECTOR, "#results [data-lost]")
    assert browser.current_url.split("#batches=")[1] == batch_id
    # No file lost any more: the notice that said them goes.
    wait_for(lambda: "the server lost the files" not in browser.find_element(By.ID, "summary").text, 30,
             "the summary without the files lost")
    # Once each; beside them, the first two's items, answered since: their requests were
    # still queued (this test's loss keeps the queues), their images gone.
    classified = [i["filename"] for i in server_items(stack, batch_id) if i["state"] == "done"]
    assert sorted(classified) == sorted(files)


def test_a_batch_said_lost_then_made_anew_by_the_files_still_to_send_says_only_the_files_lost(
        stack, browser, reference_model, tmp_path):
    """The server lost the batch while a file of the upload was still to be sent, and two
    reads said so first: the page said the server no longer held it. That file's chunk
    then made the batch anew, and the summary went on saying the server no longer held
    it. It says, as for files lost from a batch made anew, the files lost; once those
    are sent again, nothing of the loss."""
    from selenium.webdriver.common.by import By

    files = {f"anew_{i}.jpg": make_image(1525 + i, size=(64, 48)) for i in range(3)}
    late = "anew_2.jpg"
    before = [name for name in files if name != late]
    lost_files = 'and 2 files of it not yet classified will not be: "Send again" below sends them again'
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, [late])  # a file a chunk, `late`'s chunk held back
    browser.execute_script("document.body.dataset.answerTimeoutMs = '300000';")  # held through the loss
    announce = record_announcements(browser)
    line = browser.find_element(By.ID, "summary")

    def said_lost_times() -> int:
        return sum(said.startswith("a batch on this page was")
                   for said in browser.execute_script("return window.announced"))

    with workers_held(stack):  # nothing classified before the batch is lost
        choose(browser, tmp_path, files)
        wait_for(lambda: [states_shown(browser).get(name) for name in before] == ["queued"] * 2, 30,
                 "the files before the held one queued")
        batch_id = browser.current_url.split("#batches=")[1]
        forget_on_the_server(stack, batch_id)
        assert said_lost(browser, batch_id).endswith(lost_files)
        assert [states_shown(browser)[name] for name in before] == ["failed"] * 2
        assert states_shown(browser)[late] == "uploading"  # left to its upload

        browser.execute_script("window.held = [];")  # its chunk goes, and makes the batch anew
        wait_for(lambda: states_shown(browser)[late] == "queued", 30, "the file sent since queued")
        wait_for(lambda: "no longer holds" not in line.text, 30, "the summary to say the batch held again")
        assert f"batch {batch_id}: the server lost the files stored in it earlier" in line.text, line.text
        assert line.text.endswith(lost_files), line.text
        assert said_lost_times() == 1, announce.text  # heard once: the way forward is the same

    wait_for(lambda: states_shown(browser)[late] == "done", 120, "the file sent since classified")
    send_again_button(browser).click()
    assert_classified(finished_rows(browser, stack, len(files), timeout_s=120), files, reference_model)
    wait_for(lambda: line.text == "3 of 3 classified", 30, "the summary without the loss")
    assert said_lost_times() == 1, announce.text


def test_a_reload_after_the_batch_was_lost_and_made_anew_shows_the_files_it_lost_as_lost(
        stack, browser, tmp_path):
    """The server lost the batch, and a chunk (another tab's, a script's) made it anew;
    reloaded then, the tab dropped without a word the rows it had saved of files the
    server had stored before: the batch now lists only the file stored since. They are
    failed as lost, as the tab that stays open fails them (two reads leaving them out)."""
    import requests
    from selenium.webdriver.common.by import By

    files = {f"relost_{i}.jpg": make_image(1540 + i, size=(64, 48)) for i in range(2)}
    browser.get(stack.web_url + "/")
    # Held through the reload: a worker answering a lost file's request (its image gone)
    # would put its item back in the batch, failed, before the page reads it twice.
    with workers_held(stack):
        choose(browser, tmp_path, files)
        wait_for(lambda: list(states_shown(browser).values()) == ["queued"] * 2, 30, "the files queued")
        batch_id = browser.current_url.split("#batches=")[1]
        forget_on_the_server(stack, batch_id)
        answer = requests.post(f"{stack.web_url}/api/jobs", data={"batch_id": batch_id, "create": "1"},
                               files={"files": ("since.jpg", make_image(1542, size=(64, 48)))}, timeout=30)
        assert answer.status_code == 202, answer.text

        browser.refresh()
        wait_for(lambda: [states_shown(browser).get(name) for name in files] == ["failed"] * 2, 30,
                 "the files lost failed")
        rows = rows_shown(browser)
        assert [(name, state) for name, state, _ in rows] == [
            ("relost_0.jpg", "failed"), ("relost_1.jpg", "failed"), ("since.jpg", "queued")]
        for name, _, text in rows[:2]:
            assert f"{LOST_ROW}; choose it again" in text, (name, text)
        assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 2
        summary = browser.find_element(By.ID, "summary").text
        assert f"batch {batch_id}: the server lost the files stored in it earlier" in summary, summary
        assert summary.endswith("and 2 files of it not yet classified will not be: choose them again to "
                                "have them classified"), summary
        assert not send_again_button(browser).is_displayed()  # no File to send after a reload

        # Saved as lost: the next reload shows them so at once, not queued until two reads
        # have left them out, and does not say the loss again.
        saved = browser.execute_script("return JSON.parse(sessionStorage.getItem(arguments[0]))",
                                       f"imgclass.shown.{batch_id}")
        assert [row.get("lost") for row in saved if row.get("name") in files] == [True, True], saved
        browser.refresh()
        wait_for(lambda: len(rows_shown(browser)) == 3, 30, "the rows after a second reload")
        assert [(name, state) for name, state, _ in rows_shown(browser)][:2] == [
            ("relost_0.jpg", "failed"), ("relost_1.jpg", "failed")]
        assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 2
        assert "the server lost the files" not in browser.find_element(By.ID, "summary").text
    # Still followed, for the file the batch holds.
    wait_for(lambda: states_shown(browser)["since.jpg"] == "done", 120, "the file stored since classified")


def shown_answers(browser, names) -> dict[str, str]:
    """The rows of `names` as the page renders them (their outerHTML), by name."""
    from selenium.webdriver.common.by import By

    return {name: browser.find_element(By.CSS_SELECTOR, f'#results [data-filename="{name}"]')
            .get_attribute("outerHTML") for name in names}


@contextlib.contextmanager
def lost_with_one_queued(browser, stack, batch_id: str, late: str) -> Iterator[None]:
    """For the block: `batch_id` lost on the server while its file `late` (released by
    HOLD_POSTS) is queued, the tab hearing nothing of the loss until a reload. The
    workers are held until the end: one answering the lost file's request (its image
    gone) would put its item back in the batch, failed, which would then be held again."""
    with workers_held(stack):
        browser.execute_script(HOLD_READS)
        browser.execute_script("window.held = [];")
        wait_for(lambda: states_shown(browser)[late] == "queued", 30, "the file sent last queued")
        browser.execute_script("window.readsHeld = true;")  # the tab hears nothing of the loss
        forget_on_the_server(stack, batch_id)
        yield


def test_a_reload_after_the_server_lost_the_batch_shows_the_results_the_tab_had_shown(
        stack, browser, reference_model, tmp_path):
    """The tab saved its rows' ids, not their results: reloaded once the server had lost
    the batch, it said the batch "could not be loaded (unknown here, or expired)" and
    showed nothing of it, the results the user had seen gone with it; and reloaded once
    the batch was made anew, it failed a file classified before the loss "not classified".
    Each classified row comes back as it was, with the answer the tab saved, the others
    failed as lost, and the loss said as the page says it live. Here the tab hears
    nothing of the loss before the reload (its reads held)."""
    import requests
    from selenium.webdriver.common.by import By

    kept = [f"kept_{i}.jpg" for i in range(2)]
    late = "late.jpg"
    files = {name: make_image(1560 + i, size=(64, 48)) for i, name in enumerate([*kept, late])}
    refs = references(reference_model, files, top1_only=True)
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, [late])
    # Held while the others are classified, longer than the page waits for an answer
    # otherwise (its upload is faked done at once).
    browser.execute_script("document.body.dataset.answerTimeoutMs = '300000';")
    choose(browser, tmp_path, files)
    wait_for(lambda: "#batches=" in browser.current_url, 30, "the batch in the address")
    batch_id = browser.current_url.split("#batches=")[1]
    wait_for(lambda: [states_shown(browser).get(name) for name in kept] == ["done"] * 2, 120,
             "the files sent first classified")
    before = shown_answers(browser, kept)
    with lost_with_one_queued(browser, stack, batch_id, late):
        browser.refresh()
        summary = said_lost(browser, batch_id)
        assert summary.endswith("and 1 file of it not yet classified will not be: choose it again to have it "
                                "classified"), summary
        assert "could not be loaded" not in summary, summary
        assert [(name, state) for name, state, _ in rows_shown(browser)] == [
            ("kept_0.jpg", "done"), ("kept_1.jpg", "done"), (late, "failed")]
        assert shown_answers(browser, kept) == before
        for name in kept:
            assert_row_shows(browser.find_element(By.CSS_SELECTOR, f'#results [data-filename="{name}"]'),
                             refs[name], name)
        [text] = [text for name, _, text in rows_shown(browser) if name == late]
        assert f"{LOST_ROW}; choose it again" in text, text
        assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 1
        assert browser.current_url.split("#batches=")[1] == batch_id  # kept, for the next reload

        # Made anew since (another tab's chunk, a script's): the rows the server no longer
        # lists are shown as the tab showed them, after a second reload too.
        answer = requests.post(f"{stack.web_url}/api/jobs", data={"batch_id": batch_id, "create": "1"},
                               files={"files": ("since.jpg", make_image(1563, size=(64, 48)))}, timeout=30)
        assert answer.status_code == 202, answer.text
        browser.refresh()
        wait_for(lambda: len(rows_shown(browser)) == 4, 30, "the rows after a second reload")
        assert [(name, state) for name, state, _ in rows_shown(browser)] == [
            ("kept_0.jpg", "done"), ("kept_1.jpg", "done"), (late, "failed"), ("since.jpg", "queued")]
        assert shown_answers(browser, kept) == before
        assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 1


def test_a_result_the_server_still_holds_wins_over_the_one_the_tab_saved(stack, browser, reference_model,
                                                                          tmp_path):
    """The tab saves each classified row's answer, for a reload that finds the batch lost;
    one that finds the batch held shows the server's answer, and saves that."""
    from selenium.webdriver.common.by import By

    files = {"truth.jpg": make_image(1564, size=(64, 48))}
    browser.get(stack.web_url + "/")
    choose(browser, tmp_path, files)
    shown = finished_rows(browser, stack, 1, timeout_s=120)
    score = shown["truth.jpg"].get_attribute("data-score")
    batch_id = browser.current_url.split("#batches=")[1]
    key = f"imgclass.results.{batch_id}"

    def saved() -> list:
        return browser.execute_script("return JSON.parse(sessionStorage.getItem(arguments[0]) || '[]')", key)

    wait_for(lambda: len(saved()) == 1, 30, "the answer saved")
    [[item_id, label, saved_score, top5, _]] = saved()
    assert (label, f"{saved_score:.6f}") == (shown["truth.jpg"].get_attribute("data-label"), score)
    assert len(top5) == 5
    tampered = [[item_id, "tampered", 0.5, [["tampered", 0.5]] * 5, 0]]
    browser.execute_script("sessionStorage.setItem(arguments[0], JSON.stringify(arguments[1]))", key,
                           tampered)
    browser.refresh()
    wait_for(lambda: states_shown(browser).get("truth.jpg") == "done", 30, "the row shown again")
    row = browser.find_element(By.CSS_SELECTOR, '#results [data-filename="truth.jpg"]')
    assert row.get_attribute("data-score") == score
    assert_row_shows(row, references(reference_model, files)["truth.jpg"], "truth.jpg")
    wait_for(lambda: saved()[0][1] != "tampered", 30, "the server's answer saved in its place")
    assert f"{saved()[0][2]:.6f}" == score


# A file classified whose answer the tab did not keep, its batch lost (before a reload).
ANSWER_GONE_ROW = ("classified, but its answer is gone: the server no longer holds its batch (restarted "
                   "with its storage reset, or the batch expired), and this tab did not keep the answer; "
                   "choose the file again to see it")


def test_the_results_a_tab_saves_are_bounded(stack, browser, reference_model, tmp_path):
    """A batch may hold thousands of files, and sessionStorage ~5 MB: the tab keeps the
    answers of so many files (data-saved-results, 10,000 unless a test says fewer); a
    reload after the loss shows the others failed as lost, as before."""
    from selenium.webdriver.common.by import By

    files = {f"bounded_{i}.jpg": make_image(1565 + i, size=(64, 48)) for i in range(2)}
    browser.get(stack.web_url + "/")
    browser.execute_script("document.body.dataset.savedResults = '1';")
    choose(browser, tmp_path, files)
    finished_rows(browser, stack, len(files), timeout_s=120)
    batch_id = browser.current_url.split("#batches=")[1]
    key = f"imgclass.results.{batch_id}"
    wait_for(lambda: browser.execute_script("return sessionStorage.getItem(arguments[0])", key), 30,
             "the answers saved")
    forget_on_the_server(stack, batch_id)
    browser.refresh()
    said_lost(browser, batch_id)
    rows = {name: (state, text) for name, state, text in rows_shown(browser)}
    assert [state for state, _ in rows.values()] == ["done", "failed"], rows
    first = browser.find_element(By.CSS_SELECTOR, '#results [data-filename="bounded_0.jpg"]')
    refs = references(reference_model, files, top1_only=True)
    assert_row_shows(first, refs["bounded_0.jpg"], "bounded_0.jpg")
    assert ANSWER_GONE_ROW in rows["bounded_1.jpg"][1], rows


def test_a_file_classified_whose_answer_the_tab_did_not_keep_is_not_said_unclassified_after_the_loss(
        stack, browser, reference_model, tmp_path):
    """Past the answers the tab keeps (or with its storage full), a file it had shown
    classified came back, after a reload that found the batch lost, "not classified:
    ...; choose it again", and was counted among the files "not yet classified": false,
    and choosing it again costs a second classification. Its row is failed (done would
    need its answer) saying it was classified, and the summary counts apart the file
    still queued when the batch was lost and the answer gone; after a second reload too."""
    from selenium.webdriver.common.by import By

    kept, unkept, late = "gone_0.jpg", "gone_1.jpg", "gone_late.jpg"
    files = {name: make_image(1570 + i, size=(64, 48)) for i, name in enumerate([kept, unkept, late])}
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, [late])
    # Held while the others are classified, longer than the page waits for an answer
    # otherwise (its upload is faked done at once); one answer kept, the first row's.
    browser.execute_script("document.body.dataset.answerTimeoutMs = '300000';"
                           "document.body.dataset.savedResults = '1';")
    choose(browser, tmp_path, files)
    wait_for(lambda: "#batches=" in browser.current_url, 30, "the batch in the address")
    batch_id = browser.current_url.split("#batches=")[1]
    wait_for(lambda: [states_shown(browser).get(name) for name in (kept, unkept)] == ["done"] * 2, 120,
             "the files sent first classified")
    results = f"imgclass.results.{batch_id}"
    wait_for(lambda: len(browser.execute_script(
        "return JSON.parse(sessionStorage.getItem(arguments[0]) || '[]')", results)) == 1, 30,
        "the one answer kept")
    with lost_with_one_queued(browser, stack, batch_id, late):
        lost_files = ("and 1 file of it not yet classified will not be: choose it again to have it "
                      "classified; the answer of 1 file of it classified is gone (this tab did not keep it): "
                      "choose the file again to see it")
        for reload in ("first", "second"):
            browser.refresh()
            summary = said_lost(browser, batch_id)
            assert summary.endswith(lost_files), (reload, summary)
            wait_for(lambda: [state for _, state, _ in rows_shown(browser)] == ["done", "failed", "failed"],
                     30, f"the rows after the {reload} reload")
            rows = {name: text for name, _, text in rows_shown(browser)}
            assert_row_shows(browser.find_element(By.CSS_SELECTOR, f'#results [data-filename="{kept}"]'),
                             references(reference_model, files, top1_only=True)[kept], kept)
            assert ANSWER_GONE_ROW in rows[unkept] and "not classified" not in rows[unkept], (reload, rows)
            assert f"{LOST_ROW}; choose it again" in rows[late], (reload, rows)
            assert len(browser.find_elements(By.CSS_SELECTOR, '#results [data-lost="true"]')) == 2


# The batch arguments[0] put in the address (as one sent earlier in this tab), and its
# saved answers made to fill this tab's sessionStorage: the longest that fits, found by
# halving. Whether storage is then full (a one-character write fails).
FILL_STORAGE_WITH_ANSWERS = r"""
  history.replaceState(null, "", "#batches=" + arguments[0]);
  const key = "imgclass.results." + arguments[0];
  const answers = (size) => JSON.stringify([["0".repeat(32), "x".repeat(size), 0.5, [], 0]]);
  let fits = 0, over = 6000000;
  while (over - fits > 1) {
    const size = Math.floor((fits + over) / 2);
    try { sessionStorage.setItem(key, answers(size)); fits = size; } catch { over = size; }
  }
  sessionStorage.setItem(key, answers(fits));
  try { sessionStorage.setItem("x", "1"); } catch { return true; }
  return false;"""


def test_a_batch_being_sent_is_still_known_so_with_storage_full_of_saved_answers(stack, browser, tmp_path):
    """The mark that the tab is still sending a batch (no file of it heard stored yet)
    was written without making room, as the rows are: with the tab's storage full of
    saved answers (up to ~2 MB), the write failed, and a reload then said the batch
    "could not be loaded", its files gone. The answers give way, the oldest batch's first."""
    from selenium.webdriver.common.by import By

    older = "a" * 32
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, ["held.jpg"])  # no file of it stored before the reload
    assert browser.execute_script(FILL_STORAGE_WITH_ANSWERS, older)
    choose(browser, tmp_path, {"held.jpg": make_image(1575, size=(64, 48))})
    # Marked in the same task as the batch joins the address.
    wait_for(lambda: len(browser.current_url.split("#batches=")[1].split(",")) == 2, 30,
             "the batch in the address")
    batch_id = browser.current_url.split("#batches=")[1].split(",")[1]
    assert browser.execute_script(f"return sessionStorage.getItem('imgclass.unconfirmed.{batch_id}')") == "1"
    assert browser.execute_script(f"return sessionStorage.getItem('imgclass.results.{older}')") is None

    browser.refresh()
    wait_for(lambda: rows_shown(browser), 30, "the file saved")
    [(name, state, text)] = rows_shown(browser)
    assert (name, state) == ("held.jpg", "uploading") and "waiting to see whether the server got it" in text
    assert f"batch {batch_id} could not be loaded" not in browser.find_element(By.ID, "summary").text
    assert batch_id in browser.current_url


def test_a_tab_that_gave_a_batch_up_follows_it_again_once_the_tab_sending_it_makes_it_anew(
        stack, browser, reference_model, tmp_path):
    """A duplicated tab gave the batch up (two 404s); that tab's chunk then made the
    batch anew, and the duplicate, told the sends were over, read it and took the file's
    item into its row, "queued", but followed nothing more: the row stayed "queued" for
    ever. Meanwhile, the file the first tab was still sending is not the duplicate's to
    fail: it failed it "choose it again", lost with the batch, though the first tab went
    on to send it."""
    files = {f"remade_{i}.jpg": make_image(1530 + i, size=(64, 48)) for i in range(2)}
    late = "remade_1.jpg"
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, [late])
    browser.execute_script("document.body.dataset.answerTimeoutMs = '300000';")  # held through the loss
    choose(browser, tmp_path, files)
    wait_for(lambda: "#batches=" in browser.current_url, 30, "the batch in the address")
    batch_id = browser.current_url.split("#batches=")[1]
    wait_for(lambda: len(server_items(stack, batch_id)) == 1, 30, "the server to hold the file not held")
    with second_tab(browser) as first:
        wait_for(lambda: states_shown(browser).get(late) == "uploading", 30, "the restored batch")
        forget_on_the_server(stack, batch_id)
        said_lost(browser, batch_id)
        row = next(r for r in rows_shown(browser) if r[0] == late)
        assert row[1] == "uploading" and "uploading in another tab" in row[2], row
        in_tab(browser, first, "window.held = [];")  # its chunk goes, and makes the batch anew
        wait_for(lambda: states_shown(browser)[late] == "done", 60, "the file sent since classified here")
        row = next(r for r in rows_shown(browser) if r[0] == late)
        assert "no longer holds" not in row[2], row


def test_a_tab_that_gave_a_batch_up_fails_what_the_tab_sending_it_did_not_send_once_that_tab_is_gone(
        stack, browser, tmp_path):
    """A duplicated tab that gave the batch up leaves the files the first tab still sends
    to it (above), but goes on asking after that tab: closed, it cannot say it is done,
    and those files then fail as any that a closed sender did not store."""
    files = {f"gone_{i}.jpg": make_image(1535 + i, size=(64, 48)) for i in range(2)}
    late = "gone_1.jpg"
    batch_id = send_holding(browser, stack, tmp_path, files, held=[late])
    first = browser.current_window_handle
    browser.execute_script("window.open(location.href)")
    [second] = [handle for handle in browser.window_handles if handle != first]
    browser.switch_to.window(second)
    wait_for(lambda: states_shown(browser).get(late) == "uploading", 30, "the restored batch")
    forget_on_the_server(stack, batch_id)
    said_lost(browser, batch_id)
    assert states_shown(browser)[late] == "uploading"
    browser.switch_to.window(first)
    browser.close()
    browser.switch_to.window(second)
    wait_for(lambda: states_shown(browser)[late] == "failed", 30, "the held file failed, its sender gone")
    [text] = [text for name, _, text in rows_shown(browser) if name == late]
    assert "not stored: the tab sending it was closed or reloaded; choose it again" in text, text


def test_a_reload_shows_the_batches_again_and_follows_them_to_the_end(stack, browser, reference_model,
                                                                        tmp_path):
    from selenium.webdriver.common.by import By

    # Three chunks, sent in parallel once the first has made the batch, so they may join
    # it in any order; one file is refused, which the server keeps no trace of.
    first = {f"reload_{i}.jpg": make_image(800 + i, size=(64, 48)) for i in range(40)}
    first = {**dict(list(first.items())[:5]), "refused.jpg": b"not an image", **dict(list(first.items())[5:])}
    second = {"reload_later.jpg": make_image(1540)}  # not one of first's images
    browser.get(stack.web_url + "/")

    def results():
        return browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")

    def states():
        return [i.get_attribute("data-state") for i in results()]

    leaving = ("const e = new Event('beforeunload', {cancelable: true});"
               "dispatchEvent(e); return e.defaultPrevented")
    for count, files in ((41, first), (42, second)):
        paths = []
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            paths.append(str(tmp_path / name))
        browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))
        if count == 41:  # three chunks, one after another at first: still sending
            assert browser.execute_script(leaving), "leaving mid-upload should ask first"
        wait_for(lambda n=count: len(states()) == n and "uploading" not in states(), 60, "the uploads",
                 interval=0.05)
    assert not browser.execute_script(leaving), "nothing left to send: leave freely"
    assert browser.current_url.count(",") == 1 and "#batches=" in browser.current_url  # two batches
    shown_before = [i.get_attribute("data-filename") for i in results()]

    browser.refresh()
    wait_for(lambda: len(states()) == 42 and all(s in ("done", "failed") for s in states()), 180,
             "every result after the reload")
    items = results()
    assert [i.get_attribute("data-filename") for i in items] == shown_before
    refs = references(reference_model, {n: d for n, d in {**first, **second}.items() if n != "refused.jpg"},
                      top1_only=True)
    for item in items:
        if item.get_attribute("data-filename") == "refused.jpg":
            assert item.get_attribute("data-state") == "failed" and "not an image" in item.text
            continue
        assert item.get_attribute("data-state") == "done", item.text
        assert_row_shows(item, refs[item.get_attribute("data-filename")], item.get_attribute("data-filename"))


def test_a_reload_that_cuts_uploads_off_shows_each_stored_file_once(stack, browser, tmp_path):
    """Files still being sent when the page is left were not refused by the server: a
    reload shows what the server stored, once each, and says which of the chosen files
    it does not hold, not leaving them out without a word."""
    import requests
    from selenium.webdriver.common.by import By

    paths = []
    for i in range(41):  # three chunks
        (tmp_path / f"cut_{i}.jpg").write_bytes(make_image(900 + i, size=(64, 48)))
        paths.append(str(tmp_path / f"cut_{i}.jpg"))
    browser.get(stack.web_url + "/")
    browser.set_network_conditions(offline=False, latency=5, download_throughput=10_000_000,
                                   upload_throughput=40_000)  # bytes/s: the later chunks take seconds
    browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))
    deadline = time.monotonic() + 60
    while "#batches=" not in browser.current_url and time.monotonic() < deadline:
        time.sleep(0.05)
    batch_id = browser.current_url.split("#batches=")[1]
    # (The page names its batch before sending: wait for the server to hold some of it.)
    wait_for(lambda: requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=30).ok, 60,
             "the first chunk to be stored")
    browser.refresh()  # while the other chunks are still being sent
    browser.delete_network_conditions()

    def stored():  # a chunk received whole just before the reload may still be joining
        return requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=30).json()["items"]

    def settled():  # every row finished, the done ones exactly what the server holds
        shown = rows_shown(browser)
        done = sorted(name for name, state, _ in shown if state == "done")
        return (all(state in ("done", "failed") for _, state, _ in shown)
                and done == sorted(item["filename"] for item in stored()))

    wait_for(settled, 120, "the rows to match what the server stored")
    shown, stored = rows_shown(browser), stored()
    names = [name for name, _, _ in shown]
    stored_names = sorted(item["filename"] for item in stored)
    # Which of the two shows a file twice tells a page that sent it twice (both) from
    # one that drew it twice (the page only).
    assert len(names) == len(set(names)), f"shown twice: {names}; stored: {stored_names}"
    assert not [text for _, _, text in shown if "could not be reached" in text]
    assert sorted(names) == sorted(f"cut_{i}.jpg" for i in range(41))  # every chosen one, once
    assert 0 < len(stored_names) < 41, "the reload came too late or too early to cut anything off"
    assert all("not stored" in text for _, state, text in shown if state == "failed")


def test_a_reload_shows_a_file_whose_upload_failed_with_its_own_reason(stack, browser, tmp_path):
    """Not refused by the server (it may have stored it), a file whose every send found
    no server is not remembered as refused: a reload said its upload had not finished."""
    from selenium.webdriver.common.by import By

    files = {"sent.jpg": make_image(980, size=(64, 48)), "unsent.jpg": make_image(981, size=(64, 48))}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["pass"] + ["unreachable"] * 5,
                                 per_request=1)
    assert "could not be reached" in shown["unsent.jpg"].text
    browser.refresh()

    def rows():
        return {r.get_attribute("data-filename"): (r.get_attribute("data-state"), r.text)
                for r in browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")}

    wait_for(lambda: len(rows()) == 2 and all(state in ("done", "failed") for state, _ in rows().values()),
             60, "both rows after the reload")
    after = rows()
    assert after["sent.jpg"][0] == "done"
    assert after["unsent.jpg"][0] == "failed" and "could not be reached" in after["unsent.jpg"][1]


def test_a_restored_batch_shows_files_that_join_it_later(stack, browser, reference_model):
    """Opened from its address while more files are still being added to it (from
    another tab, or a program): the page shows them as they join."""
    import uuid

    import requests
    from selenium.webdriver.common.by import By

    from common.names import object_key
    from tests.integration.conftest import clients

    # A batch whose one stored image is never sent to the workers: it stays queued,
    # so the page keeps following the batch.
    s3, _, _ = clients(stack)
    batch_id, item_id = uuid.uuid4().hex, "0" * 14 + uuid.uuid4().hex[:18]
    key = object_key(batch_id, item_id, "waiting.jpg")
    s3.put_object(Bucket=stack.settings().input_bucket, Key=key, Body=make_image(950),
                  Metadata={"original-filename": "waiting.jpg", "batch-id": batch_id, "item-id": item_id})
    try:
        browser.get(f"{stack.web_url}/#batches={batch_id}")

        def rows():
            return {r.get_attribute("data-filename"): r for r in
                    browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")}

        deadline = time.monotonic() + 30
        while "waiting.jpg" not in rows() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(rows()) == ["waiting.jpg"]
        later = make_image(951)
        added = requests.post(f"{stack.web_url}/api/jobs", data={"batch_id": batch_id},
                              files={"files": ("later.jpg", later)}, timeout=30)
        assert added.status_code == 202, added.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                "later.jpg" not in rows() or rows()["later.jpg"].get_attribute("data-state") != "done"):
            time.sleep(0.2)
        shown = rows()
        assert list(shown) == ["waiting.jpg", "later.jpg"]
        assert_row_shows(shown["later.jpg"], reference(reference_model, later), "later.jpg")
        assert shown["waiting.jpg"].get_attribute("data-state") == "queued"
    finally:
        s3.delete_object(Bucket=stack.settings().input_bucket, Key=key)


def test_a_batch_link_follows_files_sent_after_those_it_showed_are_done(stack, browser, reference_model):
    """A link opened in another browser while the batch is still being sent: the files it
    knew of all finished before the next came, and it stopped following the batch."""
    import uuid

    import requests
    from selenium.webdriver.common.by import By

    def send(name: str, data: bytes) -> None:
        answer = requests.post(f"{stack.web_url}/api/jobs", data={"batch_id": batch_id, "create": "1"},
                               files={"files": (name, data)}, timeout=30)
        assert answer.status_code == 202, answer.text

    def done_rows() -> list[str]:
        return [name for name, state, _ in rows_shown(browser) if state == "done"]

    batch_id = uuid.uuid4().hex
    first, later = make_image(970), make_image(971)
    send("first.jpg", first)
    wait_for(lambda: [i["state"] for i in server_items(stack, batch_id)] == ["done"], 60, "first.jpg done")
    browser.get(f"{stack.web_url}/#batches={batch_id}")
    wait_for(lambda: done_rows() == ["first.jpg"], 30, "the batch shown, its one file done")
    send("later.jpg", later)
    wait_for(lambda: done_rows() == ["first.jpg", "later.jpg"], 60, "the file sent later, done")
    row = browser.find_element(By.CSS_SELECTOR, '#results [data-filename="later.jpg"]')
    refs = references(reference_model, {"first.jpg": first, "later.jpg": later}, top1_only=True)
    assert_row_shows(row, refs["later.jpg"], "later.jpg")


def test_an_unknown_batch_in_the_address_is_said_and_dropped(stack, browser):
    from selenium.webdriver.common.by import By

    unknown = "0" * 32
    browser.get(f"{stack.web_url}/#batches={unknown}")
    summary = browser.find_element(By.ID, "summary")
    deadline = time.monotonic() + 30
    while "could not be loaded" not in summary.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert summary.text == f"batch {unknown} could not be loaded (unknown here, or expired)"
    assert "#batches=" not in browser.current_url
    # Said too, once, without the id's 32 digits, not only in the summary line.
    said = browser.find_element(By.ID, "announce").get_property("textContent")
    assert said == "a batch in the address could not be loaded (unknown here, or expired)"


# Counts the files of each POST /api/jobs, then sends it on.
COUNT_FILES_PER_POST = UPLOADS_BY_FETCH + """
const realFetch = window.fetch;
window.filesPerPost = [];
window.fetch = async (url, options) => {
  if (url === "/api/jobs") window.filesPerPost.push(options.body.getAll("files").length);
  return realFetch(url, options);
};
"""


def test_the_page_sends_no_more_files_at_once_than_the_server_takes_and_shows_its_names(
        stack, browser, tmp_path):
    """With MAX_FILES_PER_REQUEST=5, a page that always sends 20 at once fails every file.
    And a name the server cleans (a bidi control taken out) must not show as chosen until
    a reload: the output bucket holds the cleaned one."""
    from selenium.webdriver.common.by import By

    paths = []
    for i in range(7):
        name = f"chunk_{i}.jpg" if i else "photo\u202egpj.exe.jpg"
        (tmp_path / name).write_bytes(make_image(700 + i))
        paths.append(str(tmp_path / name))
    browser.get(stack.web_url + "/")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-files-per-request") == "1000"
    # As if the server took 3 files a request (the page reads the limit when it uploads).
    browser.execute_script("document.body.dataset.filesPerRequest = '3';" + COUNT_FILES_PER_POST)
    browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))

    shown = finished_rows(browser, stack, 7, timeout_s=180)
    assert sorted(browser.execute_script("return window.filesPerPost")) == [1, 3, 3]
    assert set(shown) == {f"chunk_{i}.jpg" for i in range(1, 7)} | {"photogpj.exe.jpg"}
    assert all(row.get_attribute("data-state") == "done" for row in shown.values())


def test_a_row_that_joins_a_restored_batch_queued_is_counted(stack, browser):
    """The summary said "0 of 1 classified" beside two rows until the next result came."""
    import uuid

    from selenium.webdriver.common.by import By

    from common.names import object_key
    from tests.integration.conftest import clients

    s3, _, _ = clients(stack)
    batch_id, item_id = uuid.uuid4().hex, "0" * 14 + uuid.uuid4().hex[:18]
    key = object_key(batch_id, item_id, "waiting.jpg")  # stored, never queued: it stays so
    s3.put_object(Bucket=stack.settings().input_bucket, Key=key, Body=make_image(960),
                  Metadata={"original-filename": "waiting.jpg", "batch-id": batch_id, "item-id": item_id})
    try:
        browser.get(f"{stack.web_url}/#batches={batch_id}")
        summary = browser.find_element(By.ID, "summary")
        wait_for(lambda: summary.text == "0 of 1 classified", 30, "the restored batch")
        # From the next poll on, the batch holds a second item, still queued.
        browser.execute_script("""
          const realFetch = window.fetch;
          window.fetch = async (url, options) => {
            const response = await realFetch(url, options);
            if (!String(url).startsWith("/api/jobs/")) return response;
            const body = await response.json();
            body.items.push({...body.items[0], id: "1" + body.items[0].id.slice(1), filename: "joined.jpg"});
            return new Response(JSON.stringify(body), {status: response.status,
                                                       headers: {"Content-Type": "application/json"}});
          };""")
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")) == 2, 30,
                 "the joined row")
        assert summary.text == "0 of 2 classified"
    finally:
        s3.delete_object(Bucket=stack.settings().input_bucket, Key=key)


@contextlib.contextmanager
def waiting_batch(stack, seed: int) -> Iterator[str]:
    """A batch of one image stored and never queued (it stays so), as a page polls it."""
    import uuid

    from common.names import object_key
    from tests.integration.conftest import clients

    s3, _, _ = clients(stack)
    batch_id, item_id = uuid.uuid4().hex, "0" * 14 + uuid.uuid4().hex[:18]
    key = object_key(batch_id, item_id, "waiting.jpg")
    s3.put_object(Bucket=stack.settings().input_bucket, Key=key, Body=make_image(seed),
                  Metadata={"original-filename": "waiting.jpg", "batch-id": batch_id, "item-id": item_id})
    try:
        yield batch_id
    finally:
        s3.delete_object(Bucket=stack.settings().input_bucket, Key=key)


def show_restored(browser, stack, batch_id: str) -> None:
    """Open the page on `batch_id`, and wait until it shows the batch (then polls it)."""
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.web_url}/#batches={batch_id}")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results [data-state]"), 30, "the batch")


# From the next poll on, each answers 3 s late ("slow") or only when given up on ("hang",
# the first one only); window.mostPollsAtOnce counts the polls waiting at once.
WATCH_POLLS = """
const how = arguments[0];
const realFetch = window.fetch;
window.polls = 0; window.pollsAtOnce = 0; window.mostPollsAtOnce = 0;
window.fetch = async (url, options) => {
  if (!String(url).startsWith("/api/jobs/")) return realFetch(url, options);
  window.polls += 1; window.pollsAtOnce += 1;
  window.mostPollsAtOnce = Math.max(window.mostPollsAtOnce, window.pollsAtOnce);
  try {
    if (how === "hang" && window.polls === 1) {
      await new Promise((resolve, reject) => options.signal && options.signal.addEventListener(
        "abort", () => reject(new DOMException("The operation was aborted.", "AbortError"))));
    }
    if (how === "slow") await new Promise((resolve) => setTimeout(resolve, 3000));
    return await realFetch(url, options);
  } finally { window.pollsAtOnce -= 1; }
};
"""


def test_a_reloaded_page_shows_its_batches_though_one_never_answers(stack, browser):
    """Batches asked for one after another: one whose answer never comes would leave the
    page empty, the others never asked for."""
    from selenium.webdriver.common.by import By

    with waiting_batch(stack, 963) as hung, waiting_batch(stack, 964) as shown:
        # Before the page's script runs: the first batch's answer never comes.
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
          const realFetch = window.fetch;
          window.fetch = (url, options) => String(url).endsWith("/api/jobs/HUNG")
            ? new Promise(() => {}) : realFetch(url, options);""".replace("HUNG", hung)})
        browser.get(f"{stack.web_url}/#batches={hung},{shown}")
        rows = (By.CSS_SELECTOR, "#results [data-state]")
        wait_for(lambda: len(browser.find_elements(*rows)) == 1, 30, "the batch that answers")


def test_a_slow_batch_is_polled_once_at_a_time(stack, browser):
    """Asking again every 2 s, answered or not, a page polling a large batch rebuilt
    from S3 after a restart would pile up requests, each a whole rebuild."""
    with waiting_batch(stack, 961) as batch_id:
        show_restored(browser, stack, batch_id)
        browser.execute_script(WATCH_POLLS, "slow")
        wait_for(lambda: browser.execute_script("return window.polls") >= 3, 30, "three polls")
        assert browser.execute_script("return window.mostPollsAtOnce") == 1


def test_a_poll_that_never_answers_is_given_up_on_and_asked_again(stack, browser):
    with waiting_batch(stack, 962) as batch_id:
        show_restored(browser, stack, batch_id)
        browser.execute_script("document.body.dataset.pollTimeoutMs = '1000';")
        browser.execute_script(WATCH_POLLS, "hang")
        wait_for(lambda: browser.execute_script("return window.polls") >= 3, 30, "polls after the hung one")


def test_an_address_edited_in_the_tab_shows_the_batches_it_names(stack, browser):
    """The page went on showing the batches of its old address."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    unknown = "0" * 32
    browser.execute_script(f"location.hash = '#batches={unknown}'")
    wait_for(lambda: "could not be loaded" in browser.find_element(By.ID, "summary").text, 30,
             "the page to load the batch its address names")


def test_files_dropped_anywhere_on_the_page_are_uploaded(stack, browser, reference_model):
    """Dropped beside the drop zone, a file was left to the browser, which opens it in
    the tab: the page and its uploads were gone."""

    data = make_image(970)
    browser.get(stack.web_url + "/")
    assert drop_files(browser, {"dropped.jpg": data})
    shown = finished_rows(browser, stack, 1, timeout_s=60)
    assert_row_shows(shown["dropped.jpg"], reference(reference_model, data), "dropped.jpg")


def spy_on_uploads(browser) -> None:
    """window.keysSent: the X-API-Key of each POST /api/jobs, "" for none."""
    browser.execute_script(UPLOADS_BY_FETCH + """
      const realFetch = window.fetch;
      window.keysSent = [];
      window.fetch = (url, options) => {
        if (url === "/api/jobs") window.keysSent.push((options.headers || {})["X-API-Key"] || "");
        return realFetch(url, options);
      };""")


def test_an_api_key_typed_just_before_a_drop_is_sent(stack, browser, tmp_path):
    """Kept only once the box lost focus, the key would miss files dropped straight after
    typing, and a server that needs one refuse them."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script("localStorage.clear(); document.getElementById('api-key-box').hidden = false;")
    spy_on_uploads(browser)
    browser.find_element(By.ID, "api-key").send_keys("sekrit")  # focus stays in the box
    choose(browser, tmp_path, {"keyed.jpg": make_image(971)})
    finished_rows(browser, stack, 1, timeout_s=60)
    assert browser.execute_script("return window.keysSent") == ["sekrit"]
    browser.execute_script("localStorage.clear();")


def test_an_api_key_a_header_cannot_carry_is_said_to_be_wrong_not_the_server_unreachable(
        stack, browser, tmp_path):
    """A curly quote pasted with the key: fetch refuses the header before sending, and the
    files would be sent again for 75 s, then said to have found no server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(stack.web_url + "/")
    browser.execute_script("localStorage.clear(); document.getElementById('api-key-box').hidden = false;")
    spy_on_uploads(browser)
    browser.find_element(By.ID, "api-key").send_keys("sekrit\u2019", Keys.ENTER)
    choose(browser, tmp_path, {"quoted.jpg": make_image(972)})
    shown = finished_rows(browser, stack, 1, timeout_s=20)
    browser.execute_script("localStorage.clear();")
    assert shown["quoted.jpg"].get_attribute("data-state") == "failed"
    assert "the API key holds a character an HTTP header cannot carry" in shown["quoted.jpg"].text
    assert browser.execute_script("return window.keysSent") == []  # nothing sent


# The contrast of a field's placeholder against the field.
CONTRAST_OF_PLACEHOLDER = LUMINANCE + """
  const a = luminance(getComputedStyle(arguments[0], "::placeholder").color);
  const b = luminance(getComputedStyle(arguments[0]).backgroundColor);
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
"""


def test_a_refused_api_key_is_said_to_be_refused_not_missing(stack, browser, tmp_path):
    """A wrong key typed above is not answered "an API key is required: enter it above",
    as if none had been sent."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      localStorage.clear();
      document.getElementById('api-key-box').hidden = false;
      const realFetch = window.fetch;
      window.fetch = (url, options) => url !== "/api/jobs" ? realFetch(url, options) :  // as api.py refuses
        Promise.resolve(new Response(JSON.stringify({error: "a valid API key is required (X-API-Key header)",
                                                     filename: null}), {status: 401}));""")
    choose(browser, tmp_path, {"keyless.jpg": make_image(973)})
    browser.find_element(By.ID, "api-key").send_keys("wrongkey")
    choose(browser, tmp_path, {"wrong_key.jpg": make_image(974)})
    shown = finished_rows(browser, stack, 2, timeout_s=20)
    browser.execute_script("localStorage.clear();")
    assert "an API key is required: enter it above" in shown["keyless.jpg"].text
    assert "the API key was refused: check it above" in shown["wrong_key.jpg"].text
    # The box is where the fix goes: focused, and marked invalid until typed in.
    key = browser.find_element(By.ID, "api-key")
    assert browser.switch_to.active_element == key and key.get_attribute("aria-invalid") == "true"
    # Why, beside the box and read with it, not only in the rows.
    problem = browser.find_element(By.ID, "api-key-problem")
    assert problem.is_displayed() and problem.text.startswith("the API key was refused")
    assert "api-key-problem" in key.get_attribute("aria-describedby").split()
    # Its placeholder, the only sign a key is needed, reads in the dark theme too (it was 2.4:1).
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    placeholder = browser.execute_script(CONTRAST_OF_PLACEHOLDER, key)
    assert placeholder >= 4.5, placeholder
    key.send_keys("x")
    assert key.get_attribute("aria-invalid") is None and not problem.is_displayed()


def test_the_choose_button_shows_keyboard_focus(stack, browser):
    """The focus ring was drawn around the hint below it, not the button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(stack.web_url + "/")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.execute_script("return document.activeElement.id") == "file-input"
    outline = browser.execute_script(
        "return getComputedStyle(document.querySelector('label.button')).outlineStyle")
    assert outline == "solid"


def test_files_whose_answer_never_comes_are_sent_again_and_classified_once(stack, browser, reference_model,
                                                                           tmp_path):
    """A POST whose answer never comes, nor an error (a connection left half open), must
    not leave every row "uploading" for good and hold the rest of the upload back."""
    files = {f"hung_{i}.jpg": make_image(960 + i, size=(64, 48)) for i in range(2)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["hang"],
                                 setup="document.body.dataset.answerTimeoutMs = '1000';", timeout_s=60)
    assert_classified(shown, files, reference_model)
    assert_stored_once(browser, stack, files)


# Counts the page's POSTs (window.posts) and the most in flight at once (window.mostPosts).
COUNT_POSTS_IN_FLIGHT = """
const realSend = XMLHttpRequest.prototype.send;
window.posts = 0; window.postsInFlight = 0; window.mostPosts = 0;
XMLHttpRequest.prototype.send = function (body) {
  window.posts += 1; window.postsInFlight += 1;
  window.mostPosts = Math.max(window.mostPosts, window.postsInFlight);
  this.addEventListener("loadend", () => { window.postsInFlight -= 1; });
  return realSend.call(this, body);
};
"""


@contextlib.contextmanager
def upload_throttled(browser, bytes_per_s: int) -> Iterator[None]:
    """Chrome's own network throttling of the page's uploads (downloads left fast)."""
    browser.set_network_conditions(offline=False, latency=5, download_throughput=10_000_000,
                                   upload_throughput=bytes_per_s)
    try:
        yield
    finally:
        browser.delete_network_conditions()


# One file a request, a send given up on after 3 s without progress or answer, and
# resends soon after: a throttled upload's timeouts, short enough for a test.
SHORT_SEND_TIMEOUTS = """
  document.body.dataset.filesPerRequest = '1';
  document.body.dataset.answerTimeoutMs = '3000';
  document.body.dataset.stallTimeoutMs = '3000';
  document.body.dataset.resendDelayScale = '0.05';"""


def test_a_slow_upload_that_keeps_going_is_not_cut_off(stack, browser, reference_model, tmp_path):
    """Given 30 s plus its bytes at 50 KB/s, with three sends sharing a 100 KB/s link,
    every chunk after the first would be cut off by the page's own timer, sent again
    four times on top of the others, then said to have found no server: 60 files in 100
    failed. Here with that time cut to 3 s plus the bytes at 50 KB/s, and a link at
    25 KB/s that carries one chunk within it, not three. A send is given up on only
    once its upload stalls (here for 3 s)."""
    files = {f"slow_{i}.jpg": make_image(1000 + i, size=(480, 360)) for i in range(5)}  # ~67 KB each
    browser.get(stack.web_url + "/")
    browser.execute_script(COUNT_POSTS_IN_FLIGHT + SHORT_SEND_TIMEOUTS)
    with upload_throttled(browser, 25_000):
        choose(browser, tmp_path, files)
        # How far the sends have got, while they go, lest nothing seem to move for 75 s.
        summary = browser.execute_script("return document.getElementById('summary')")
        wait_for(lambda: re.search(r"sending \d+\.\d of \d+\.\d MB", summary.text), 20, "the bytes sent")
        shown = finished_rows(browser, stack, len(files), timeout_s=50)
    assert "sending" not in summary.text
    assert {name: row.text for name, row in shown.items() if row.get_attribute("data-state") != "done"} == {}
    assert_classified(shown, files, reference_model)
    assert browser.execute_script("return [window.posts, window.mostPosts]") == [len(files), 3]


# Logs each POST the page sends (window.sends: {loaded, aborted}: the bytes its upload
# had sent, whether it was aborted) and counts them in flight (window.mostPosts).
LOG_SENDS = COUNT_POSTS_IN_FLIGHT + """
window.sends = [];
const countedSend = XMLHttpRequest.prototype.send;
XMLHttpRequest.prototype.send = function (body) {
  const sent = {loaded: 0, aborted: false};
  window.sends.push(sent);
  this.upload.addEventListener("progress", (event) => { sent.loaded = Math.max(sent.loaded, event.loaded); });
  this.addEventListener("abort", () => { sent.aborted = true; });
  return countedSend.call(this, body);
};
"""


def test_uploads_on_one_page_share_its_requests_and_none_waiting_for_a_connection_is_cut_off(
        stack, browser, reference_model, tmp_path):
    """With 3 requests in flight for each upload, three uploads would ask for 9 of the
    browser's 6 connections to the server, and those held back be given up on as stalled,
    having sent nothing, then sent again; on a longer busy link a chunk could use all
    its resends so. The page has 3 in flight across its uploads, and a request not yet
    started is given far longer than one whose upload stalls (here 3 s)."""
    files = [{f"shared_{n}_{i}.jpg": make_image(1040 + 10 * n + i, size=(320, 240)) for i in range(3)}
             for n in range(3)]  # ~27 KB each
    browser.get(stack.web_url + "/")
    browser.execute_script(LOG_SENDS + SHORT_SEND_TIMEOUTS)
    with upload_throttled(browser, 20_000):  # bytes/s: 4 s a file, three at a time
        for upload in files:
            choose(browser, tmp_path, upload)
        shown = finished_rows(browser, stack, 9, timeout_s=55)
    everything = {name: data for upload in files for name, data in upload.items()}
    assert {name: row.text for name, row in shown.items() if row.get_attribute("data-state") != "done"} == {}
    assert_classified(shown, everything, reference_model)
    sends = browser.execute_script("return window.sends")
    assert [send for send in sends if send["aborted"]] == []
    assert browser.execute_script("return [window.posts, window.mostPosts]") == [9, 3]


def test_a_stalled_upload_is_said_to_have_timed_out(stack, browser, tmp_path):
    """A send the page gave up on is not said to have found no server, which would send a
    user with a slow link to look for a fault in the server."""
    browser.get(stack.web_url + "/")
    browser.execute_script("""
      document.body.dataset.stallTimeoutMs = '1000';
      document.body.dataset.resendDelayScale = '0.01';""")
    with upload_throttled(browser, 1):  # byte/s: nothing gets through
        choose(browser, tmp_path, {"stalled.jpg": make_image(1010)})
        shown = finished_rows(browser, stack, 1, timeout_s=30)
    assert "upload timed out: no progress for 1 s (slow or broken connection?)" in shown["stalled.jpg"].text


def test_a_page_back_from_the_back_forward_cache_sends_files_again(stack, browser, reference_model, tmp_path):
    """Left and shown again from the browser's cache (Back), the page still thought it
    was leaving: files whose first send found no server stayed "uploading" for good."""
    back_from_the_cache = """
      window.dispatchEvent(new PageTransitionEvent("pagehide", {persisted: true}));
      window.dispatchEvent(new PageTransitionEvent("pageshow", {persisted: true}));"""
    files = {"bfcache.jpg": make_image(880)}
    shown = upload_failing_first(browser, stack, tmp_path, files, ["unreachable"],
                                 setup=back_from_the_cache, timeout_s=60)
    assert_classified(shown, files, reference_model)


# Counts the event streams open at once (window.mostStreams) and holds back each
# stream's `end` until window.endsHeld is false, so that a stream stays open as
# long as its batch would take with a backlog in the queue.
WATCH_STREAMS = """
const RealEventSource = window.EventSource;
window.openStreams = 0;
window.mostStreams = 0;
window.endsHeld = true;
window.streamEnds = 0;
window.EventSource = class extends RealEventSource {
  constructor(url) {
    super(url);
    window.openStreams += 1;
    window.mostStreams = Math.max(window.mostStreams, window.openStreams);
  }
  addEventListener(type, listener) {
    if (type !== "end") return super.addEventListener(type, listener);
    super.addEventListener("end", async (event) => {
      while (window.endsHeld) await new Promise((resolve) => setTimeout(resolve, 50));
      window.streamEnds += 1;
      listener(event);
    });
  }
  close() {
    if (this.readyState !== RealEventSource.CLOSED) window.openStreams -= 1;
    super.close();
  }
};
"""


def test_uploads_keep_no_more_than_two_event_streams_open(stack, browser, reference_model, tmp_path):
    """An event stream held for each upload until its batch is done takes one of the
    browser's six connections to the server: a seventh upload would wait, the status
    line freeze, and another tab fail to load the page."""
    browser.get(stack.web_url + "/")
    browser.execute_script(WATCH_STREAMS)
    files = {f"stream_{i}.jpg": make_image(890 + i, size=(64, 48)) for i in range(4)}
    for name, data in files.items():  # four uploads, one after another
        choose(browser, tmp_path, {name: data})
    shown = finished_rows(browser, stack, 4, timeout_s=120)
    assert_classified(shown, files, reference_model)
    assert browser.execute_script("return window.mostStreams") == 2
    browser.execute_script("window.endsHeld = false;")


def test_files_that_join_a_batch_after_its_stream_ended_are_followed_while_others_upload(
        stack, browser, reference_model, tmp_path):
    """The stream ends once all that joined the batch are done; a chunk stored after that
    must be followed at once, not when the last chunk is in, or a slow upload shows
    rows "queued" that the server has done."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(WATCH_STREAMS + UPLOADS_BY_FETCH + """
      window.endsHeld = false;
      document.body.dataset.filesPerRequest = '1';
      const realFetch = window.fetch;
      window.lastHeld = true;
      window.fetch = async (url, options) => {
        const name = url === "/api/jobs" ? options.body.get("files").name : "";
        // The second file joins only after the first's stream has ended; the last is held.
        while (name === "join_1.jpg" && window.streamEnds === 0) await new Promise((r) => setTimeout(r, 50));
        while (name === "join_2.jpg" && window.lastHeld) await new Promise((r) => setTimeout(r, 50));
        return realFetch(url, options);
      };""")
    files = {f"join_{i}.jpg": make_image(900 + i, size=(64, 48)) for i in range(3)}
    choose(browser, tmp_path, files)

    def state(name: str) -> str:
        rows = browser.find_elements(By.CSS_SELECTOR, f'#results [data-filename="{name}"]')
        return rows[0].get_attribute("data-state") if rows else ""

    wait_for(lambda: state("join_1.jpg") == "done", 60, "the file that joined after the stream ended")
    assert state("join_2.jpg") == "uploading"
    browser.execute_script("window.lastHeld = false;")
    assert_classified(finished_rows(browser, stack, 3, timeout_s=60), files, reference_model)


def test_a_stream_opened_after_another_ended_is_sent_only_what_finished_since(
        stack, browser, reference_model, tmp_path):
    """Each chunk stored after the batch's stream had ended (its files all done) must not
    open a new stream with no Last-Event-ID, which has the server send every finished
    item of the batch again: a 2,000-file upload in 100 chunks, some 100,000 events.
    Each chunk here joins once the last stream has ended."""
    browser.get(stack.web_url + "/")
    browser.execute_script(WATCH_STREAMS + UPLOADS_BY_FETCH + r"""
      window.endsHeld = false;
      document.body.dataset.filesPerRequest = '1';
      const Watched = window.EventSource;
      window.streamUrls = [];
      window.finishedSent = [];
      window.EventSource = class extends Watched {
        constructor(url) {
          super(url);
          window.streamUrls.push(String(url));
          const sent = (event) => window.finishedSent.push(JSON.parse(event.data).filename);
          this.addEventListener("message", sent);
        }
      };
      const realFetch = window.fetch;
      window.fetch = async (url, options) => {
        const name = url === "/api/jobs" ? options.body.get("files").name : "";
        const n = Number((/^after_(\d)/.exec(name) || [0, 0])[1]);
        while (window.streamEnds < n) await new Promise((r) => setTimeout(r, 50));
        return realFetch(url, options);
      };""")
    files = {f"after_{i}.jpg": make_image(1450 + i, size=(64, 48)) for i in range(3)}
    choose(browser, tmp_path, files)
    assert_classified(finished_rows(browser, stack, 3, timeout_s=60), files, reference_model)
    assert browser.execute_script("return window.streamEnds") == 3
    assert sorted(browser.execute_script("return window.finishedSent")) == sorted(files)
    urls = browser.execute_script("return window.streamUrls")
    assert len(urls) == 3 and "?after=" not in urls[0] and all("?after=" in url for url in urls[1:])


def test_a_batch_named_twice_in_the_address_is_shown_once_and_a_malformed_id_is_said(
        stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    choose(browser, tmp_path, {"twice.jpg": make_image(910)})
    finished_rows(browser, stack, 1, timeout_s=60)
    batch_id = browser.current_url.split("#batches=")[1]
    browser.get("about:blank")  # a new page load, not a change of this page's address
    browser.get(f"{stack.web_url}/#batches={batch_id},{batch_id},../../etc,{batch_id.upper()}")
    summary = browser.find_element(By.ID, "summary")
    wait_for(lambda: "classified" in summary.text, 30, "the restored batch")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")) == 1
    assert summary.text == f"1 of 1 classified · not a batch id, ignored: ../../etc, {batch_id.upper()}"
    assert browser.current_url.endswith(f"#batches={batch_id}")


def test_a_narrow_screen_shows_the_untrained_warning_whole(stack, browser):
    """At 280 px "(MODEL_WEIGHTS=random):" was wider than the banner: cut off, and the
    page scrolled sideways."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 280, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    browser.get(stack.web_url + "/")
    banner = browser.execute_script("""
      const banner = document.getElementById("untrained-banner");
      return {shown: !banner.hidden, fits: banner.scrollWidth <= banner.clientWidth,
              pageFits: document.documentElement.scrollWidth <= window.innerWidth};""")
    assert banner == {"shown": True, "fits": True, "pageFits": True}


# Each visible text's contrast against the first opaque background behind it, and the
# page's own background's luminance.
CONTRASTS = LUMINANCE + """
  const opaque = (colour) => {
    const parts = colour.match(/[\\d.]+/g);
    return parts.length < 4 || Number(parts[3]) > 0;
  };
  const behind = (element) => {
    for (let e = element; e; e = e.parentElement) {
      const colour = getComputedStyle(e).backgroundColor;
      if (opaque(colour)) return colour;
    }
    return "rgb(255, 255, 255)";  // the canvas
  };
  const ratios = {};
  for (const selector of arguments[0]) {
    for (const element of document.querySelectorAll(selector)) {
      if (!element.checkVisibility() || !element.textContent.trim()) continue;
      const [a, b] = [luminance(getComputedStyle(element).color), luminance(behind(element))];
      ratios[selector] = Math.min(ratios[selector] ?? 99, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05));
    }
  }
  return {ratios, page: luminance(behind(document.body))};
"""
TEXTS = ["h1", "#status-line", "#untrained-banner", ".hint", ".button", ".tools .link", ".summary",
         ".result .name", ".result .state", ".result .label", ".result .score", ".untrained-mark",
         ".result .error", ".guesses summary"]


def test_text_keeps_its_contrast_in_the_light_and_the_dark_theme(stack, browser, tmp_path):
    """The page follows the system's dark theme; dark, each text must still read at 4.5:1
    (WCAG 1.4.3), as in the light theme."""
    from selenium.webdriver.common.by import By

    paths = [tmp_path / "contrast.jpg", tmp_path / "broken.jpg"]
    paths[0].write_bytes(make_image(560))
    paths[1].write_bytes(b"not an image")
    browser.get(stack.web_url + "/")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(map(str, paths)))
    finished_rows(browser, stack, 2, timeout_s=120)
    for scheme, page_is_dark in (("light", False), ("dark", True)):
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        seen = browser.execute_script(CONTRASTS, TEXTS)
        assert (seen["page"] < 0.05) == page_is_dark, (scheme, seen["page"])
        assert set(seen["ratios"]) == set(TEXTS), (scheme, set(TEXTS) - set(seen["ratios"]))
        weak = {selector: round(r, 2) for selector, r in seen["ratios"].items() if r < 4.5}
        assert weak == {}, scheme


def test_a_touch_screen_is_offered_images_only(stack, browser):
    """A phone has no folder picker (iOS) or one that ignores webkitdirectory (Android),
    and nothing to drop: "Choose a folder" there would pick files one at a time."""
    from selenium.webdriver.common.by import By

    def shown() -> dict:
        browser.get(stack.web_url + "/")
        labels = browser.find_elements(By.CSS_SELECTOR, "#drop-zone label")
        return {label.get_attribute("textContent"): label.is_displayed() for label in labels}

    with_mouse = shown()
    assert with_mouse == {"Choose images…": True, "Choose a folder…": True}
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    try:
        assert shown() == {"Choose images…": True, "Choose a folder…": False}
        assert "Drop images" not in browser.find_element(By.ID, "drop-zone").text
    finally:
        browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})


# The count's timers: announce.js sets one (to call refreshSummaryNow) for when the count
# is next due. Each is kept as [when it was set, when it is to fire], by the page's own
# clock, and those neither fired nor cleared are counted: what the page asks for,
# which no load on the machine can make late, where timing what it says could.
RECORD_COUNT_TIMERS = """
  window.countTimers = [];
  window.countTimersPending = new Set();
  const realSetTimeout = window.setTimeout, realClearTimeout = window.clearTimeout;
  window.setTimeout = function (fn, ms, ...rest) {
    if (typeof fn !== "function" || fn.name !== "refreshSummaryNow") return realSetTimeout(fn, ms, ...rest);
    const now = Date.now();
    window.countTimers.push([now, now + Math.max(Number(ms) || 0, 0)]);
    const id = realSetTimeout(() => { window.countTimersPending.delete(id); fn(...rest); }, ms);
    window.countTimersPending.add(id);
    return id;
  };
  window.clearTimeout = function (id) {
    window.countTimersPending.delete(id);
    return realClearTimeout(id);
  };"""


def repeats_asked(browser, said_at: list[float]) -> list[float]:
    """For each time a count was said (`said_at`, by the page's Date.now()), how long after
    it the page set the count's next timer to fire: the timer it set as it said it, the
    last one set by then (the live region's observer runs just after)."""
    timers = browser.execute_script("return window.countTimers")
    return [[fire - set_at for set_at, fire in timers if set_at <= when][-1] for when in said_at]


def record_announcements(browser):
    """The live region screen readers hear; each text it is given from now on is kept in
    `window.announced`."""
    from selenium.webdriver.common.by import By

    announce = browser.find_element(By.ID, "announce")
    browser.execute_script("""
      window.announced = [];
      new MutationObserver(() => window.announced.push(arguments[0].textContent))
        .observe(arguments[0], {childList: true, characterData: true, subtree: true});""", announce)
    return announce


def last_announced(browser) -> str:
    """The last text record_announcements kept, "" before any."""
    said = browser.execute_script("return window.announced")
    return said[-1] if said else ""


def test_screen_readers_hear_the_first_failure_at_once_and_the_summary_at_the_end(stack, browser, tmp_path):
    """A live region rewritten at each result makes 150 announcements for 150 files; said
    only at the end, 500 files give 24 s of silence, and a refused API key none. So: the
    first failure with its reason, the count every 15 s, the end."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    assert browser.find_element(By.ID, "summary").get_attribute("aria-live") is None
    announce = record_announcements(browser)
    files = {f"said_{i}.jpg": make_image(920 + i, size=(64, 48)) for i in range(3)}
    began = time.monotonic()
    choose(browser, tmp_path, {**files, "bad.jpg": b"not an image at all"})
    finished_rows(browser, stack, 4, timeout_s=60)
    final = "3 of 4 classified, 1 failed"
    wait_for(lambda: browser.execute_script("return window.announced").count(final) == 1, 10, "the end")
    said = browser.execute_script("return window.announced")
    # The files chosen, at once: the first count comes 15 s later.
    assert said[0] == "Sending 4 files", said
    assert re.fullmatch(r"\d of 4 classified, 1 failed\. bad\.jpg: .*(JPEG|image).*", said[1]), said
    assert said[-1] == final
    # Between them, only counts, at most one each 15 s.
    assert all(re.fullmatch(r"\d of 4 classified(, 1 failed)?", s) for s in said[2:-1]), said
    assert len(said) <= 3 + (time.monotonic() - began) // 15, said
    assert announce.get_attribute("aria-live") == "polite"
    # "(2/4) Image classification" while under way, then how it ended.
    assert browser.title == "Done: 3 classified, 1 failed · Image classification"


def test_screen_readers_hear_a_long_name_cut_between_characters_as_seen(stack, browser):
    """A failure's file name said whole can run to 180 characters; cut through a flag, it
    reads as "regional indicator symbol letter F"."""
    browser.get(stack.web_url + "/")
    record_announcements(browser)
    name = "a" * 39 + "\U0001f1eb\U0001f1f7" + "b" * 150 + "_the_end.jpg"  # a flag, as the 40th
    assert drop_files(browser, {name: b"not an image at all"})
    said = wait_for(lambda: [t for t in browser.execute_script("return window.announced") if "failed" in t],
                    30, "the failure, said")
    assert said[0].startswith("0 of 1 classified, 1 failed. " + "a" * 39 + "\U0001f1eb\U0001f1f7…"), said
    assert "_the_end.jpg: " in said[0] and name not in said[0]


def test_screen_readers_hear_the_count_while_files_wait_for_a_worker(stack, browser, tmp_path):
    """Said only when a row changes, the count leaves files waiting for a worker with 24 s
    of silence from a cold start. Their waiting is faked in the page's polls (its event
    stream off), and the count is due every second here."""
    browser.get(stack.web_url + "/")
    browser.execute_script(r"""
      document.body.dataset.announceEveryMs = '1000';
""" + polls_answered_as('Object.assign(item, { state: "queued", label: null, top5: [] });')
                           + RECORD_COUNT_TIMERS)
    record_announcements(browser)
    choose(browser, tmp_path, {f"waits_{i}.jpg": make_image(930 + i) for i in range(2)})
    # Said, and said again while they still wait, not once only at first.
    said = wait_for(lambda: len(browser.execute_script("return window.announced")) >= 3 and
                    browser.execute_script("return window.announced"), 20, "the count, twice")
    assert said[:3] == ["Sending 2 files", "0 of 2 classified", "0 of 2 classified"], said
    # Once they are classified, the end is said once: no timer left says it again.
    browser.execute_script("window.fetch = window.realFetchForTest;")
    final = "2 of 2 classified"
    wait_for(lambda: final in browser.execute_script("return window.announced"), 30, "the end")
    assert browser.execute_script("return window.countTimers.length") >= 2  # the timers were seen
    assert browser.execute_script("return window.countTimersPending.size") == 0, "a timer would say it again"
    assert browser.execute_script("return window.announced").count(final) == 1


def test_screen_readers_hear_how_far_a_slow_upload_has_got(stack, browser, tmp_path):
    """"sending x of y MB" in the summary alone leaves screen readers on a slow link with
    "0 of 1 classified" and nothing of the bytes going out."""
    browser.get(stack.web_url + "/")
    browser.execute_script("document.body.dataset.announceEveryMs = '1000';")
    record_announcements(browser)
    big = make_image(1070, size=(1200, 900))
    with upload_throttled(browser, len(big) // 4):  # about 4 s
        choose(browser, tmp_path, {"slow.jpg": big})
        said = wait_for(lambda: [text for text in browser.execute_script("return window.announced")
                                 if "sending" in text], 20, "the MB sent, said")
    mb = f"{len(big) / 1048576:.1f}"
    assert re.fullmatch(rf"0 of 1 classified, sending \d+\.\d of {re.escape(mb)} MB", said[0]), said
    finished_rows(browser, stack, 1, timeout_s=60)


# Each "sending x of y MB" the summary says, as [x, y], in window.sendings.
RECORD_SENDINGS = """
  window.sendings = [];
  const summary = document.getElementById('summary');
  new MutationObserver(() => {
    const found = summary.textContent.match(/sending ([\\d.]+) of ([\\d.]+) MB/);
    if (found) window.sendings.push([Number(found[1]), Number(found[2])]);
  }).observe(summary, {childList: true, characterData: true, subtree: true});"""


def test_the_mb_sent_only_grow_out_of_the_uploads_whole_size(stack, browser, tmp_path):
    """Of the requests in flight alone, "sending x of y MB" would go backwards as each ends
    ("3.9 of 9.3", then "2.1 of 7.2") and never say the upload's 17 MB."""
    browser.get(stack.web_url + "/")
    browser.execute_script("""
      document.body.dataset.filesPerRequest = '1';""" + RECORD_SENDINGS)
    files = {f"part_{i}.jpg": make_image(1090 + i, size=(1200, 900)) for i in range(4)}
    with upload_throttled(browser, 600_000):
        choose(browser, tmp_path, files)
        finished_rows(browser, stack, 4, timeout_s=90)
    seen = browser.execute_script("return window.sendings")
    assert len(seen) > 3, seen
    whole = sum(map(len, files.values())) / 1048576
    assert {size for _, size in seen} == {round(whole, 1)}, seen
    sent = [x for x, _ in seen]
    assert sent == sorted(sent), repr(seen)[:3000]


# Each answer to an upload request is taken 3 s after it came, as a server storing a
# large chunk answers; the summary's texts, in window.summaries.
ANSWERS_TAKEN_LATE = """
  window.summaries = [];
  const summary = document.getElementById('summary');
  new MutationObserver(() => window.summaries.push(summary.textContent))
    .observe(summary, {childList: true, characterData: true, subtree: true});
  window.XMLHttpRequest = class extends window.XMLHttpRequest {
    set onload(handler) { super.onload = (event) => setTimeout(() => handler.call(this, event), 3000); }
    get onload() { return super.onload; }
  };"""


def test_a_request_sent_whole_and_not_yet_answered_is_said_to_be_stored(stack, browser, tmp_path):
    """A chunk of 1,000 files is sent in seconds and stored in ~30: "sending 0.1 of 0.1
    MB" all that time looked like a page that had stopped."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(ANSWERS_TAKEN_LATE)
    choose(browser, tmp_path, {"stored_slowly.jpg": make_image(1099)})
    said = wait_for(lambda: [text for text in browser.execute_script("return window.summaries")
                             if "the server is storing the files" in text], 20, "the files said to be stored")
    assert re.search(r"sent \d+\.\d MB; the server is storing the files", said[0]), said
    finished_rows(browser, stack, 1, timeout_s=60)
    assert "storing" not in browser.find_element(By.ID, "summary").text


# The page's first POST /api/jobs is sent for real (its files stored), and its answer
# taken for a 503 that stored nothing, to send again: by a real XMLHttpRequest, whose
# upload progress the MB sent are made of.
FIRST_POST_ANSWERED_BUSY = """
  window.busyPosts = 1;
  window.XMLHttpRequest = class extends window.XMLHttpRequest {
    open(method, url) {
      this.busy = url === "/api/jobs" && window.busyPosts > 0;
      if (this.busy) window.busyPosts -= 1;
      return super.open(method, url);
    }
    get status() { return this.busy ? 503 : super.status; }
    get responseText() {
      return this.busy ? JSON.stringify({error: "not stored: the web tier is stopping; send this file again",
                                         code: "busy", filename: null, items: [], rejected: []})
        : super.responseText;
    }
  };"""


def test_the_mb_sent_never_go_back_when_a_chunk_is_sent_again(stack, browser, tmp_path):
    """A chunk answered 503 was counted answered, then taken back: the MB sent went back
    by its size ("0.4 of 0.8 MB", then "0.0 of 0.8") at each resend. What went stays
    sent, and the size grows by the bytes to send again."""
    browser.get(stack.web_url + "/")
    browser.execute_script(FIRST_POST_ANSWERED_BUSY + """
      document.body.dataset.filesPerRequest = '1';
      document.body.dataset.resendDelayScale = '0.05';""" + RECORD_SENDINGS)
    files = {f"again_{i}.jpg": make_image(1095 + i, size=(1200, 900)) for i in range(2)}
    with upload_throttled(browser, 400_000):  # about a second a file
        choose(browser, tmp_path, files)
        shown = finished_rows(browser, stack, 2, timeout_s=90)
    assert browser.execute_script("return window.busyPosts") == 0
    assert all(row.get_attribute("data-state") == "done" for row in shown.values())
    seen = browser.execute_script("return window.sendings")
    sent = [x for x, _ in seen]
    assert sent == sorted(sent), repr(seen)[:3000]
    whole = sum(map(len, files.values()))
    assert {size for _, size in seen} == {round(whole / 1048576, 1),
                                          round((whole + len(files["again_0.jpg"])) / 1048576, 1)}, seen


def test_files_refused_together_are_heard_with_a_reason_and_so_is_a_later_failure(stack, browser, tmp_path):
    """Each row refused updates the summary: the first one's reason must not be replaced
    at once by the last one's bare count, and never heard."""
    browser.get(stack.web_url + "/")
    record_announcements(browser)
    choose(browser, tmp_path, {f"junk_{i}.jpg": b"not an image %d" % i for i in range(3)})
    finished_rows(browser, stack, 3, timeout_s=60)
    said = wait_for(lambda: browser.execute_script("return window.announced"), 10, "an announcement")
    assert re.fullmatch(r"0 of 3 classified, 3 failed\. junk_\d\.jpg: .+", said[-1]), said
    # A later upload's first failure is said too, with its own reason.
    choose(browser, tmp_path, {"later.jpg": b"not an image either"})
    finished_rows(browser, stack, 4, timeout_s=60)
    said = wait_for(lambda: [text for text in browser.execute_script("return window.announced")
                             if "later.jpg" in text], 10, "the later failure")
    assert re.fullmatch(r"0 of 4 classified, 4 failed\. later\.jpg: .+", said[-1]), said


def test_the_status_line_says_when_its_figures_are_old(stack, browser):
    """/api/status says so while AWS does not answer its refresh; the page showed the old
    figures as if they were current."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script("""
      const realFetch = window.fetch;
      window.fetch = async (url, options) => {
        const response = await realFetch(url, options);
        if (url !== "/api/status") return response;
        const body = await response.json();
        body.errors = ["AWS has not answered for 42 s: these figures are that old"];
        return new Response(JSON.stringify(body), {headers: {"Content-Type": "application/json"}});
      };""")
    line = browser.find_element(By.ID, "status-line")
    wait_for(lambda: "AWS has not answered for 42 s" in line.text, 10, "the status line")
    assert line.text.startswith("queue: ")


def test_the_status_line_says_how_many_running_instances_serve(stack, browser):
    """An instance runs well before its worker serves (its model loading, a boot): "1
    running, 0 starting" while nothing is answered looks stuck. Said only while they
    differ."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script("""
      const realFetch = window.fetch;
      window.serving = 1;
      window.fetch = async (url, options) => {
        const response = await realFetch(url, options);
        if (url !== "/api/status") return response;
        const body = await response.json();
        body.instances = {...body.instances, running: 2};
        body.instances_total = window.total ?? 2;
        body.workers_serving = window.serving;
        if (window.queued) body.queue = {...body.queue, visible: window.queued, in_flight: 0};
        return new Response(JSON.stringify(body), {headers: {"Content-Type": "application/json"}});
      };""")
    line = browser.find_element(By.ID, "status-line")
    wait_for(lambda: "instances: 2 running (1 of them serving), 0 starting" in line.text, 10,
             "the status line")
    browser.execute_script("window.serving = 2;")
    wait_for(lambda: "instances: 2 running, 0 starting" in line.text, 10, "the status line, all serving")
    assert "workers are starting" not in line.text
    # Images queued and none serving yet: said plainly first, as rows that all say
    # "queued" tell nothing of workers on their way.
    browser.execute_script("window.serving = 0; window.queued = 3;")
    wait_for(lambda: line.text.startswith("workers are starting: queued images wait for the first · "
                                          "queue: 3 waiting"), 10, "the status line, none serving")
    # None launched: the web tier cannot know whether a controller runs to launch one.
    browser.execute_script("window.total = 0;")
    wait_for(lambda: line.text.startswith("waiting for a worker: none is running yet · queue: 3 waiting"),
             10, "the status line, none launched")


def test_the_status_line_says_when_the_server_stops_answering_and_asks_once_at_a_time(stack, browser):
    """A hung server never answers: the line must not keep its old figures as if current,
    nor a request every 2 s pile up behind the first."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    line = browser.find_element(By.ID, "status-line")
    wait_for(lambda: line.text.startswith("queue: "), 10, "the first figures")
    browser.execute_script("""
      document.body.dataset.statusTimeoutMs = "3000";
      const realFetch = window.fetch;
      window.statusAsked = 0; window.statusAtOnce = 0; window.mostStatusAtOnce = 0;
      window.fetch = async (url, options) => {
        if (url !== "/api/status") return realFetch(url, options);
        window.statusAsked += 1; window.statusAtOnce += 1;
        window.mostStatusAtOnce = Math.max(window.mostStatusAtOnce, window.statusAtOnce);
        try {
          await new Promise((resolve, reject) => options.signal && options.signal.addEventListener(
            "abort", () => reject(new DOMException("The operation was aborted.", "AbortError"))));
        } finally { window.statusAtOnce -= 1; }
      };""")
    wait_for(lambda: "the server has not answered since" in line.text, 15, "the line to say so")
    wait_for(lambda: browser.execute_script("return window.statusAsked") >= 2, 15, "a second request")
    assert browser.execute_script("return window.mostStatusAtOnce") == 1


def test_a_reload_after_a_lost_answer_shows_the_files_the_server_stored(stack, browser, tmp_path):
    """The page put its batch in the address only once an answer said a file was
    stored: reloaded after the first answer was lost, it showed nothing of what the
    server held and went on classifying."""

    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["lost"])
    choose(browser, tmp_path, {f"unseen_{i}.jpg": make_image(940 + i, size=(64, 48)) for i in range(2)})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the lost answer")
    batch_id = browser.current_url.split("#batches=")[1]

    wait_for(lambda: len(server_items(stack, batch_id)) == 2, 30, "the server to hold both files")
    browser.refresh()  # before the page sends them again
    shown = finished_rows(browser, stack, 2, timeout_s=60)
    assert set(shown) == {"unseen_0.jpg", "unseen_1.jpg"}
    assert all(row.get_attribute("data-state") == "done" for row in shown.values())


def rows_shown(browser) -> list[tuple[str, str, str]]:
    """The page's rows, in order: (file name, state, text)."""
    from selenium.webdriver.common.by import By

    return [(r.get_attribute("data-filename"), r.get_attribute("data-state"), r.text)
            for r in browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")]


def saved_tokens(browser, batch_id: str) -> dict[str, str]:
    """The token this tab saved for each file of `batch_id` not yet heard stored, by name."""
    saved = browser.execute_script(f"return JSON.parse(sessionStorage.getItem('imgclass.shown.{batch_id}'))")
    return {row["name"]: row.get("token") for row in saved if row.get("unsent")}


def test_a_reload_before_anything_was_stored_shows_the_files_and_takes_one_that_comes_late(
        stack, browser, tmp_path):
    """A reload before the server holds any file of the batch must not drop it without a
    word, as the tab saved its files: they are shown waiting while the batch is watched
    for them, then "not stored" (failed at once, "choose it again", a file that then
    comes would be sent twice). A chunk that reaches the server after the reload joins
    its row, found by its token, at once and at the next reload. (The name, with a
    bidi control, is shown cleaned as the server stores it.)"""
    import requests
    from selenium.webdriver.common.by import By

    late_name = "late\u202e.jpg"  # stored as "late.jpg"
    files = {"never.jpg": make_image(950, size=(64, 48)), late_name: make_image(951, size=(64, 48))}
    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["unreachable"] * 5)  # its resends too
    choose(browser, tmp_path, files)
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the failed send")
    batch_id = browser.current_url.split("#batches=")[1]
    token = saved_tokens(browser, batch_id).get("late.jpg")
    assert token
    browser.refresh()  # the server knows no such batch
    assert requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10).status_code == 404

    def states() -> list[tuple[str, str]]:
        return [(name, state) for name, state, _ in rows_shown(browser)]

    wait_for(lambda: len(rows_shown(browser)) == 2, 30, "the saved files")
    assert states() == [("never.jpg", "uploading"), ("late.jpg", "uploading")]
    assert all("waiting to see whether the server got it" in text for _, _, text in rows_shown(browser))
    assert "failed" not in browser.find_element(By.ID, "summary").text
    assert browser.current_url.endswith(f"#batches={batch_id}")

    # The chunk as the page sent it, received whole before the reload cut its answer off.
    late = requests.post(f"{stack.web_url}/api/jobs", files={"files": (late_name, files[late_name])},
                         data={"batch_id": batch_id, "create": "1", "tokens": token}, timeout=30)
    assert late.status_code == 202, late.text
    wait_for(lambda: dict(states()).get("late.jpg") in ("queued", "done"), 30,
             "the late file to join its row")
    assert [name for name, _ in states()] == ["never.jpg", "late.jpg"]
    browser.execute_script("document.body.dataset.unsentWatchMs = '500';")  # the watch over
    wait_for(lambda: dict(states())["never.jpg"] == "failed", 30, "the file never stored failed")
    assert "not stored" in rows_shown(browser)[0][2]

    browser.refresh()
    browser.execute_script("document.body.dataset.unsentWatchMs = '500';")
    wait_for(lambda: ("never.jpg", "failed") in states(), 30, "the batch after the second reload")
    shown = rows_shown(browser)
    assert [(name, state) for name, state, _ in shown if state == "failed"] == [("never.jpg", "failed")]
    assert [name for name, _, _ in shown] == ["never.jpg", "late.jpg"]


# Before the page's script runs: its first GET /api/jobs/<id> in this tab is answered as
# for a batch made but still empty (a chunk's files not yet stored), later ones really.
EMPTY_BATCH_ONCE = """
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (String(url).startsWith("/api/jobs/") && !sessionStorage.getItem("test.emptyOnce")) {
    sessionStorage.setItem("test.emptyOnce", "1");
    const body = {batch_id: String(url).split("/")[3], items: [], untrained: false};
    return Promise.resolve(new Response(JSON.stringify(body), {status: 200,
                                        headers: {"Content-Type": "application/json"}}));
  }
  return realFetch(url, options);
};
"""


def test_a_batch_the_server_holds_still_empty_keeps_its_files_for_the_next_reload(stack, browser, tmp_path):
    """Found empty at a reload, the batch was taken for one that held a file: the next
    reload, which found no such batch, said it had expired and dropped its files."""
    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["unreachable"] * 5)  # its resends too
    choose(browser, tmp_path, {"empty.jpg": make_image(952, size=(64, 48))})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the failed send")
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": EMPTY_BATCH_ONCE})
    browser.refresh()
    wait_for(lambda: rows_shown(browser), 30, "the saved file, the batch found empty")
    [(name, state, text)] = rows_shown(browser)  # waiting, while the batch is watched for it
    assert (name, state) == ("empty.jpg", "uploading") and "waiting to see whether the server got it" in text
    browser.refresh()
    browser.execute_script("document.body.dataset.unsentWatchMs = '500';")
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["failed"], 30,
             "the saved file, the batch not found")
    [(name, state, text)] = rows_shown(browser)
    assert (name, state) == ("empty.jpg", "failed") and "not stored" in text, text


def drop_files(browser, files: dict[str, bytes]) -> bool:
    """Drop `files` (any names, even those no file system holds) on the page's heading,
    once the page's script has run; whether the page took the drop."""
    import base64

    from selenium.webdriver.common.by import By

    # The page's script has run (its first status read is in): its listeners are there.
    status = browser.find_element(By.ID, "status-line")
    wait_for(lambda: status.text != "Connecting…", 30, "the page's script to run")
    encoded = [[name, base64.b64encode(data).decode()] for name, data in files.items()]
    return browser.execute_script("""
      const files = new DataTransfer();
      for (const [name, data] of arguments[0]) {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        files.items.add(new File([bytes], name, {type: "image/jpeg"}));
      }
      const drop = new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true});
      document.querySelector("h1").dispatchEvent(drop);
      return drop.defaultPrevented;""", encoded)


def test_a_chosen_folder_uploads_its_images_and_tells_files_of_one_name_apart(
        stack, browser, reference_model, tmp_path):
    """A folder can be chosen, and two "same.jpg" from two subfolders are not two rows
    alike. What is not an image is skipped, said so."""
    from selenium.webdriver.common.by import By

    folder = tmp_path / "holiday"
    files = {"first.jpg": make_image(1020, size=(64, 48)),
             "day one, with a rather long name/same.jpg": make_image(1021, size=(64, 48)),
             "day2/same.jpg": make_image(1022, size=(64, 48)), "day2/notes.txt": b"not an image"}
    browser.get(stack.web_url + "/")
    choose_folder(browser, folder, files)
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["done"] * 3, 60, "the folder's images done")
    shown = browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")
    paths = sorted((row.get_attribute("data-filename"), row.get_attribute("data-path") or "",
                    row.find_element(By.CSS_SELECTOR, ".path").text) for row in shown)
    assert paths == [("first.jpg", "", ""), ("same.jpg", "holiday/day one, with a rather long name/same.jpg",
                      "in holiday/day one, with a rather long name/"),
                     ("same.jpg", "holiday/day2/same.jpg", "in holiday/day2/")]
    refs = references(reference_model, {n: d for n, d in files.items() if n.endswith(".jpg")}, top1_only=True)
    for row in shown:
        path = row.get_attribute("data-path") or "holiday/first.jpg"
        assert_row_shows(row, refs[path[8:]], path)
    summary = browser.find_element(By.ID, "summary").text
    assert "1 file in the folder skipped, not images: holiday/day2/notes.txt" in summary
    # At a phone's width each name is on one line: the path beside it takes the room, and
    # "same.jpg" would break into "sam", "e.jp", "g".
    size = browser.get_window_size()
    browser.set_window_size(320, size["height"])
    try:
        lines = browser.execute_script("""
          return [...document.querySelectorAll("#results .name")].map(name => {
            const range = document.createRange();
            range.selectNodeContents(name);
            return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
          });""")
        assert lines == [1, 1, 1], lines
    finally:
        browser.set_window_size(size["width"], size["height"])
    browser.refresh()  # the paths are shown again
    wait_for(lambda: len(rows_shown(browser)) == 3, 30, "the rows after a reload")
    assert sorted(e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .path")) == [
        "", "in holiday/day one, with a rather long name/", "in holiday/day2/"]


def test_hidden_files_and_folders_in_a_folder_are_skipped_and_counted(stack, browser, tmp_path):
    """A folder's hidden files are not uploaded: .hidden.jpg, .thumbs/x.jpg, and the
    "._a.jpg" twin macOS writes beside each photo on a USB stick, which would fail "not
    an image", one failed row per photo."""
    from selenium.webdriver.common.by import By

    folder = tmp_path / "stick"
    files = {"a.jpg": make_image(1070, size=(64, 48)), "sub/b.jpg": make_image(1071, size=(64, 48)),
             ".hidden.jpg": make_image(1072, size=(64, 48)), ".thumbs/x.jpg": make_image(1073, size=(64, 48)),
             "._a.jpg": b"\0\x05\x16\x07" + b"\0" * 100}
    browser.get(stack.web_url + "/")
    choose_folder(browser, folder, files)
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["done"] * 2, 60, "the folder's images done")
    assert sorted(name for name, _, _ in rows_shown(browser)) == ["a.jpg", "b.jpg"]
    summary = browser.find_element(By.ID, "summary").text
    assert "3 files and folders in the folder skipped, hidden: " in summary, summary
    for hidden in ("stick/._a.jpg", "stick/.hidden.jpg", "stick/.thumbs/"):
        assert hidden in summary, summary


def test_a_folders_skipped_files_are_said_until_the_next_upload(stack, browser, tmp_path):
    """Each folder's "files in the folder skipped" must not stay in the summary line, or
    they pile up across uploads."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    for name in ("first", "second"):
        choose_folder(browser, tmp_path / name, {f"{name}.jpg": make_image(1080 + len(name), size=(64, 48)),
                                                 f"{name}.txt": b"not an image"})
        notice = f"skipped, not images: {name}/{name}.txt"
        wait_for(lambda notice=notice: notice in browser.find_element(By.ID, "summary").text,
                 30, f"the {name} folder's notice")
    summary = browser.find_element(By.ID, "summary").text
    assert "first/first.txt" not in summary and summary.count("skipped") == 1, summary
    choose(browser, tmp_path, {"loose.jpg": make_image(1090, size=(64, 48))})  # files, not a folder
    wait_for(lambda: "skipped" not in browser.find_element(By.ID, "summary").text, 30, "the notice gone")


# Drops arguments[0], a tree {name: base64 of an image | null for a file that cannot be
# read | {tree}}, as its FileSystemEntry tree; each folder gives its entries two at a time,
# each file its File after window.fileDelayMs (window.mostFileReads: the most read at once).
DROP_TREE = """
window.fileReads = 0;
window.mostFileReads = 0;
function entry(name, value, parent) {
  const fullPath = parent + "/" + name;
  if (value === null || typeof value === "string") {
    return {name, fullPath, isFile: true, isDirectory: false, file(done, failed) {
      if (value === null) { setTimeout(() => failed(new DOMException("gone", "NotFoundError"))); return; }
      const bytes = Uint8Array.from(atob(value), (c) => c.charCodeAt(0));
      window.fileReads += 1;
      window.mostFileReads = Math.max(window.mostFileReads, window.fileReads);
      setTimeout(() => {
        window.fileReads -= 1;
        done(new File([bytes], name, {type: name.endsWith(".jpg") ? "image/jpeg" : ""}));
      }, window.fileDelayMs || 0);
    }};
  }
  const children = Object.entries(value).map(([n, v]) => entry(n, v, fullPath));
  return {name, fullPath, isFile: false, isDirectory: true, createReader() {
    let at = 0;
    return {readEntries(done) { setTimeout(() => { done(children.slice(at, at + 2)); at += 2; }); }};
  }};
}
const items = Object.entries(arguments[0]).map(([name, value]) =>
  ({kind: "file", webkitGetAsEntry: () => entry(name, value, "")}));
const drop = new Event("drop", {bubbles: true, cancelable: true});
Object.defineProperty(drop, "dataTransfer", {value: {items, files: []}});
document.querySelector("h1").dispatchEvent(drop);
return drop.defaultPrevented;
"""


def test_a_dropped_folder_uploads_the_images_in_it_and_its_subfolders(stack, browser):
    """A dropped folder is not one failed row, "the file could not be read: moved or
    deleted since it was chosen?"."""
    import base64

    from selenium.webdriver.common.by import By

    def image(seed: int) -> str:
        return base64.b64encode(make_image(seed, size=(64, 48))).decode()

    tree = {"loose.jpg": image(1030),
            "trip": {"a.jpg": image(1031), "b.jpg": image(1032), "c.txt": image(1033), "gone.jpg": None,
                     ".thumbs": {"x.jpg": image(1036)},  # hidden: skipped, not even read
                     "deeper": {"a.jpg": image(1034), "Thumbs.db": image(1035)}}}
    browser.get(stack.web_url + "/")
    status = browser.find_element(By.ID, "status-line")
    wait_for(lambda: status.text != "Connecting…", 30, "the page's script to run")
    assert browser.execute_script(DROP_TREE, tree)
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["done"] * 4, 60, "the dropped images done")
    rows = [(row.get_attribute("data-filename"), row.get_attribute("data-path") or "")
            for row in browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")]
    assert rows == [("loose.jpg", ""), ("a.jpg", "trip/a.jpg"), ("b.jpg", ""), ("a.jpg", "trip/deeper/a.jpg")]
    summary = browser.find_element(By.ID, "summary").text
    assert ("3 files and folders in the folder skipped, hidden or not images: "
            "trip/.thumbs/, trip/c.txt, trip/deeper/Thumbs.db") in summary
    assert "1 in the folder could not be read: trip/gone.jpg" in summary


def test_a_dropped_folder_is_said_to_be_read_and_its_files_read_a_batch_at_once(stack, browser):
    """A dropped folder of 10,000 files, read one file at a time, would show nothing for 20 s."""
    import base64

    from selenium.webdriver.common.by import By

    image = base64.b64encode(make_image(1095, size=(64, 48))).decode()
    browser.get(stack.web_url + "/")
    status = browser.find_element(By.ID, "status-line")
    wait_for(lambda: status.text != "Connecting…", 30, "the page's script to run")
    browser.execute_script("""
      window.fileDelayMs = 100;
      window.summaries = [];
      new MutationObserver(() => window.summaries.push(document.getElementById("summary").textContent))
        .observe(document.getElementById("summary"), {childList: true, subtree: true});""")
    assert browser.execute_script(DROP_TREE, {"many": {f"f{i}.jpg": image for i in range(6)}})
    wait_for(lambda: len(rows_shown(browser)) == 6, 30, "the dropped folder's rows")
    summaries = browser.execute_script("return window.summaries")
    for read in (2, 4):
        assert f"reading the folder… {read} files found" in summaries, summaries
    assert browser.execute_script("return window.mostFileReads") == 2  # each batch of two together
    wait_for(lambda: "reading" not in browser.find_element(By.ID, "summary").text, 10, "the notice gone")


def test_a_reload_finds_the_files_stored_under_names_the_server_cleaned(stack, browser):
    """Files the tab had not heard stored were matched to the server's items by name: one
    whose name the server cleans showed twice after a reload, failed "not stored" and
    with its result. They are matched by token."""

    names = ["  spaced.jpg  ", "tab\there.jpg", "photo\u202egpj.exe.jpg", "x" * 1100 + ".jpg", "plain.jpg"]
    files = {name: make_image(953 + n, size=(64, 48)) for n, name in enumerate(names)}
    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["lost"] + ["unreachable"] * 4)  # not resent
    assert drop_files(browser, files)
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the lost answer")
    batch_id = browser.current_url.split("#batches=")[1]

    def stored() -> list[str]:
        return [item["filename"] for item in server_items(stack, batch_id)]

    wait_for(lambda: len(stored()) == len(files), 30, "the server to hold every file")
    assert "spaced.jpg" in stored()  # cleaned, as the others
    assert len(saved_tokens(browser, batch_id)) == len(files)  # none heard stored: found by token
    browser.refresh()
    wait_for(lambda: rows_shown(browser), 30, "the restored batch")
    shown = rows_shown(browser)
    assert sorted(name for name, _, _ in shown) == sorted(stored()), [name[:40] for name, _, _ in shown]
    assert not [name for name, state, _ in shown if state == "failed"]


def test_a_reload_shows_an_upload_whose_every_file_was_refused_with_its_reasons(stack, browser, tmp_path):
    """No batch was made of it, so only this tab knows the reasons: a reload must not drop
    them with the upload. Not followed either: it stays for the next reload."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    choose(browser, tmp_path, {"not_an_image.jpg": b"plain text", "empty.jpg": b""})
    shown = finished_rows(browser, stack, 2, timeout_s=30)
    reasons = {name: row.text for name, row in shown.items()}
    assert all(row.get_attribute("data-state") == "failed" for row in shown.values())
    batch_id = browser.current_url.split("#batches=")[1]
    import requests
    # No such batch: this tab alone holds the reasons.
    assert requests.get(f"{stack.web_url}/api/jobs/{batch_id}", timeout=10).status_code == 404

    def rows():
        return {r.get_attribute("data-filename"): (r.get_attribute("data-state"), r.text)
                for r in browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")}

    for _ in range(2):  # the first reload kept it for the second
        browser.refresh()
        wait_for(lambda: len(rows()) == 2, 30, "the refused files after the reload")
        assert rows() == {name: ("failed", text) for name, text in reasons.items()}
        assert "could not be loaded" not in browser.find_element(By.ID, "summary").text
        assert browser.current_url.endswith("#batches=" + batch_id)


# Files per POST: one. A POST of a file named in window.held waits until its name is
# taken out; one named in window.unreachable then finds no server, each time.
HOLD_POSTS = UPLOADS_BY_FETCH + """
window.held = arguments[0];
window.unreachable = [];
document.body.dataset.filesPerRequest = '1';
document.body.dataset.resendDelayScale = '0.05';
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  const name = url === "/api/jobs" ? options.body.get("files").name : "";
  while (window.held.includes(name)) await new Promise((resolve) => setTimeout(resolve, 50));
  if (window.unreachable.includes(name)) throw new TypeError("Failed to fetch");
  return realFetch(url, options);
};
"""


def send_holding(browser, stack, tmp_path, files: dict[str, bytes], held: list[str]) -> str:
    """Choose `files` on a fresh page that holds back the POSTs of those `held`; its
    batch id once the server holds the others."""
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_POSTS, held)
    choose(browser, tmp_path, files)
    wait_for(lambda: "#batches=" in browser.current_url, 30, "the batch in the address")
    batch_id = browser.current_url.split("#batches=")[1]
    wait_for(lambda: len(server_items(stack, batch_id)) == len(files) - len(held), 30,
             "the server to hold the files not held")
    return batch_id


@contextlib.contextmanager
def second_tab(browser) -> Iterator[str]:
    """A tab opened from this one on its address (sessionStorage copied, as in a
    duplicated tab), switched to; the first tab's handle. Closed at the end."""
    first = browser.current_window_handle
    browser.execute_script("window.open(location.href)")
    browser.switch_to.window(browser.window_handles[-1])
    try:
        yield first
    finally:
        browser.close()
        browser.switch_to.window(first)


def in_tab(browser, handle: str, script: str) -> None:
    """Run `script` in the tab `handle`, then come back to this one."""
    here = browser.current_window_handle
    browser.switch_to.window(handle)
    browser.execute_script(script)
    browser.switch_to.window(here)


def test_a_duplicated_tab_shows_files_the_first_tab_is_still_sending_as_being_sent(
        stack, browser, reference_model, tmp_path):
    """A duplicated tab (its sessionStorage copied) restores the batch the first tab is
    still sending: each file not yet stored must not be shown failed "not stored...
    choose it again", nor the batch left unfollowed ("80 of 120 classified, 40 failed",
    the server holding 120 done). They are shown being sent in another tab and take
    their results; one the first tab gives up on fails once it says it is done."""
    from selenium.webdriver.common.by import By

    files = {f"dup_{i}.jpg": make_image(990 + i, size=(64, 48)) for i in range(3)}
    send_holding(browser, stack, tmp_path, files, held=["dup_1.jpg", "dup_2.jpg"])
    with second_tab(browser) as first:
        wait_for(lambda: len(rows_shown(browser)) == 3, 30, "the restored batch")
        shown = {name: (state, text) for name, state, text in rows_shown(browser)}
        for name in ("dup_1.jpg", "dup_2.jpg"):
            assert shown[name][0] == "uploading" and "uploading in another tab" in shown[name][1], shown
        assert "failed" not in browser.find_element(By.ID, "summary").text
        in_tab(browser, first, "window.unreachable = ['dup_2.jpg']; window.held = [];")
        shown = finished_rows(browser, stack, 3, timeout_s=60)
        assert_classified(shown, {n: files[n] for n in ("dup_0.jpg", "dup_1.jpg")}, reference_model)
        assert shown["dup_2.jpg"].get_attribute("data-state") == "failed"
        assert "not stored by the tab that sent it" in shown["dup_2.jpg"].text
        assert browser.find_element(By.ID, "summary").text == "2 of 3 classified, 1 failed"


# Every row that turns failed, by name, in window.failedRows (from now on).
WATCH_FAILURES = """
window.failedRows = [];
new MutationObserver((changes) => {
  for (const change of changes) {
    if (change.target.dataset && change.target.dataset.state === "failed") {
      window.failedRows.push(change.target.dataset.filename);
    }
  }
}).observe(document.getElementById("results"), {subtree: true, attributeFilter: ["data-state"]});
"""


def test_a_file_the_sending_tab_stored_last_is_never_shown_failed_in_its_duplicate(
        stack, browser, reference_model, tmp_path):
    """The sending tab says it is done as soon as its last chunk is answered: the
    duplicate must not fail that chunk's files, "not stored", before its next poll finds
    them stored."""
    from selenium.webdriver.common.by import By

    files = {f"last_{i}.jpg": make_image(987 + i, size=(64, 48)) for i in range(2)}
    send_holding(browser, stack, tmp_path, files, held=["last_1.jpg"])
    with second_tab(browser) as first:
        wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["done", "uploading"], 30,
                 "the stored file done, the held one being sent")
        browser.execute_script(WATCH_FAILURES)
        in_tab(browser, first, "window.held = [];")
        shown = finished_rows(browser, stack, 2, timeout_s=60)
        assert_classified(shown, files, reference_model)
        assert browser.execute_script("return window.failedRows") == []
        assert browser.find_element(By.ID, "summary").text == "2 of 2 classified"


def test_a_duplicated_tab_takes_a_sending_tab_closed_for_gone(stack, browser, tmp_path):
    """A sending tab closed cannot say it is done: once it leaves a few asks unanswered,
    the files it had not stored fail in the tab that was following it."""
    files = {f"closed_{i}.jpg": make_image(985 + i, size=(64, 48)) for i in range(2)}
    send_holding(browser, stack, tmp_path, files, held=["closed_1.jpg"])
    first = browser.current_window_handle
    browser.execute_script("window.open(location.href)")
    [second] = [handle for handle in browser.window_handles if handle != first]
    browser.switch_to.window(second)

    def state_of(name: str) -> str | None:
        return {n: state for n, state, _ in rows_shown(browser)}.get(name)

    wait_for(lambda: state_of("closed_1.jpg") == "uploading", 30, "the held file shown being sent")
    browser.switch_to.window(first)
    browser.close()
    browser.switch_to.window(second)
    wait_for(lambda: state_of("closed_1.jpg") == "failed", 30, "the held file failed, its sender gone")
    [text] = [text for name, _, text in rows_shown(browser) if name == "closed_1.jpg"]
    # Not "see that tab for why": it is gone.
    assert "not stored: the tab sending it was closed or reloaded; choose it again" in text


# The tab's messages to other tabs dropped while window.muted (a tab frozen or too busy
# to answer); the page's channel is its own, its prototype's method is shared.
MUTE_TABS = """
window.muted = true;
const realPost = BroadcastChannel.prototype.postMessage;
BroadcastChannel.prototype.postMessage = function (message) {
  if (!window.muted) realPost.call(this, message);
};
"""


def test_a_sending_tab_taken_for_gone_that_answers_again_gets_its_rows_back(
        stack, browser, reference_model, tmp_path):
    """A sender silent for three asks has its unstored files failed in the tab following
    it; when it answers again they are shown being sent again, and take their results."""
    files = {f"revive_{i}.jpg": make_image(975 + i, size=(64, 48)) for i in range(2)}
    send_holding(browser, stack, tmp_path, files, held=["revive_1.jpg"])
    with second_tab(browser) as first:
        def state_of(name: str) -> str | None:
            return {n: state for n, state, _ in rows_shown(browser)}.get(name)

        wait_for(lambda: state_of("revive_1.jpg") == "uploading", 30, "the held file shown being sent")
        in_tab(browser, first, MUTE_TABS)
        wait_for(lambda: state_of("revive_1.jpg") == "failed", 30, "the held file failed, its sender silent")
        in_tab(browser, first, "window.muted = false;")
        wait_for(lambda: state_of("revive_1.jpg") == "uploading", 30, "the held file shown being sent again")
        in_tab(browser, first, "window.held = [];")
        shown = finished_rows(browser, stack, 2, timeout_s=60)
        assert_classified(shown, files, reference_model)


def test_a_second_tab_on_the_batch_link_follows_it_while_another_tab_sends_it(
        stack, browser, reference_model, tmp_path):
    """A second tab on the batch's link keeps following it once the files it knew of have
    finished, or files stored later never show (100 of 120 missing)."""
    files = {f"link_{i}.jpg": make_image(995 + i, size=(64, 48)) for i in range(2)}
    send_holding(browser, stack, tmp_path, files, held=["link_1.jpg"])
    with second_tab(browser) as first:
        # A tab of its own: cleared after the page's last save, as it leaves (main.js pagehide).
        browser.execute_script("addEventListener('pagehide', () => sessionStorage.clear());"
                               "location.reload();")
        wait_for(lambda: [(n, s) for n, s, _ in rows_shown(browser)] == [("link_0.jpg", "done")], 60,
                 "the one file stored so far, done")
        in_tab(browser, first, "window.held = [];")
        shown = finished_rows(browser, stack, 2, timeout_s=60)
        assert_classified(shown, files, reference_model)


def test_a_batch_never_stored_is_dropped_from_the_address_once_its_watch_is_over(stack, browser, tmp_path):
    """Each reload of the tab showed its files "not stored" again, for good, and polled
    a batch the server did not know for 30 s."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["unreachable"] * 5)
    choose(browser, tmp_path, {"never_stored.jpg": make_image(997, size=(64, 48))})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the failed send")
    browser.refresh()
    browser.execute_script("document.body.dataset.unsentWatchMs = '500';")
    wait_for(lambda: rows_shown(browser), 30, "the saved file")
    wait_for(lambda: "#batches=" not in browser.current_url, 30, "the batch to be dropped from the address")
    [(name, state, text)] = rows_shown(browser)  # still shown in this page view
    assert (name, state) == ("never_stored.jpg", "failed") and "not stored" in text

    browser.refresh()
    status = browser.find_element(By.ID, "status-line")
    wait_for(lambda: status.text != "Connecting…", 30, "the page's script to run")
    assert rows_shown(browser) == [] and browser.find_element(By.ID, "summary").text == ""


def test_names_are_shown_cleaned_before_the_server_has_them(stack, browser):
    """Rows still uploading, refused before upload or not stored, shown as chosen, would
    keep bidi controls: "photo\\u202eabc.exe.jpg" reads as "photogpj.exe.cba". They are
    shown as the server keeps them."""
    small, big = make_image(998, size=(64, 48)), make_image(999, size=(800, 600))
    files = {"photo\u202eabc.exe.jpg": small, "line\u2028break\x07.jpg": small, " big\u2066.jpg": big}
    cleaned = ["photoabc.exe.jpg", "line break .jpg", "big.jpg"]
    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      document.body.dataset.maxFileBytes = arguments[0];
      const realFetch = window.fetch;  // no upload is ever answered
      window.fetch = (url, options) => url === "/api/jobs" ? new Promise(() => {}) : realFetch(url, options);
      """, str(len(small)))
    assert drop_files(browser, files)
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["uploading", "uploading", "failed"], 30,
             "two rows uploading, the large file refused")
    assert [name for name, _, _ in rows_shown(browser)] == cleaned
    names = "return [...document.querySelectorAll('#results .name')].map((name) => name.textContent)"
    assert browser.execute_script(names) == cleaned

    browser.refresh()
    browser.execute_script("document.body.dataset.unsentWatchMs = '500';")
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["failed"] * 3, 30, "the saved files")
    shown = rows_shown(browser)
    assert [name for name, _, _ in shown] == cleaned and browser.execute_script(names) == cleaned
    assert [state for _, state, _ in shown] == ["failed"] * 3
    assert all("not stored" in text for _, _, text in shown[:2])


def test_failed_rows_can_be_shown_alone_and_the_results_downloaded_as_csv(stack, browser, reference_model,
                                                                           tmp_path):
    """Among hundreds of rows, the few that failed must be found without scrolling, and
    the results taken away without the JSON API. The CSV is the page's rows: a batch's
    CSV from the server lacks the files it refused."""
    import csv
    import io

    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    tools, only_failed = browser.find_element(By.ID, "tools"), browser.find_element(By.ID, "only-failed")
    assert not tools.is_displayed()
    folder = tmp_path / "trip"
    small = {"size": (64, 48)}
    images = {"day 1/same.jpg": make_image(1090, **small), "day 2/same.jpg": make_image(1091, **small),
              "caf\u00e9.jpg": make_image(1092, **small)}
    choose_folder(browser, folder, {**images, "=notes.jpg": b"not an image"})
    finished_rows(browser, stack, 4, timeout_s=60)
    assert browser.find_element(By.ID, "only-failed-box").text == "Show only the failed files (1)"
    only_failed.click()
    shown = [row.get_attribute("data-filename")
             for row in browser.find_elements(By.CSS_SELECTOR, "#results .result") if row.is_displayed()]
    assert shown == ["=notes.jpg"]
    only_failed.click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    wait_for(lambda: all(row.is_displayed() for row in rows), 5, "every row shown again")

    # What the browser would save: the Blob the button hands it.
    button = browser.find_element(By.ID, "download-csv")
    assert button.text == "Download the results (CSV)"
    browser.execute_script("""
      window.saved = null;
      const make = URL.createObjectURL;
      URL.createObjectURL = (blob) => {
        blob.arrayBuffer().then((bytes) => { window.saved = Array.from(new Uint8Array(bytes)); });
        return make(blob);
      };
      HTMLAnchorElement.prototype.click = function () { window.savedAs = this.download; };""")
    button.click()
    wait_for(lambda: browser.execute_script("return window.saved") is not None, 5, "the CSV")
    data = bytes(browser.execute_script("return window.saved"))
    assert data.startswith(b"\xef\xbb\xbffilename,path,state,label,score,error,untrained\r\n")  # BOM: Excel
    assert browser.execute_script("return window.savedAs").startswith("results-")
    table = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    def as_text(cell: str) -> str:  # as a spreadsheet must show it: not a formula
        return "'" + cell if cell[:1] in ("=", "+", "-", "@") else cell
    # Every file's path within the folder chosen, not only those of a name shown twice.
    paths = [row.get_attribute("data-chosen-path") for row in rows]
    assert sorted(paths) == ["trip/=notes.jpg", "trip/caf\u00e9.jpg", "trip/day 1/same.jpg",
                             "trip/day 2/same.jpg"]
    assert [(r["filename"], r["path"], r["state"], r["untrained"]) for r in table] == [
        (as_text(row.get_attribute("data-filename")), path, row.get_attribute("data-state"), "true")
        for row, path in zip(rows, paths, strict=True)]
    by_path = {r["path"]: r for r in table}
    assert by_path["trip/=notes.jpg"]["state"] == "failed" and by_path["trip/=notes.jpg"]["error"]
    # Each "same.jpg" with its own answer, not the other's.
    refs = references(reference_model, images, top1_only=True)
    for name, ref in refs.items():
        row = by_path[f"trip/{name}"]
        assert row["state"] == "done" and row["label"] == ref.label, row
        assert abs(float(row["score"]) - ref.score) <= SCORE_TOLERANCE, (row, ref.score)
    # What is shown is what is downloaded: with the filter on, the failed files alone.
    only_failed.click()
    assert button.text == "Download the failed files (CSV)"
    browser.execute_script("window.saved = null;")
    button.click()
    wait_for(lambda: browser.execute_script("return window.saved") is not None, 5, "the failed files' CSV")
    failed_only = list(csv.DictReader(io.StringIO(bytes(browser.execute_script("return window.saved"))
                                                  .decode("utf-8-sig"))))
    assert [(r["path"], r["state"]) for r in failed_only] == [("trip/=notes.jpg", "failed")]


def test_an_upload_of_refused_files_only_leaves_the_address_before_a_batch(stack, browser, tmp_path):
    """Kept for its reasons (a reload shows them), it must not take one of the address's
    places and push real batches out before it."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script("document.body.dataset.maxBatchesInUrl = '2';")

    def upload(i: int, files: dict[str, bytes]) -> str:
        choose(browser, tmp_path, files)
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#results .result")) == i + 1, 30,
                 f"upload {i}'s row")
        finished_rows(browser, stack, i + 1, timeout_s=60)
        return browser.current_url.split("#batches=")[1].split(",")[-1]

    batches = [upload(0, {"batch_0.jpg": make_image(1200, size=(64, 48))})]
    refused = upload(1, {"refused.jpg": b"plain text"})
    batches.append(upload(2, {"batch_2.jpg": make_image(1202, size=(64, 48))}))
    assert refused not in batches
    assert browser.current_url.split("#batches=")[1].split(",") == batches


def test_a_batch_pushed_out_of_the_address_is_said_to_be(stack, browser, tmp_path):
    """The 21st batch dropped the oldest from the address without a word: a reload then
    showed fewer batches than the page had."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script("document.body.dataset.maxBatchesInUrl = '2';")
    for i in range(3):
        choose(browser, tmp_path, {f"batch_{i}.jpg": make_image(1100 + i, size=(64, 48))})
        wait_for(lambda i=i: len(browser.find_elements(By.CSS_SELECTOR, "#results .result")) == i + 1, 30,
                 f"upload {i}'s row")
        finished_rows(browser, stack, i + 1, timeout_s=60)
    assert len(browser.current_url.split("#batches=")[1].split(",")) == 2
    summary = browser.find_element(By.ID, "summary").text
    assert "the address keeps the latest 2 batches: older ones left it" in summary, summary
    # Nothing kept of the one that left, which no reload shows: each one left would fill
    # this tab's storage, and once full no batch's rows are saved.
    saved = browser.execute_script(
        "return Object.keys(sessionStorage).filter((key) => key.startsWith('imgclass.shown.'))")
    assert sorted(saved) == sorted(f"imgclass.shown.{batch_id}"
                                   for batch_id in browser.current_url.split("#batches=")[1].split(","))


def test_an_unknown_batch_dropped_from_the_address_leaves_nothing_saved(stack, browser):
    """Its rows saved by this tab must not stay in sessionStorage for good."""
    from selenium.webdriver.common.by import By

    unknown = "0" * 31 + "1"
    browser.get(stack.web_url + "/")
    # A file not heard stored (one heard stored would make it a batch the server lost).
    browser.execute_script("sessionStorage.setItem(arguments[0], JSON.stringify(arguments[1]));"
                           "sessionStorage.setItem(arguments[2], '[]')", f"imgclass.shown.{unknown}",
                           [{"name": "x.jpg", "unsent": True, "token": "0"}], f"imgclass.results.{unknown}")
    browser.get(f"{stack.web_url}/#batches={unknown}")
    browser.refresh()
    wait_for(lambda: "could not be loaded" in browser.find_element(By.ID, "summary").text, 30, "the notice")
    assert "#batches=" not in browser.current_url
    for store in ("shown", "results"):
        assert browser.execute_script(f"return sessionStorage.getItem('imgclass.{store}.{unknown}')") is None


def test_a_folder_of_no_images_is_said_to_screen_readers_once(stack, browser, tmp_path):
    """The summary says a folder's files were skipped, and the live region says it too:
    else a folder of no images is chosen in silence, and a dropped one read unsaid."""
    import base64

    browser.get(stack.web_url + "/")
    record_announcements(browser)
    choose_folder(browser, tmp_path / "notes", {"a.txt": b"not an image", "b.txt": b"nor this"})
    skipped = "2 files in the folder skipped, not images: notes/a.txt, notes/b.txt"
    wait_for(lambda: browser.execute_script("return window.announced"), 30, "the folder's notice, said")
    assert browser.execute_script("return window.announced") == [skipped]
    # Dropped, the folder is said to be read, once, not at each batch of files read.
    browser.execute_script("window.announced.length = 0;")
    text = base64.b64encode(b"not an image").decode()
    assert browser.execute_script(DROP_TREE, {"notes": {f"{n}.txt": text for n in "abcde"}})
    wait_for(lambda: len(browser.execute_script("return window.announced")) == 2, 30, "the drop, said")
    assert browser.execute_script("return window.announced") == [
        "reading the folder…",
        "5 files in the folder skipped, not images: notes/a.txt, notes/b.txt, notes/c.txt, …"]
    assert rows_shown(browser) == []


def test_a_refused_api_key_takes_the_focus_once_and_the_rest_of_the_upload_is_not_sent(
        stack, browser, tmp_path):
    """Chunks go one at a time until the batch exists: else each is refused 401 in turn,
    and each pulls the focus back to the key's box, from wherever the user has gone."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      localStorage.clear();
      document.body.dataset.filesPerRequest = '1';
      window.keyFocused = 0;
      document.getElementById('api-key').addEventListener('focus', () => { window.keyFocused += 1; });
      window.posts = 0;
      const realFetch = window.fetch;
      window.fetch = (url, options) => {
        if (url !== "/api/jobs") return realFetch(url, options);
        window.posts += 1;
        document.activeElement.blur();  // the user has moved on
        return Promise.resolve(new Response(JSON.stringify(
          {error: "a valid API key is required (X-API-Key header)", filename: null}), {status: 401}));
      };""")
    choose(browser, tmp_path, {f"keyless_{i}.jpg": make_image(1300 + i, size=(64, 48)) for i in range(3)})
    shown = finished_rows(browser, stack, 3, timeout_s=20)
    for row in shown.values():
        assert row.get_attribute("data-state") == "failed"
        assert "an API key is required: enter it above, then send the files again" in row.text
    assert browser.execute_script("return window.posts") == 1  # each later chunk would be refused so
    assert browser.execute_script("return window.keyFocused") == 1
    assert browser.switch_to.active_element == browser.find_element(By.ID, "api-key")


def test_a_refused_api_key_does_not_fail_for_good_a_file_an_earlier_send_may_have_stored(
        stack, browser, tmp_path):
    """A resend refused 401 is not kept as refused if its first send, whose answer was
    lost, stored it: a reload would show the file twice, failed and done, and the advice
    to send it again have it classified twice."""
    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS + """
      document.body.dataset.filesPerRequest = '1';
      document.body.dataset.resendDelayScale = '0.05';
      const failingFirst = window.fetch;
      window.fetch = (url, options) => {
        if (url !== "/api/jobs" || window.fakedPosts < 1) return failingFirst(url, options);
        return Promise.resolve(new Response(JSON.stringify(
          {error: "a valid API key is required (X-API-Key header)", code: "unauthorized", filename: null}),
          {status: 401}));
      };""", ["lost"])
    choose(browser, tmp_path, {f"keyed_{i}.jpg": make_image(1320 + i, size=(64, 48)) for i in range(2)})
    shown = finished_rows(browser, stack, 2, timeout_s=30)
    assert "an earlier send may have stored it" in shown["keyed_0.jpg"].text  # the lost answer's
    assert "an API key is required" in shown["keyed_1.jpg"].text
    assert "may have stored" not in shown["keyed_1.jpg"].text  # never sent
    batch_id = browser.current_url.split("#batches=")[1]
    wait_for(lambda: [i["filename"] for i in server_items(stack, batch_id)] == ["keyed_0.jpg"], 30,
             "the server to hold the file whose answer was lost")

    browser.refresh()
    wait_for(lambda: {name: state for name, state, _ in rows_shown(browser)}.get("keyed_0.jpg") == "done",
             60, "the stored file, classified, after the reload")
    assert [(name, state) for name, state, _ in rows_shown(browser)] == [
        ("keyed_0.jpg", "done"), ("keyed_1.jpg", "failed")]


def test_screen_readers_hear_a_count_that_does_not_change_less_and_less_often(stack, browser, tmp_path):
    """A stalled run must not say "0 of 500 classified" every 15 s for ever: the same
    count is said again after 1, 2, 4 periods, then every 8; a new count starts again at
    one. The files' waiting is faked in the page's polls; a period is 0.5 s here."""
    browser.get(stack.web_url + "/")
    browser.execute_script(r"""
      document.body.dataset.announceEveryMs = '500';
      window.released = [];""" + polls_answered_as("""
        if (!window.released.includes(item.filename)) {
          Object.assign(item, { state: "queued", label: null, top5: [] });
        }""") + r"""
      window.heard = [];  // [text, when by Date.now()]
      const announce = document.getElementById("announce");
      new MutationObserver(() => window.heard.push([announce.textContent, Date.now()]))
        .observe(announce, {childList: true, characterData: true, subtree: true});""" + RECORD_COUNT_TIMERS)
    choose(browser, tmp_path, {f"stalled_{i}.jpg": make_image(1310 + i, size=(64, 48)) for i in range(2)})

    def times_said(text: str) -> list[float]:
        heard = browser.execute_script("return window.heard")
        return [when for said, when in heard if said == text]

    waiting = wait_for(lambda: len(times_said("0 of 2 classified")) >= 6 and times_said("0 of 2 classified"),
                       30, "the waiting count, said six times")
    # What the page asked for after each of the first five: doubled, then capped at 8
    # periods. Less the moment between saying it and setting the timer, hence the lower
    # bound: more than half, which is what one doubling fewer would ask.
    asked = repeats_asked(browser, waiting[:5])
    for got, expected in zip(asked, [500, 1000, 2000, 4000, 4000], strict=True):
        assert expected / 2 < got <= expected, asked
    browser.execute_script("window.released.push('stalled_0.jpg');")
    changed = wait_for(lambda: len(times_said("1 of 2 classified")) >= 2 and times_said("1 of 2 classified"),
                       30, "the new count, said twice")
    asked = repeats_asked(browser, changed[:1])
    assert 250 < asked[0] <= 500, asked  # one period again (0.5 s), not eight (4 s)


def test_the_page_has_headings_and_a_result_says_what_each_figure_is(stack, browser, tmp_path):
    """Headings below the h1, and named figures: a row reading "img0.jpg done shield 19.4%
    untrained" leaves which figure is what to guess. The contract's data-* stay."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    headings = browser.find_elements(By.CSS_SELECTOR, "main h2")
    assert [h.get_property("textContent") for h in headings] == ["Choose images", "Results"]
    assert browser.find_element(By.ID, "drop-zone").accessible_name == "Choose images"
    results = browser.find_element(By.ID, "results")
    assert results.get_attribute("aria-labelledby") == headings[1].get_attribute("id")
    assert results.accessible_name == "Results"
    choose(browser, tmp_path, {"named.jpg": make_image(1320, size=(64, 48)), "junk.jpg": b"not an image"})
    shown = finished_rows(browser, stack, 2, timeout_s=60)
    done = shown["named.jpg"]
    label, score = done.get_attribute("data-label"), float(done.get_attribute("data-score"))
    read = " ".join(browser.execute_script("return arguments[0].innerText", done).split())  # as styled
    assert read == f"named.jpg done label: {label} confidence {score * 100:.1f}% UNTRAINED top 5", read
    assert done.find_element(By.CLASS_NAME, "label").text == label  # shown as before
    read = " ".join(browser.execute_script("return arguments[0].innerText", shown["junk.jpg"]).split())
    assert read.startswith("junk.jpg failed ") and "label:" not in read and "confidence" not in read, read


def test_the_title_says_how_the_run_ended_until_the_next_upload(stack, browser, tmp_path):
    """Once all are finished the title keeps the outcome: "Image classification" alone
    tells a user coming back to the tab nothing of how the run ended."""
    browser.get(stack.web_url + "/")
    choose(browser, tmp_path, {"good.jpg": make_image(1330, size=(64, 48)), "bad.jpg": b"not an image"})
    finished_rows(browser, stack, 2, timeout_s=60)
    wait_for(lambda: browser.title == "Done: 1 classified, 1 failed · Image classification", 10, "the title")
    browser.execute_script("""
      window.titles = [];
      new MutationObserver(() => window.titles.push(document.title))
        .observe(document.querySelector("title"), {childList: true, characterData: true, subtree: true});""")
    choose(browser, tmp_path, {"next.jpg": make_image(1331, size=(64, 48))})
    finished_rows(browser, stack, 3, timeout_s=60)
    wait_for(lambda: browser.title == "Done: 2 classified, 1 failed · Image classification", 10,
             "the new title")
    # Kept until the next upload (a refresh may set it again first), then its progress.
    titles = [t for t in browser.execute_script("return window.titles") if not t.startswith("Done: 1 ")]
    assert titles[0] == "(2/3) Image classification", titles


def test_the_only_failed_filter_that_hides_gives_its_focus_to_the_csv_button(stack, browser, tmp_path):
    """Its last failure replaced by a late answer, the checkbox hides with the focus on
    it: the focus must not fall to the page's body. Faked in the page's polls, as in
    test_a_late_answer_replaces_a_rows_dead_letter_failure: "late.jpg" failed, "other.jpg"
    queued (the batch followed on), then the truth."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(LATE_JPG_DEAD_LETTERED)
    choose(browser, tmp_path, {"late.jpg": make_image(1340, size=(64, 48)),
                               "other.jpg": make_image(1341, size=(64, 48))})
    wait_for(lambda: [state for _, state, _ in rows_shown(browser)] == ["failed", "queued"], 60,
             "the dead letter shown")
    only_failed = browser.find_element(By.ID, "only-failed")
    wait_for(only_failed.is_displayed, 10, "the filter")
    only_failed.click()
    assert only_failed.is_selected() and browser.switch_to.active_element == only_failed
    browser.execute_script("window.deadLetter = false;")
    wait_for(lambda: rows_shown(browser)[0][1] == "done", 30, "the late answer")
    wait_for(lambda: not browser.find_element(By.ID, "only-failed-box").is_displayed(), 10,
             "the filter hidden")
    assert browser.execute_script("return document.activeElement.id") == "download-csv"
    assert not only_failed.is_selected()


# POST /api/jobs refused 401 (as api.py refuses it) unless its X-API-Key is "right": the
# stack every page test shares needs no key. Its box shown, the key cleared.
KEY_IS_RIGHT = UPLOADS_BY_FETCH + """
  localStorage.clear();
  document.getElementById('api-key-box').hidden = false;
  const realFetch = window.fetch;
  window.fetch = (url, options) => {
    const key = (options.headers || {})["X-API-Key"];
    if (url !== "/api/jobs" || key === "right") return realFetch(url, options);
    return Promise.resolve(new Response(JSON.stringify(
      {error: "a valid API key is required (X-API-Key header)", code: "unauthorized", filename: null,
       items: [], rejected: []}), {status: 401, headers: {"Content-Type": "application/json"}}));
  };"""


def send_again_button(browser):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "send-again")


def states_shown(browser) -> dict[str, str]:
    return {name: state for name, state, _ in rows_shown(browser)}


def test_screen_readers_hear_the_first_failure_of_a_send_again_not_an_older_one(stack, browser, tmp_path):
    """After "send again", whose rows keep their places, the new failure is named, not
    the last failed row in the page's order: an older failure, not sent again."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(KEY_IS_RIGHT + "document.body.dataset.maxFileBytes = '20000';")
    big = make_image(1405, size=(800, 600))
    assert len(big) > 20000
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong")
    choose(browser, tmp_path, {"half.jpg": make_image(1404)[:3000], "zz_big.jpg": big})
    wait_for(lambda: states_shown(browser) == {"half.jpg": "failed", "zz_big.jpg": "failed"}, 30,
             "both refused: one for the key, one too large")
    record_announcements(browser)
    key.clear()
    key.send_keys("right")
    button = send_again_button(browser)
    wait_for(button.is_displayed, 10, "the button")
    button.click()
    wait_for(lambda: "JPEG data is truncated" in {n: t for n, _, t in rows_shown(browser)}["half.jpg"],
             60, "the file sent again, failed by the server")
    said = wait_for(lambda: [t for t in browser.execute_script("return window.announced") if "failed." in t],
                    10, "a failure said")
    assert "half.jpg: " in said[0] and "zz_big.jpg" not in said[0], said


def test_files_refused_for_a_wrong_api_key_are_sent_again_once_it_is_changed(stack, browser, tmp_path):
    """300 images, 12 refused: each had to be chosen again by hand. Refused for the key,
    they are offered again once the key is changed (not before: they would be refused
    so), sent by the keyboard into the same batch, each row one file, counted once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(stack.web_url + "/")
    browser.execute_script(KEY_IS_RIGHT + "document.body.dataset.filesPerRequest = '2';")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong")
    good = {f"keyed_again_{i}.jpg": make_image(1400 + i, size=(64, 48)) for i in range(3)}
    choose(browser, tmp_path, {**good, "half.jpg": make_image(1403)[:3000]})
    shown = finished_rows(browser, stack, 4, timeout_s=30)
    assert all("the API key was refused" in row.text for row in shown.values())
    button = send_again_button(browser)
    assert not button.is_displayed()  # the same key would be refused again
    announce = record_announcements(browser)

    key.clear()
    key.send_keys("right")
    # The file the server will find unreadable has not been judged yet: offered too.
    wait_for(button.is_displayed, 10, "the button")
    assert button.text == "Send 4 failed files again" and button.tag_name == "button"
    assert not browser.find_element(By.ID, "send-again-note").is_displayed()  # none left out
    browser.execute_script("arguments[0].focus();", button)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    expected = {**dict.fromkeys(good, "done"), "half.jpg": "failed"}
    wait_for(lambda: states_shown(browser) == expected, 60, "the files sent again, classified")
    rows = {name: text for name, _, text in rows_shown(browser)}
    assert all("sent again" in text for text in rows.values()), rows
    assert "JPEG data is truncated" in rows["half.jpg"]
    # Each file once in the batch the page follows, which the address still names alone.
    assert_stored_once(browser, stack, good)
    # The counts hold: one row a file, the failure sent again not counted twice.
    assert browser.find_element(By.ID, "summary").text.startswith("3 of 4 classified, 1 failed")
    wait_for(lambda: browser.title == "Done: 3 classified, 1 failed · Image classification", 10, "the title")
    assert browser.find_element(By.ID, "only-failed-count").text == "(1)"
    # Nothing left worth sending again (an unreadable image is not): the button goes,
    # its focus passed on, not left on nothing.
    assert not button.is_displayed()
    assert browser.execute_script("return document.activeElement.id") == "download-csv"
    said = wait_for(lambda: [text for text in browser.execute_script("return window.announced")
                             if text.startswith("Of the ")], 10, "the outcome, said")
    heard = browser.execute_script("return window.announced")
    assert heard[0].startswith("Sending 4 files again"), heard
    assert said[0].startswith("Of the 4 files sent again, 3 classified, 1 failed again"), heard
    assert announce.get_attribute("aria-live") == "polite"

    # A reload shows each file once, said to have been sent again; nothing to send now.
    browser.refresh()
    wait_for(lambda: states_shown(browser) == expected, 60, "the batch after a reload")
    assert len(rows_shown(browser)) == 4
    assert all("sent again" in text for _, _, text in rows_shown(browser))
    assert not send_again_button(browser).is_displayed()  # no File to send after a reload
    browser.execute_script("localStorage.clear();")


def test_a_file_that_found_no_server_is_offered_again_and_an_unreadable_image_is_not(
        stack, browser, reference_model, tmp_path):
    """Sending again can help a file no server answered, not one the server refused for
    what it is (here an image cut short): the button offers the first alone, and says
    why the other is left out."""
    from selenium.webdriver.common.by import By

    files = {"no_server.jpg": make_image(1410, size=(64, 48)), "half.jpg": make_image(1411)[:3000],
             "fine.jpg": make_image(1412, size=(64, 48))}
    browser.get(stack.web_url + "/")
    # One file a request; "no_server.jpg"'s find no server, through all their resends.
    browser.execute_script(UPLOADS_BY_FETCH + """
      document.body.dataset.filesPerRequest = '1';
      document.body.dataset.resendDelayScale = '0.05';
      window.unreachable = "no_server.jpg";
      const realFetch = window.fetch;
      window.fetch = (url, options) =>
        url === "/api/jobs" && options.body.getAll("files").some((file) => file.name === window.unreachable)
          ? Promise.reject(new TypeError("Failed to fetch")) : realFetch(url, options);""")
    choose(browser, tmp_path, files)
    shown = finished_rows(browser, stack, 3, timeout_s=60)
    assert "the server could not be reached" in shown["no_server.jpg"].text
    assert "JPEG data is truncated" in shown["half.jpg"].text
    button = send_again_button(browser)
    wait_for(button.is_displayed, 10, "the button")
    assert button.text == "Send 1 failed file again"
    note = browser.find_element(By.ID, "send-again-note")
    assert note.text == "(not offered: 1 refused for the file itself)"
    assert button.get_attribute("aria-describedby") == "send-again-note"
    browser.execute_script("window.unreachable = '';")  # the network is back
    button.click()
    expected = {"no_server.jpg": "done", "half.jpg": "failed", "fine.jpg": "done"}
    wait_for(lambda: states_shown(browser) == expected, 60, "the file sent again, classified")
    good = {name: data for name, data in files.items() if name != "half.jpg"}
    assert_classified(finished_rows(browser, stack, 3, 10), good, reference_model)
    assert_stored_once(browser, stack, good)
    assert not button.is_displayed() and not note.is_displayed()


# As LATE_JPG_DEAD_LETTERED, until the page asks for it to be sent again: "late.jpg" is
# seen failed as a dead letter (arguments[0], the server's text for one). The page's
# asks (POST .../again) are kept in window.againAsked; as the server really classified
# it (409, done), the ask is answered as for a real dead letter: 202, queued again.
LATE_JPG_DEAD_LETTERED_UNTIL_SENT_AGAIN = "const deadLetter = arguments[0]; window.deadLetter = true;" + \
    polls_answered_as("""
      if (item.filename === "late.jpg") {
        Object.assign(item, { state: "failed", label: null, score: null, top5: [], error: deadLetter,
                              code: "dead_letter" });
      }""", only_while="window.deadLetter") + r"""
  const pollingFetch = window.fetch;
  window.againAsked = [];
  window.fetch = async (url, options) => {
    if (!/\/again$/.test(String(url))) return pollingFetch(url, options);
    window.againAsked.push(String(url));
    window.deadLetter = false;
    const response = await window.realFetchForTest(url, options);
    let body = await response.json(), status = response.status;
    if (status === 409 && body.item.state === "done") {
      body = { batch_id: url.split("/")[3], item: { ...body.item, state: "queued", label: null, score: null,
                                                    top5: [], sent_again: 1 } };
      status = 202;
    }
    return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
  };"""


def test_a_dead_letter_is_sent_again_in_place_and_shown_once_after_a_reload(
        stack, browser, reference_model, tmp_path):
    """A dead letter (its workers crashed) may pass when sent again. The page asks the
    server to queue the same item again (POST .../again), no new upload: the batch
    keeps one item a file, its row one row, marked "sent again", after a reload too.
    The page knows it by its code, `dead_letter`, whatever its words say."""
    from selenium.webdriver.common.by import By

    files = {"late.jpg": make_image(1420, size=(64, 48)), "other.jpg": make_image(1421, size=(64, 48))}
    browser.get(stack.web_url + "/")
    browser.execute_script(LATE_JPG_DEAD_LETTERED_UNTIL_SENT_AGAIN, "no worker answered it, in other words")
    choose(browser, tmp_path, files)
    wait_for(lambda: states_shown(browser) == {"late.jpg": "failed", "other.jpg": "done"}, 60,
             "the dead letter shown")
    button = send_again_button(browser)
    wait_for(button.is_displayed, 10, "the button")
    assert button.text == "Send 1 failed file again"
    button.click()
    wait_for(lambda: states_shown(browser) == {"late.jpg": "done", "other.jpg": "done"}, 60,
             "the file sent again, classified")
    assert_classified(finished_rows(browser, stack, 2, 10), files, reference_model)
    batch_id = browser.current_url.split("#batches=")[1]
    items = server_items(stack, batch_id)
    assert sorted((i["filename"], i["token"]) for i in items) == [("late.jpg", "0"), ("other.jpg", "1")]
    late_id = next(i["id"] for i in items if i["filename"] == "late.jpg")
    assert browser.execute_script("return window.againAsked") == [
        f"/api/jobs/{batch_id}/items/{late_id}/again"]
    assert "sent again" in rows_shown(browser)[0][2]
    assert browser.find_element(By.ID, "summary").text.startswith("2 of 2 classified")
    assert not button.is_displayed()

    browser.refresh()
    wait_for(lambda: states_shown(browser) == {"late.jpg": "done", "other.jpg": "done"}, 60,
             "the batch after a reload")
    assert [(name, state) for name, state, _ in rows_shown(browser)] == [("late.jpg", "done"),
                                                                       ("other.jpg", "done")]
    assert "sent again" in rows_shown(browser)[0][2]


def test_a_second_reload_keeps_every_row_of_a_batch_with_a_file_sent_again(stack, browser, tmp_path):
    """A reload rebuilds the rows one by one: a row the server says was sent again must
    not save the batch's rows as they stand then, those rebuilt so far, or the next
    reload loses the rest, a refused file gone from the page and its counts. The ids of
    items a file sent again replaced are kept too. Faked in the page's polls: "late.jpg"
    sent again (from another tab, say)."""
    from selenium.webdriver.common.by import By

    files = {"late.jpg": make_image(1430, size=(64, 48)), "notes.jpg": b"plain notes, not an image",
             "other.jpg": make_image(1431, size=(64, 48))}
    browser.get(stack.web_url + "/")
    choose(browser, tmp_path, files)
    finished_rows(browser, stack, len(files), timeout_s=60)
    batch_id = browser.current_url.split("#batches=")[1]
    key = f"imgclass.shown.{batch_id}"
    # Saved a moment after the last result (with its answer): changed before, the rows
    # would be saved over as the page leaves.
    wait_for(lambda: len(browser.execute_script("return JSON.parse(sessionStorage.getItem(arguments[0]))",
                                                f"imgclass.results.{batch_id}") or []) == 2, 30,
             "the answers saved")
    saved = browser.execute_script(f"return JSON.parse(sessionStorage.getItem('{key}'))")
    assert [("id" in row, row.get("name")) for row in saved] == [(True, "late.jpg"), (False, "notes.jpg"),
                                                                  (True, "other.jpg")]
    saved[2]["replaced"] = ["0" * 32]  # an item "other.jpg" replaced (sendAgain), gone since
    browser.execute_script(f"sessionStorage.setItem('{key}', JSON.stringify(arguments[0]))", saved)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": polls_answered_as(
        'if (item.filename === "late.jpg") item.sent_again = 1;')})
    expected = [("late.jpg", "done"), ("notes.jpg", "failed"), ("other.jpg", "done")]
    for _ in range(2):
        browser.refresh()
        wait_for(lambda: [(name, state) for name, state, _ in rows_shown(browser)] == expected, 60,
                 "every row after the reload")
        assert "sent again" in rows_shown(browser)[0][2]
        assert browser.find_element(By.ID, "summary").text.startswith("2 of 3 classified, 1 failed")
        after = browser.execute_script(f"return JSON.parse(sessionStorage.getItem('{key}'))")
        assert after == [{**saved[0], "again": 1}, saved[1], saved[2]]


# "late.jpg" as uploaded (token "0") a dead letter in the page's polls, and the server
# refusing to queue it again in place as for an image gone from the input bucket.
LATE_JPG_DEAD_LETTER_NOT_IN_PLACE = \
    "const deadLetter = arguments[0], nowFailed = arguments[1], nowCode = arguments[2];" + \
    polls_answered_as("""
      if (item.filename === "late.jpg" && (item.token === "0" || window.newOneDeadToo)) {
        Object.assign(item, { state: "failed", label: null, score: null, top5: [], error: deadLetter,
                              code: "dead_letter" });
      }""") + r"""
  const pollingFetch = window.fetch;
  window.againAsked = [];
  window.fetch = async (url, options) => {
    if (!/\/again$/.test(String(url))) return pollingFetch(url, options);
    window.againAsked.push(String(url));
    const id = String(url).split("/")[5];
    const body = { error: "not sent again: its image is no longer in the input bucket; upload it again",
                   code: "not_sent_again",
                   item: { id, filename: "late.jpg", state: "failed", error: nowFailed, code: nowCode,
                           token: "0", label: null, score: null, top5: [], sent_again: 0 } };
    return new Response(JSON.stringify(body),
                        { status: 409, headers: { "Content-Type": "application/json" } });
  };"""


def dead_letter_refused_in_place(browser, stack, tmp_path, seed: int, now_failed: str, now_code: str):
    """The page with "late.jpg" shown as a dead letter (LATE_JPG_DEAD_LETTER_NOT_IN_PLACE,
    the server's refusal to queue it again carrying it failed with `now_failed` and
    `now_code`), and its "Send again" button pressed once; the button."""
    from common.failure_tags import DEAD_LETTER_ERROR

    files = {"late.jpg": make_image(seed, size=(64, 48)), "other.jpg": make_image(seed + 1, size=(64, 48))}
    browser.get(stack.web_url + "/")
    browser.execute_script(LATE_JPG_DEAD_LETTER_NOT_IN_PLACE, DEAD_LETTER_ERROR, now_failed, now_code)
    choose(browser, tmp_path, files)
    wait_for(lambda: states_shown(browser) == {"late.jpg": "failed", "other.jpg": "done"}, 60,
             "the dead letter shown")
    button = send_again_button(browser)
    wait_for(button.is_displayed, 10, "the button")
    button.click()
    return button


def test_a_dead_letter_the_server_cannot_queue_again_in_place_is_uploaded_anew(
        stack, browser, tmp_path):
    """Refused in place (its image gone from the input bucket), the row must not take the
    server's words for a worker's failure on the image: it would never be offered again,
    though the page holds the File. The next "send again" uploads it as a new item."""
    from common.failure_tags import DEAD_LETTER_ERROR

    button = dead_letter_refused_in_place(browser, stack, tmp_path, 1430, DEAD_LETTER_ERROR, "dead_letter")
    wait_for(lambda: "not sent again in place" in rows_shown(browser)[0][2], 30, "the refusal shown")
    assert states_shown(browser)["late.jpg"] == "failed"
    assert len(browser.execute_script("return window.againAsked")) == 1
    wait_for(button.is_displayed, 10, "the button again")
    assert button.text == "Send 1 failed file again"
    # The new item a dead letter too: the press after next queues it in place.
    browser.execute_script("window.newOneDeadToo = true")
    button.click()
    batch_id = browser.current_url.split("#batches=")[1]
    wait_for(lambda: len(server_items(stack, batch_id)) == 3, 60, "the file uploaded anew")
    assert len(browser.execute_script("return window.againAsked")) == 1  # not in place again
    tokens = sorted((i["filename"], i["token"]) for i in server_items(stack, batch_id))
    assert tokens == [("late.jpg", "0"), ("late.jpg", "0.1"), ("other.jpg", "1")]
    new_id = next(i["id"] for i in server_items(stack, batch_id) if i["token"] == "0.1")
    wait_for(lambda: states_shown(browser)["late.jpg"] == "failed", 60, "the new item's dead letter")
    wait_for(button.is_displayed, 10, "the button once more")
    button.click()
    wait_for(lambda: len(browser.execute_script("return window.againAsked")) == 2, 30, "in place")
    asked = browser.execute_script("return window.againAsked")
    assert asked[1] == f"/api/jobs/{batch_id}/items/{new_id}/again"


def test_a_dead_letter_failed_by_a_worker_meanwhile_is_shown_so_and_not_offered(stack, browser, tmp_path):
    """Refused in place because a late answer failed it on the image itself, the row must
    not keep the dead letter's words and be offered again, to upload anew bytes a worker
    has already failed. It shows the worker's failure."""
    failed = "classification failed: the model could not read this image"
    button = dead_letter_refused_in_place(browser, stack, tmp_path, 1440, failed, "classification_failed")
    wait_for(lambda: failed in rows_shown(browser)[0][2], 30, "the worker's failure shown")
    assert "sent again in place" not in rows_shown(browser)[0][2]
    wait_for(lambda: not button.is_displayed(), 10, "the button gone")


@contextlib.contextmanager
def requests_held(stack, seconds: int) -> Iterator[None]:
    """Every classify request sent meanwhile waits `seconds` in the request queue before
    a worker can receive it (the queue's DelaySeconds, put back to 0 after): its item
    stays queued that long, for a dead letter to fail it first."""
    from tests.integration.conftest import clients

    _, sqs, _ = clients(stack)
    url = sqs.get_queue_url(QueueName=stack.settings().request_queue)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": str(seconds)})
    try:
        yield
    finally:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": "0"})


def dead_letter(stack, batch_id: str, item_id: str, filename: str) -> None:
    """Put the item's request in the dead-letter queue, as SQS moves one no worker
    answered in its attempts: the web tier then fails the item."""
    from common.messages import ClassifyRequest
    from common.names import object_key
    from tests.integration.conftest import clients

    _, sqs, _ = clients(stack)
    settings = stack.settings()
    dead = ClassifyRequest(id=item_id, bucket=settings.input_bucket, filename=filename,
                           key=object_key(batch_id, item_id, filename))
    sqs.send_message(QueueUrl=sqs.get_queue_url(QueueName=settings.dead_letter_queue)["QueueUrl"],
                     MessageBody=dead.to_json())


def request_queue_empty(stack) -> bool:
    """Nothing in the request queue: none waiting, held by a worker or delayed."""
    from tests.integration.conftest import clients

    _, sqs, _ = clients(stack)
    url = sqs.get_queue_url(QueueName=stack.settings().request_queue)["QueueUrl"]
    counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return all(counts[name] == "0" for name in ("ApproximateNumberOfMessages",
                                                "ApproximateNumberOfMessagesNotVisible",
                                                "ApproximateNumberOfMessagesDelayed"))


# The page's fetches of GET /api/jobs/<id> (polls and refreshes), counted in window.batchReads.
COUNT_BATCH_READS = r"""
  window.batchReads = 0;
  const countedFetch = window.fetch;
  window.fetch = (url, options) => {
    if (/^\/api\/jobs\/[0-9a-f]{32}$/.test(String(url))) window.batchReads += 1;
    return countedFetch(url, options);
  };"""


def test_a_dead_letter_queued_again_from_elsewhere_is_shown_queued_then_done(
        stack, browser, reference_model, tmp_path):
    """A dead letter queued again by another client (a script calling POST .../again, not
    this page's button) is sent to the page's event stream as a `queued` event: its row,
    failed, shows it queued again, then its answer, with no reload and no poll. The
    requests are held in the queue (requests_held) so that the dead letter comes first,
    and "other.jpg" stays queued meanwhile: a batch all finished ends its stream."""
    import requests
    from selenium.webdriver.common.by import By

    from common.failure_tags import DEAD_LETTER_ERROR

    files = {"late.jpg": make_image(1450, size=(64, 48)), "other.jpg": make_image(1451, size=(64, 48))}
    with requests_held(stack, 10):
        browser.get(stack.web_url + "/")
        browser.execute_script("window.notReloaded = true;" + COUNT_BATCH_READS)
        choose(browser, tmp_path, files)
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued", "other.jpg": "queued"}, 30,
                 "both files stored")
        batch_id = browser.current_url.split("#batches=")[1]
        late_id = next(i["id"] for i in server_items(stack, batch_id) if i["filename"] == "late.jpg")
        dead_letter(stack, batch_id, late_id, "late.jpg")
        wait_for(lambda: states_shown(browser) == {"late.jpg": "failed", "other.jpg": "queued"}, 10,
                 "the dead letter shown")
        assert DEAD_LETTER_ERROR in rows_shown(browser)[0][2]
        reads = browser.execute_script("return window.batchReads")

        # Another client queues it again: the page hears it by its stream alone.
        answer = requests.post(f"{stack.web_url}/api/jobs/{batch_id}/items/{late_id}/again", timeout=10)
        assert answer.status_code == 202, answer.text
        assert answer.json()["item"]["state"] == "queued"
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued", "other.jpg": "queued"}, 5,
                 "the dead letter shown queued again")
    _, _, text = rows_shown(browser)[0]
    assert "sent again" in text and DEAD_LETTER_ERROR not in text, text
    assert "failed" not in browser.find_element(By.ID, "summary").text
    assert browser.execute_script("return window.batchReads") == reads  # not polled: the event

    # The held requests come out: the row shows its answer, still not reloaded.
    wait_for(lambda: states_shown(browser) == {"late.jpg": "done", "other.jpg": "done"}, 60,
             "the file queued again, classified")
    assert_classified(finished_rows(browser, stack, 2, 10), files, reference_model)
    assert "sent again" in rows_shown(browser)[0][2]
    assert browser.execute_script("return window.notReloaded")
    # Its request sent again is answered too (ignored, the first answer won): no request
    # is left for the tests after this one.
    wait_for(lambda: request_queue_empty(stack), 60, "the request queue empty")


# What the page's tab went through, in order (window.seen): each event stream it opened
# (its URL), and each change of the tab's visibility, heard before the page hears it.
SEEN_STREAMS_AND_VISIBILITY = WATCH_STREAMS + r"""
  window.endsHeld = false;
  window.seen = [];
  const Seen = window.EventSource;
  window.EventSource = class extends Seen {
    constructor(url) {
      super(url);
      window.seen.push(String(url));
    }
  };
  window.addEventListener("visibilitychange", () => window.seen.push(document.visibilityState), true);"""


def test_a_finished_batch_shown_again_hears_a_file_sent_again_from_elsewhere(
        stack, browser, reference_model, tmp_path):
    """A tab whose batch had all finished had closed its stream, and heard nothing more
    until reloaded: a dead letter queued again by another tab or a script stayed failed
    in it (known limits). Now the tab, hidden while that happens and then shown again,
    follows the batch again from its last event: the row shows the file queued again,
    then its answer. The tab is really hidden (another tab in front), and its stream is
    opened only once it is shown again. Requests are held in the queue (requests_held)
    so that the dead letter comes first, and the file sent again stays queued a while."""
    import requests

    from common.failure_tags import DEAD_LETTER_ERROR

    files = {"late.jpg": make_image(1470, size=(64, 48))}
    with requests_held(stack, 20):
        browser.get(stack.web_url + "/")
        browser.execute_script("window.notReloaded = true;" + SEEN_STREAMS_AND_VISIBILITY)
        choose(browser, tmp_path, files)
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued"}, 30, "the file stored")
        batch_id = browser.current_url.split("#batches=")[1]
        late_id = server_items(stack, batch_id)[0]["id"]
        dead_letter(stack, batch_id, late_id, "late.jpg")
        wait_for(lambda: states_shown(browser) == {"late.jpg": "failed"}, 10, "the dead letter shown")
        # The batch all finished: its stream ended, and the page closed it.
        wait_for(lambda: browser.execute_script("return window.streamEnds") == 1, 10, "the stream's end")
        assert browser.execute_script("return window.openStreams") == 0
        page_tab = browser.current_window_handle

        browser.switch_to.new_window("tab")  # in front of the page's tab, which is hidden now
        answer = requests.post(f"{stack.web_url}/api/jobs/{batch_id}/items/{late_id}/again", timeout=10)
        assert answer.status_code == 202, answer.text
        browser.close()
        browser.switch_to.window(page_tab)  # shown again
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued"}, 10,
                 "the dead letter shown queued again")
    _, _, text = rows_shown(browser)[0]
    assert "sent again" in text and DEAD_LETTER_ERROR not in text, text
    seen = browser.execute_script("return window.seen")
    assert seen[:3] == [f"/api/jobs/{batch_id}/events", "hidden", "visible"], seen
    assert len(seen) == 4 and seen[3].startswith(f"/api/jobs/{batch_id}/events?after="), seen

    wait_for(lambda: states_shown(browser) == {"late.jpg": "done"}, 60, "the file sent again, classified")
    assert_classified(finished_rows(browser, stack, 1, 10), files, reference_model)
    assert browser.execute_script("return window.notReloaded")
    wait_for(lambda: browser.execute_script("return window.openStreams") == 0, 10, "the stream ended again")
    wait_for(lambda: request_queue_empty(stack), 60, "the request queue empty")


def test_a_tab_kept_in_front_hears_a_failed_file_sent_again_from_elsewhere(
        stack, browser, reference_model, tmp_path):
    """A tab never hidden hears no visibilitychange: one kept in front whose batch had
    all finished heard a dead letter queued again by a script only once reloaded (known
    limits). Now, while it shows a failed file, it looks at that batch again every
    catchUpMs: the row shows the file queued again, then its answer. A batch without a
    failure, which cannot change, is not looked at again."""
    import requests

    from common.failure_tags import DEAD_LETTER_ERROR

    browser.get(stack.web_url + "/")
    browser.execute_script("window.notReloaded = true;" + SEEN_STREAMS_AND_VISIBILITY)
    fine = {"fine.jpg": make_image(1480, size=(64, 48))}
    choose(browser, tmp_path, fine)
    wait_for(lambda: states_shown(browser) == {"fine.jpg": "done"}, 60, "the fine file classified")
    fine_id = browser.current_url.split("#batches=")[1].split(",")[-1]
    files = {"late.jpg": make_image(1481, size=(64, 48))}
    with requests_held(stack, 20):
        choose(browser, tmp_path, files)
        wait_for(lambda: states_shown(browser).get("late.jpg") == "queued", 30, "the file stored")
        batch_id = browser.current_url.split("#batches=")[1].split(",")[-1]
        late_id = server_items(stack, batch_id)[0]["id"]
        dead_letter(stack, batch_id, late_id, "late.jpg")
        wait_for(lambda: states_shown(browser).get("late.jpg") == "failed", 10, "the dead letter shown")
        # Both batches finished: their streams ended, and the page closed them.
        wait_for(lambda: browser.execute_script("return window.openStreams") == 0, 10, "the streams' end")
        browser.execute_script("document.body.dataset.catchUpMs = '300';")
        answer = requests.post(f"{stack.web_url}/api/jobs/{batch_id}/items/{late_id}/again", timeout=10)
        assert answer.status_code == 202, answer.text
        wait_for(lambda: states_shown(browser).get("late.jpg") == "queued", 10,
                 "the dead letter shown queued again")
    text = {name: text for name, _, text in rows_shown(browser)}["late.jpg"]
    assert "sent again" in text and DEAD_LETTER_ERROR not in text, text
    wait_for(lambda: states_shown(browser) == {"fine.jpg": "done", "late.jpg": "done"}, 60,
             "the file sent again, classified")
    assert_classified(finished_rows(browser, stack, 2, 10), {**fine, **files}, reference_model)

    # Its stream ended again, and its failure is gone: it is not looked at again either.
    wait_for(lambda: browser.execute_script("return window.openStreams") == 0, 10, "the stream ended again")
    opened = browser.execute_script("return window.seen.length")
    browser.execute_script("window.dispatchEvent(new Event('focus'))")  # a focus looks too
    seen = browser.execute_script("return window.seen")
    assert "hidden" not in seen and "visible" not in seen, seen  # never hidden: no visibilitychange
    assert [url for url in seen if url.startswith(f"/api/jobs/{fine_id}/")] == [
        f"/api/jobs/{fine_id}/events"], seen
    assert len(seen) == opened, seen
    assert browser.execute_script("return window.notReloaded")
    wait_for(lambda: request_queue_empty(stack), 60, "the request queue empty")


# The summary's count of files to send again over an upload of 20,000 failed files it
# offers (a stand-in of a session: only what again.js reads).
SEND_AGAIN_OVER_MANY = """
const done = arguments[arguments.length - 1];
Promise.all([import("/static/js/state.js"), import("/static/js/again.js")]).then(
  ([{ page }, { showSendAgain }]) => {
    const entries = Array.from({ length: 20000 }, () => (
      { file: {}, el: { dataset: { state: "failed" } }, failure: { unanswered: true } }));
    const session = { uploading: false, entries };
    page.sessions.push(session);
    showSendAgain();
    const said = document.getElementById("send-again").textContent;
    page.sessions.splice(page.sessions.indexOf(session), 1);
    showSendAgain();
    done({ said, after: document.getElementById("send-again").hidden });
  });
"""


def test_the_files_to_send_again_are_counted_over_many_failed_files(stack, browser):
    """Each failed file added to its upload's list by copying the list costs, over 10,000
    failed files, some 200 ms at each refresh of the summary (how long it takes is not
    asserted here, as no test times code: 20,000 took ~480 ms, ~7 without the copy)."""
    browser.get(stack.web_url + "/")
    browser.set_script_timeout(60)
    got = browser.execute_async_script(SEND_AGAIN_OVER_MANY)
    assert got == {"said": "Send 20000 failed files again", "after": True}


# A refresh of the summary made to cost 10 ms, asked for by 200 changes a millisecond
# apart, each in a task of its own (as results from an event stream and upload progress
# events come): when each refresh began and ended, and how many changes it came after.
# On a clock of the script's own (performance.now, and the timers refresh.js sets), which
# only the refreshes and the changes move on: the page's timing, not the machine's.
SUMMARY_UNDER_CHANGES = """
const done = arguments[arguments.length - 1];
import("/static/js/refresh.js").then(async ({ setSummaryRefresh, updateSummary }) => {
  // First, on the real clock, whatever refresh the page had asked for.
  let settled = false;
  setSummaryRefresh(() => { settled = true; });
  updateSummary();
  const deadline = performance.now() + 10000;
  while (!settled && performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  const realSetTimeout = window.setTimeout;
  let now = Math.ceil(performance.now()) + 60000;  // whole milliseconds, past any wait left
  let asking = false, asks = 0;
  const timers = [];  // refresh.js's, due on this clock
  performance.now = () => now;
  window.setTimeout = (fn, ms, ...args) => asking ? timers.push({ due: now + ms, fn })
                                                  : realSetTimeout(fn, ms, ...args);
  const fireDue = () => {
    timers.sort((a, b) => a.due - b.due);
    while (timers.length && timers[0].due <= now) timers.shift().fn();
  };
  const runs = [];
  setSummaryRefresh(() => {
    const start = now;
    now += 10;  // a refresh over 1,000 rows
    runs.push({ start, end: now, asked: asks });
  });
  try {
    for (let i = 0; i < 200; i++) {
      asking = true;
      updateSummary();
      asking = false;
      asks += 1;
      await null;  // a refresh due at once runs now (a microtask)
      now += 1;
      fireDue();
    }
    while (timers.length) {
      now = Math.max(now, ...timers.map((t) => t.due));
      fireDue();
    }
  } finally {
    delete performance.now;
    window.setTimeout = realSetTimeout;
  }
  done({ settled, runs });
});
"""


def test_the_summary_of_many_rows_takes_a_fifth_of_the_page_at_most_however_often_it_changes(
        stack, browser):
    """With 1,000 rows, refreshing the summary for each result and each upload progress
    event, reading every row each time, would freeze the page for up to 4 s at a time, 27 s of
    an 80 s upload. A refresh waits after the one before for four times as long as that
    one took."""
    browser.get(stack.web_url + "/")
    browser.set_script_timeout(60)
    got = browser.execute_async_script(SUMMARY_UNDER_CHANGES)
    runs = got["runs"]
    assert got["settled"] and len(runs) > 1, got
    assert runs[-1]["asked"] == 200, got  # the last change is never left unshown
    for before, after in zip(runs, runs[1:], strict=False):
        # Four times the one before, and no longer, changes waiting all along.
        assert after["start"] - before["end"] == 4 * (before["end"] - before["start"]), got
