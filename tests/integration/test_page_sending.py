"""The upload page in a real browser: sending and sending again. 503s, unreachable
servers, answers lost, cut off or never coming, proxies' 504s, slow links and the page's
timeouts, a web tier restarting, files deleted mid-upload, and Stop sending."""

from __future__ import annotations

import re

from tests.conftest import make_image
from tests.integration.conftest import (
    STACK_TIMEOUT,
    assert_row_shows,
    processes,
    references,
    wait_for,
    workers_held,
)
from tests.integration.page import (
    FAIL_FIRST_POSTS,
    NEEDS_CHROMIUM,
    UPLOADS_BY_FETCH,
    assert_classified,
    assert_stored_once,
    choose,
    finished_rows,
    record_announcements,
    rows_shown,
    send_again_button,
    server_items,
    states_shown,
    upload_failing_first,
    upload_throttled,
)

pytestmark = [NEEDS_CHROMIUM, STACK_TIMEOUT]


# The first resend (5 s) put 100 s off (settings.js reads resendDelayScale as each resend
# is timed): a file stopped while waiting for it must show as stopped at once, and a wait
# of 30 s (for a loaded machine) cannot be passed by the resend going, or failed by it.
RESEND_FAR_OFF = "document.body.dataset.resendDelayScale = '20';"


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
    # What screen readers hear of the page restored: the same count, its failure of
    # before the reload in it, not named as news.
    wait_for(lambda: browser.find_element(By.ID, "announce").get_attribute("textContent") == final, 10,
             "the count said")


def test_a_stopped_file_the_server_stored_after_all_is_not_counted_stopped_after_a_reload(stack, browser,
                                                                                          tmp_path):
    """Stopped while its send, whose answer was lost, waited to go again: the server may
    hold it ("reload to see"). The reload shows its result, neither failed nor stopped."""
    from selenium.webdriver.common.by import By

    browser.get(stack.web_url + "/")
    browser.execute_script(FAIL_FIRST_POSTS, ["lost"])  # stored; sent again 100 s later
    browser.execute_script(RESEND_FAR_OFF)
    choose(browser, tmp_path, {"kept_after_all.jpg": make_image(1475, size=(64, 48))})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    browser.find_element(By.ID, "stop-sending").click()
    shown = finished_rows(browser, stack, 1, timeout_s=30)  # long before the 100 s resend
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
    browser.execute_script(FAIL_FIRST_POSTS, ["unreachable"])  # sent again 100 s later
    browser.execute_script(RESEND_FAR_OFF)
    choose(browser, tmp_path, {"waiting.jpg": make_image(890)})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    browser.find_element(By.ID, "stop-sending").click()
    # At once, not after the resend's delay: 100 s off, far beyond this wait.
    shown = finished_rows(browser, stack, 1, timeout_s=30)
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
    browser.execute_script(FAIL_FIRST_POSTS, ["503"])  # sent again 100 s later
    browser.execute_script(RESEND_FAR_OFF)
    choose(browser, tmp_path, {"refused_once.jpg": make_image(891)})
    wait_for(lambda: browser.execute_script("return window.fakedPosts") == 1, 30, "the first send")
    browser.find_element(By.ID, "stop-sending").click()
    shown = finished_rows(browser, stack, 1, timeout_s=30)  # long before the 100 s resend
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

    wait_for(lambda: all(s in ("done", "failed") for s in states()), 120, "every row finished")
    items = {i.get_attribute("data-filename"): i for i in results()}
    refs = references(reference_model, files, top1_only=True)
    for name in files:
        assert items[name].get_attribute("data-state") == "done", items[name].text
        assert_row_shows(items[name], refs[name], name)
    assert psutil.pid_exists(master.pid)


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


# One file a request, a send given up on after 3 s without progress or 6 s without an
# answer, and resends soon after: a throttled upload's timeouts, short enough for a
# test. (At 3 s, one answer slow under load made a resend, failing the tests' counts.)
SHORT_SEND_TIMEOUTS = """
  document.body.dataset.filesPerRequest = '1';
  document.body.dataset.answerTimeoutMs = '6000';
  document.body.dataset.stallTimeoutMs = '3000';
  document.body.dataset.resendDelayScale = '0.05';"""


def test_a_slow_upload_that_keeps_going_is_not_cut_off(stack, browser, reference_model, tmp_path):
    """Given 30 s plus its bytes at 50 KB/s, with three sends sharing a 100 KB/s link,
    every chunk after the first would be cut off by the page's own timer, sent again
    four times on top of the others, then said to have found no server: 60 files in 100
    failed. Here with that time cut to 6 s plus the bytes at 50 KB/s (7.3 s), and a link
    at 25 KB/s that carries one chunk within it (2.7 s), not three (8 s). A send is given up on only
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


def last_announced(browser) -> str:
    """The last text record_announcements kept, "" before any."""
    said = browser.execute_script("return window.announced")
    return said[-1] if said else ""


def test_a_file_whose_sends_all_got_a_proxys_504_takes_the_result_its_stream_brought(
        stack, browser, reference_model, tmp_path):
    """The server stored late.jpg at its first send, and the batch's stream (open for
    first.jpg) brought its result while a proxy answered every send 504. The page kept
    that result for an answer that never came, then failed the row as unanswered: the
    stream sends nothing twice, and the minute's look passes rows with no item id."""
    files = {"first.jpg": make_image(1590, size=(64, 48)), "late.jpg": make_image(1591, size=(64, 48))}
    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      document.body.dataset.filesPerRequest = '1';
      document.body.dataset.resendDelayScale = '0.05';
      // Counts the stream's events for late.jpg done: heard before the page's own handler.
      const RealEventSource = window.EventSource;
      window.lateDone = 0;
      window.EventSource = class extends RealEventSource {
        constructor(...args) {
          super(...args);
          this.addEventListener("message", (event) => {
            const item = JSON.parse(event.data);
            if (item.filename === "late.jpg" && item.state === "done") window.lateDone += 1;
          });
        }
      };
      const realFetch = window.fetch;
      window.lateSends = 0;
      window.fetch = async (url, options) => {
        if (url !== "/api/jobs" || !options.body.getAll("files").some((f) => f.name === "late.jpg")) {
          return realFetch(url, options);
        }
        window.lateSends += 1;
        await realFetch(url, options);  // stored (once: its token)
        // The last send's 504 only once the stream has brought the result.
        while (window.lateSends === 5 && !window.lateDone) await new Promise((r) => setTimeout(r, 50));
        return new Response("<html><body><h1>504 Gateway Time-out</h1></body></html>",
                            {status: 504, headers: {"Content-Type": "text/html"}});
      };""")
    choose(browser, tmp_path, files)
    shown = finished_rows(browser, stack, 2, timeout_s=60)
    assert browser.execute_script("return [window.lateSends, window.lateDone > 0]") == [5, True]
    assert_classified(shown, files, reference_model)
    assert_stored_once(browser, stack, files)
