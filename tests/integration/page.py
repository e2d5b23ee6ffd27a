"""What the page tests (tests/integration/test_page_*.py) share: headless Chromium, the
rows the page shows, files chosen or dropped, and the scripts that fake or watch what the
page sends and reads. Not named test_*: pytest does not collect it."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.conftest import make_image
from tests.integration.conftest import (
    assert_row_shows,
    processes,
    references,
    wait_for,
)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Every page module's pytestmark (tests/conftest.py, pytest_runtest_setup).
NEEDS_CHROMIUM = pytest.mark.needs_tools("chromium", "chromedriver",
                                         why="Debian's chromium and chromium-driver drive the page")


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


# The page sends its uploads by XMLHttpRequest (for its upload progress); the page
# tests fake their failures (or watch them) in window.fetch. This makes the page's
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


@contextlib.contextmanager
def waiting_batch(stack, seed: int, filename: str = "waiting.jpg") -> Iterator[str]:
    """A batch of one image, `filename`, stored and never queued (it stays so), as a page polls it."""
    import uuid

    from common.names import object_key
    from tests.integration.conftest import clients

    s3, _, _ = clients(stack)
    batch_id, item_id = uuid.uuid4().hex, "0" * 14 + uuid.uuid4().hex[:18]
    key = object_key(batch_id, item_id, filename)
    s3.put_object(Bucket=stack.settings().input_bucket, Key=key, Body=make_image(seed),
                  Metadata={"original-filename": filename, "batch-id": batch_id, "item-id": item_id})
    try:
        yield batch_id
    finally:
        s3.delete_object(Bucket=stack.settings().input_bucket, Key=key)


def page_settings(browser, **settings: str) -> None:
    """The page settings `settings` (settings.js, `<body data-*>`, camelCased) on every
    page this tab loads from now on (not in a tab it opens), set before the page's
    scripts run: a timer the page starts as it loads (the status line's, a restored
    batch's polls) waits the value set from its first wait. Set by document.body.dataset
    after the load, it would first wait out the default once."""
    sets = "".join(f"document.body.dataset.{name} = {json.dumps(str(value))};"
                   for name, value in settings.items())
    # The document parsed: its module scripts run after this (HTML's "the end").
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": f"""
      document.addEventListener("readystatechange", () => {{
        if (document.readyState === "interactive") {{ {sets} }}
      }});"""})


def show_restored(browser, stack, batch_id: str) -> None:
    """Open the page on `batch_id`, and wait until it shows the batch (then polls it)."""
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.web_url}/#batches={batch_id}")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results [data-state]"), 30, "the batch")


@contextlib.contextmanager
def upload_throttled(browser, bytes_per_s: int) -> Iterator[None]:
    """Chrome's own network throttling of the page's uploads (downloads left fast)."""
    browser.set_network_conditions(offline=False, latency=5, download_throughput=10_000_000,
                                   upload_throughput=bytes_per_s)
    try:
        yield
    finally:
        browser.delete_network_conditions()


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


def rows_shown(browser) -> list[tuple[str, str, str]]:
    """The page's rows, in order: (file name, state, text)."""
    from selenium.webdriver.common.by import By

    return [(r.get_attribute("data-filename"), r.get_attribute("data-state"), r.text)
            for r in browser.find_elements(By.CSS_SELECTOR, "#results [data-state]")]


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
