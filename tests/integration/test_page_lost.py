"""The upload page in a real browser: a batch the server lost (`make run` started again
keeps nothing): said so, its queued files offered again, made anew midway, and the answers
the tab saved for a reload."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.conftest import make_image
from tests.integration.conftest import (
    STACK_TIMEOUT,
    assert_row_shows,
    references,
    wait_for,
    workers_held,
)
from tests.integration.page import (
    HOLD_POSTS,
    NEEDS_CHROMIUM,
    assert_classified,
    choose,
    finished_rows,
    forget_on_the_server,
    page_settings,
    record_announcements,
    rows_shown,
    said_lost,
    send_again_button,
    server_items,
    show_restored,
    states_shown,
    waiting_batch,
)

pytestmark = [NEEDS_CHROMIUM, STACK_TIMEOUT]


# What the page reads of the server, counted: window.batchReads (GET /api/jobs/<id>),
# window.streamsOpened (its event streams) and window.statusReads (GET /api/status,
# asked every statusEveryMs whatever else the page does: a clock that needs no sleep).
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


# The page's timers for assert_no_longer_read, short (2 s each by default): the status
# line asked three times takes 0.6 s at least, three times what a poll waits.
SHORT_READS = {"pollEveryMs": "200", "statusEveryMs": "300"}


def assert_no_longer_read(browser) -> None:
    """The page asks nothing more of its lost batch: no poll, no event stream, while it
    asks for the status line three times (SHORT_READS: long enough for three polls)."""
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
    page_settings(browser, **SHORT_READS)
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
        page_settings(browser, **SHORT_READS)
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
