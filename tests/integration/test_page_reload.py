"""The upload page in a real browser: reloads and restored batches. What a reload shows
of the files stored, refused, failed or still being sent, and of batches that grow, wait
empty or never answer."""

from __future__ import annotations

from tests.conftest import make_image
from tests.integration.conftest import (
    STACK_TIMEOUT,
    assert_row_shows,
    reference,
    references,
    wait_for,
)
from tests.integration.page import (
    FAIL_FIRST_POSTS,
    NEEDS_CHROMIUM,
    choose,
    drop_files,
    finished_rows,
    record_announcements,
    rows_shown,
    server_items,
    upload_failing_first,
    waiting_batch,
)

pytestmark = [NEEDS_CHROMIUM, STACK_TIMEOUT]


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


def test_a_reload_of_several_batches_says_one_count_once_all_are_read(stack, browser, tmp_path):
    """Each batch restored made the count change, all its files finished: it was said at
    once, a burst of partial counts ("4 of 4 classified", "16 of 16", ... within 74 ms),
    and a failure of before the reload named as if new ("5 of 6 classified, 1 failed.
    broken.jpg: not an image..."). One count is said, once every batch has been read."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    shown = 0
    for batch in range(4):
        files = {f"batch{batch}_{i}.jpg": make_image(1640 + 2 * batch + i, size=(64, 48)) for i in range(2)}
        if batch == 0:
            files["broken.jpg"] = b"not an image"
        shown += len(files)
        choose(browser, tmp_path, files)
        finished_rows(browser, stack, shown, timeout_s=120)
    assert browser.current_url.count(",") == 3  # four batches
    # Before the page's script runs: what #announce is given is kept, and each batch's
    # first read answers 0.7 s after the one before, as a server rebuilding them would.
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
      window.announced = [];
      document.addEventListener("readystatechange", () => {
        if (document.readyState !== "interactive") return;
        const announce = document.getElementById("announce");
        new MutationObserver(() => window.announced.push(announce.textContent))
          .observe(announce, {childList: true, characterData: true, subtree: true});
      });
      const realFetch = window.fetch;
      const read = new Set();
      window.fetch = async (url, options) => {
        const batch = String(url).match(/^\\/api\\/jobs\\/([0-9a-f]{32})$/);
        if (batch && !read.has(batch[1])) {
          read.add(batch[1]);
          await new Promise((resolve) => setTimeout(resolve, 700 * read.size));
        }
        return realFetch(url, options);
      };"""})
    browser.refresh()
    finished_rows(browser, stack, shown, timeout_s=60)
    count = "8 of 9 classified, 1 failed"
    wait_for(lambda: count in " ".join(browser.execute_script("return window.announced")), 30, "the count")
    said = browser.execute_script("return window.announced")
    assert [t for t in said if "classified" in t] == [count], said
    assert not [t for t in said if "broken.jpg" in t], said
    assert "not an image" in browser.find_element(By.CSS_SELECTOR, '[data-filename="broken.jpg"]').text


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
                                   upload_throughput=10_000)  # bytes/s: the later chunks take ~5 s
    # (At 40 KB/s the last chunks were stored 1.3 s in: a loaded machine's look and reload
    # could come after them, and cut nothing off.)
    browser.find_element(By.ID, "file-input").send_keys("\n".join(paths))
    wait_for(lambda: "#batches=" in browser.current_url, 60, "the page to name its batch")
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

        wait_for(lambda: "waiting.jpg" in rows(), 30, "the restored batch's row", interval=0.05)
        assert list(rows()) == ["waiting.jpg"]
        later = make_image(951)
        added = requests.post(f"{stack.web_url}/api/jobs", data={"batch_id": batch_id},
                              files={"files": ("later.jpg", later)}, timeout=30)
        assert added.status_code == 202, added.text
        wait_for(lambda: "later.jpg" in rows() and rows()["later.jpg"].get_attribute("data-state") == "done",
                 60, "the file that joined later, done")
        shown = rows()
        assert list(shown) == ["waiting.jpg", "later.jpg"]
        assert_row_shows(shown["later.jpg"], reference(reference_model, later), "later.jpg")
        assert shown["waiting.jpg"].get_attribute("data-state") == "queued"
    finally:
        s3.delete_object(Bucket=stack.settings().input_bucket, Key=key)


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


