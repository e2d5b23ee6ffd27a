"""The upload page in a real browser: failed files sent again. Dead letters queued
again in place or uploaded anew, late answers that replace them, and files sent again from
elsewhere heard by a tab."""

from __future__ import annotations

from tests.conftest import make_image
from tests.integration.conftest import (
    STACK_TIMEOUT,
    wait_for,
    workers_held,
)
from tests.integration.page import (
    LATE_JPG_DEAD_LETTERED,
    NEEDS_CHROMIUM,
    UPLOADS_BY_FETCH,
    WATCH_STREAMS,
    assert_classified,
    assert_stored_once,
    choose,
    finished_rows,
    polls_answered_as,
    record_announcements,
    rows_shown,
    send_again_button,
    server_items,
    states_shown,
)

pytestmark = [NEEDS_CHROMIUM, STACK_TIMEOUT]


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
    workers are held (workers_held) so that the dead letter comes first, and "other.jpg"
    stays queued meanwhile: a batch all finished ends its stream."""
    import requests
    from selenium.webdriver.common.by import By

    from common.failure_tags import DEAD_LETTER_ERROR

    files = {"late.jpg": make_image(1450, size=(64, 48)), "other.jpg": make_image(1451, size=(64, 48))}
    with workers_held(stack):
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
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued", "other.jpg": "queued"}, 30,
                 "the dead letter shown queued again")
        _, _, text = rows_shown(browser)[0]
        assert "sent again" in text and DEAD_LETTER_ERROR not in text, text
        assert "failed" not in browser.find_element(By.ID, "summary").text
        assert browser.execute_script("return window.batchReads") == reads  # not polled: the event

    # The workers go on: the row shows its answer, still not reloaded.
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
    opened only once it is shown again. Workers are held (workers_held) so that the dead
    letter comes first, and the file sent again stays queued a while."""
    import requests

    from common.failure_tags import DEAD_LETTER_ERROR

    files = {"late.jpg": make_image(1470, size=(64, 48))}
    with workers_held(stack):
        browser.get(stack.web_url + "/")
        browser.execute_script("window.notReloaded = true;" + SEEN_STREAMS_AND_VISIBILITY)
        choose(browser, tmp_path, files)
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued"}, 30, "the file stored")
        batch_id = browser.current_url.split("#batches=")[1]
        late_id = server_items(stack, batch_id)[0]["id"]
        dead_letter(stack, batch_id, late_id, "late.jpg")
        wait_for(lambda: states_shown(browser) == {"late.jpg": "failed"}, 30, "the dead letter shown")
        # The batch all finished: its stream ended, and the page closed it.
        wait_for(lambda: browser.execute_script("return window.streamEnds") == 1, 10, "the stream's end")
        assert browser.execute_script("return window.openStreams") == 0
        page_tab = browser.current_window_handle

        browser.switch_to.new_window("tab")  # in front of the page's tab, which is hidden now
        answer = requests.post(f"{stack.web_url}/api/jobs/{batch_id}/items/{late_id}/again", timeout=10)
        assert answer.status_code == 202, answer.text
        browser.close()
        browser.switch_to.window(page_tab)  # shown again
        wait_for(lambda: states_shown(browser) == {"late.jpg": "queued"}, 30,
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
    with workers_held(stack):
        choose(browser, tmp_path, files)
        wait_for(lambda: states_shown(browser).get("late.jpg") == "queued", 30, "the file stored")
        batch_id = browser.current_url.split("#batches=")[1].split(",")[-1]
        late_id = server_items(stack, batch_id)[0]["id"]
        dead_letter(stack, batch_id, late_id, "late.jpg")
        wait_for(lambda: states_shown(browser).get("late.jpg") == "failed", 30, "the dead letter shown")
        # Both batches finished: their streams ended, and the page closed them.
        wait_for(lambda: browser.execute_script("return window.openStreams") == 0, 10, "the streams' end")
        browser.execute_script("document.body.dataset.catchUpMs = '300';")
        answer = requests.post(f"{stack.web_url}/api/jobs/{batch_id}/items/{late_id}/again", timeout=10)
        assert answer.status_code == 202, answer.text
        wait_for(lambda: states_shown(browser).get("late.jpg") == "queued", 30,
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


# "late.jpg" seen failed as a dead letter (arguments[0]) at every poll, and every ask to
# send it again (POST .../again) refused 401, counted in window.againAsked.
LATE_JPG_DEAD_LETTER_AGAIN_REFUSED = "const deadLetter = arguments[0];" + polls_answered_as("""
      if (item.filename === "late.jpg") {
        Object.assign(item, { state: "failed", label: null, score: null, top5: [], error: deadLetter,
                              code: "dead_letter" });
      }""") + r"""
  const pollingFetch = window.fetch;
  window.againAsked = 0;
  window.fetch = async (url, options) => {
    if (!/\/again$/.test(String(url))) return pollingFetch(url, options);
    window.againAsked += 1;
    const body = { error: "an API key is required", code: "key_required" };
    const headers = { "Content-Type": "application/json" };
    return new Response(JSON.stringify(body), { status: 401, headers });
  };"""


def test_a_dead_letter_refused_at_each_press_says_why_once(stack, browser, tmp_path):
    """Each press added "(not sent again: ...)" to the reason the last press had left:
    three presses, three of them, all read out by screen readers. Nor was the file sent
    again, though its row said so, "(3 times)", here and after a reload."""
    from common.failure_tags import DEAD_LETTER_ERROR

    files = {"late.jpg": make_image(1593, size=(64, 48)), "other.jpg": make_image(1594, size=(64, 48))}
    browser.get(stack.web_url + "/")
    browser.execute_script(LATE_JPG_DEAD_LETTER_AGAIN_REFUSED, DEAD_LETTER_ERROR)
    choose(browser, tmp_path, files)
    wait_for(lambda: states_shown(browser) == {"late.jpg": "failed", "other.jpg": "done"}, 60,
             "the dead letter shown")
    button = send_again_button(browser)
    for press in (1, 2, 3):
        wait_for(button.is_displayed, 10, f"the button before press {press}")
        button.click()
        wait_for(lambda: browser.execute_script("return window.againAsked") == press  # noqa: B023
                 and "not sent again" in {n: t for n, _, t in rows_shown(browser)}["late.jpg"],
                 30, f"press {press} refused")
    shown = {name: text for name, _, text in rows_shown(browser)}["late.jpg"]
    assert shown.count("not sent again") == 1, shown
    assert shown.count(DEAD_LETTER_ERROR) == 1, shown
    again = ("const mark = document.querySelector('#results [data-filename=\"late.jpg\"] .again');"
             "return [mark.hidden, mark.textContent];")
    assert browser.execute_script(again) == [True, ""]
    browser.refresh()  # the server's answers now: the dead letter was the page's fake
    wait_for(lambda: states_shown(browser) == {"late.jpg": "done", "other.jpg": "done"}, 60,
             "the batch shown again after a reload")
    assert browser.execute_script(again) == [True, ""]


def test_a_file_sent_again_twice_before_the_others_end_is_counted_once(stack, browser, tmp_path):
    """A row refused at once, pressed again while another row sent again still waited:
    "Of the 3 files sent again" was said of two rows."""
    from common.failure_tags import DEAD_LETTER_ERROR

    files = {name: make_image(1595 + i, size=(64, 48)) for i, name in enumerate(("quick.jpg", "slow.jpg"))}
    browser.get(stack.web_url + "/")
    # Both seen failed as dead letters at every poll; each ask to send one again is
    # refused 401, quick.jpg's at once, slow.jpg's once window.releaseSlow() is called.
    browser.execute_script("const deadLetter = arguments[0];" + polls_answered_as("""
      Object.assign(item, { state: "failed", label: null, score: null, top5: [], error: deadLetter,
                            code: "dead_letter" });""") + r"""
      const pollingFetch = window.fetch;
      let slowAsked = null;
      window.releaseSlow = () => slowAsked && slowAsked();
      window.fetch = async (url, options) => {
        if (!/\/again$/.test(String(url))) return pollingFetch(url, options);
        if (String(url).includes(window.slowId)) await new Promise((resolve) => { slowAsked = resolve; });
        const body = { error: "an API key is required", code: "key_required" };
        const headers = { "Content-Type": "application/json" };
        return new Response(JSON.stringify(body), { status: 401, headers });
      };""", DEAD_LETTER_ERROR)
    choose(browser, tmp_path, files)
    wait_for(lambda: states_shown(browser) == {"quick.jpg": "failed", "slow.jpg": "failed"}, 60,
             "the dead letters shown")
    batch_id = browser.current_url.split("#batches=")[1]
    [slow_id] = [item["id"] for item in server_items(stack, batch_id) if item["filename"] == "slow.jpg"]
    browser.execute_script("window.slowId = arguments[0];", slow_id)
    announce = record_announcements(browser)
    button = send_again_button(browser)
    button.click()
    wait_for(lambda: states_shown(browser) == {"quick.jpg": "failed", "slow.jpg": "uploading"}, 30,
             "quick.jpg refused, slow.jpg still waiting")
    wait_for(button.is_displayed, 10, "the button for quick.jpg")
    button.click()
    wait_for(lambda: "not sent again" in {n: t for n, _, t in rows_shown(browser)}["quick.jpg"]
             and states_shown(browser)["quick.jpg"] == "failed", 30, "quick.jpg refused again")
    browser.execute_script("window.releaseSlow();")
    said = wait_for(lambda: [text for text in browser.execute_script("return window.announced")
                             if text.startswith("Of the ")], 30, "the outcome, said")
    assert said[0].startswith("Of the 2 files sent again, 0 classified, 2 failed again"), said
    assert announce.get_attribute("aria-live") == "polite"