def test_a_reloaded_page_shows_its_batches_though_one_never_answers(stack, browser):
    """Batches asked for one after another: one whose answer never comes would leave the
    page empty, the others never asked for."""
    from selenium.webdriver.common.by import By

    with waiting_batch(stack, 963, "hung.jpg") as hung, waiting_batch(stack, 964, "shown.jpg") as shown:
        # Before the page's script runs: the first batch's answer never comes.
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
          const realFetch = window.fetch;
          window.fetch = (url, options) => String(url).endsWith("/api/jobs/HUNG")
            ? new Promise(() => {}) : realFetch(url, options);""".replace("HUNG", hung)})
        browser.get(f"{stack.web_url}/#batches={hung},{shown}")
        rows = (By.CSS_SELECTOR, "#results [data-state]")
        wait_for(lambda: len(browser.find_elements(*rows)) == 1, 30, "the batch that answers")
        # That batch's row, not the hung one's (both held one file; each is named apart).
        assert [row.get_attribute("data-filename") for row in browser.find_elements(*rows)] == ["shown.jpg"]


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


# Before the page's script runs, in every page this tab loads: this tab's sessionStorage
# holds QUOTA characters (keys and values, as Chromium counts them), a write past that
# refused as Chromium refuses one past its ~5 million. (Storage.prototype: set on the
# object, "setItem" would be saved as an item.)
SMALL_QUOTA = """
const realSetItem = Storage.prototype.setItem;
Storage.prototype.setItem = function (key, value) {
  if (this === sessionStorage) {
    let total = String(key).length + String(value).length;
    for (let i = 0; i < this.length; i++) {
      const other = this.key(i);
      if (other !== String(key)) total += other.length + this.getItem(other).length;
    }
    if (total > QUOTA) throw new DOMException("the quota has been exceeded", "QuotaExceededError");
  }
  return realSetItem.call(this, key, value);
};
"""

# Drops arguments[0] (file names, one byte each) on the page and presses "Stop sending"
# in the same moment: every file stopped, none sent; the batch's rows then hold a
# reason each. The batch id, once in the address.
DROP_AND_STOP = """
  const files = new DataTransfer();
  for (const name of arguments[0]) files.items.add(new File(["x"], name, {type: "image/jpeg"}));
  document.querySelector("h1").dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true,
                                                                   cancelable: true}));
  document.getElementById("stop-sending").click();"""

# How many rows whose name starts with arguments[0] are stopped.
STOPPED_ROWS = """
  return [...document.querySelectorAll("#results [data-stopped]")]
    .filter((row) => row.dataset.filename.startsWith(arguments[0])).length;"""


def test_rows_that_storage_cannot_hold_are_said_and_their_batch_kept_in_the_address(stack, browser, tmp_path):
    """With sessionStorage full (a few uploads of thousands of long names), a batch's rows
    were not saved, without a word: its upload, all stopped, then left the address as if
    it had been saved empty, and every batch's saved answers were deleted to make room,
    for nothing, as the rows still did not fit. Older batches' rows give way to a later
    batch's (as the address keeps the latest); answers only where that makes the record
    fit; rows that cannot be kept are said, once; and their batch stays in the address."""
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": SMALL_QUOTA.replace("QUOTA", "25000")})
    browser.get(stack.web_url + "/")
    choose(browser, tmp_path, {f"kept_{i}.jpg": make_image(1590 + i, size=(64, 48)) for i in range(2)})
    finished_rows(browser, stack, 2, timeout_s=120)
    first = browser.current_url.split("#batches=")[1]

    def saved(store: str, batch_id: str) -> list:
        return browser.execute_script("return JSON.parse(sessionStorage.getItem(arguments[0]) || '[]')",
                                      f"imgclass.{store}.{batch_id}")

    wait_for(lambda: len(saved("results", first)) == 2, 30, "the answers saved")
    record_announcements(browser)
    summary = browser.find_element(By.ID, "summary")
    said = "a reload will not show the rows of"

    drops = iter("abcde")

    def in_address() -> list[str]:
        return browser.current_url.split("#batches=")[1].split(",")

    def drop_and_stop(count: int) -> list[str]:  # ~170 characters a row, saved stopped
        prefix = f"{next(drops)}_"
        names = [f"{prefix}{i:04d}_" + "n" * 64 + ".jpg" for i in range(count)]
        browser.execute_script(DROP_AND_STOP, names)
        wait_for(lambda: browser.execute_script(STOPPED_ROWS, prefix) == count, 30, "every file stopped")
        wait_for(lambda: browser.execute_script("return document.getElementById('stop-sending').hidden"), 30,
                 "the upload's end")
        return in_address()

    # Two uploads of 60 fit beside the first batch (~21,000 characters); the third's rows
    # only if the oldest of them give way: the first batch's are put back.
    for upload in range(3):
        assert len(drop_and_stop(60)) == upload + 2, f"upload {upload + 1} left the address"
    _, second, third, fourth = in_address()
    wait_for(lambda: len(saved("shown", fourth)) == 60, 30, "the latest rows saved")
    assert len(saved("results", first)) == 2, "answers deleted for nothing"
    assert [len(saved("shown", batch_id)) for batch_id in (first, second, third)] == [2, 0, 60]
    wait_for(lambda: f"{said} batch {second}" in summary.text, 30, "the rows not kept said")

    # Rows that fit nowhere (~51,000 characters): nothing gives way for them, and their
    # batch stays in the address all the same.
    assert len(drop_and_stop(300)) == 5, "the upload whose rows storage cannot hold left the address"
    fifth = in_address()[-1]
    assert saved("shown", fifth) == []
    assert len(saved("results", first)) == 2, "answers deleted for nothing"
    assert [len(saved("shown", batch_id)) for batch_id in (first, third, fourth)] == [2, 60, 60]
    wait_for(lambda: f"{said} 2 batches ({second}, {fifth})" in summary.text, 30, "both said")
    heard = browser.execute_script("return window.announced")
    assert sum("a reload will not show the rows of some batches" in text for text in heard) == 1, heard

    browser.refresh()
    # The batches whose rows were not kept, unknown to the server, are said not loaded.
    wait_for(lambda: browser.execute_script(
        "return document.querySelectorAll('#results [data-state]').length === 122 && "
        "document.getElementById('summary').textContent.includes('could not be loaded')"), 60,
        "the rows kept, after the reload")
