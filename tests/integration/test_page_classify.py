"""The upload page in a real browser (Debian's headless Chromium via its chromedriver):
files chosen and classified, the plain form without JavaScript, chunks within the server's
limits, names the server cleans, and API keys."""

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
    KEY_IS_RIGHT,
    LUMINANCE,
    NEEDS_CHROMIUM,
    UPLOADS_BY_FETCH,
    assert_classified,
    assert_stored_once,
    choose,
    chromium,
    drop_files,
    finished_rows,
    record_announcements,
    rows_shown,
    send_again_button,
    server_items,
    states_shown,
)

pytestmark = [NEEDS_CHROMIUM, STACK_TIMEOUT]


HOSTILE = '<img src=x onerror="document.title=\'pwned\'">.png'


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


def test_names_are_shown_cleaned_before_the_server_has_them(stack, browser):
    """Rows still uploading, refused before upload or not stored, shown as chosen, would
    keep bidi controls: "photo\\u202eabc.exe.jpg" reads as "photogpj.exe.cba". They are
    shown as the server keeps them."""
    small, big = make_image(998, size=(64, 48)), make_image(999, size=(800, 600))
    files = {"photo\u202eabc.exe.jpg": small, "line\u2028break\x07.jpg": small,
             "tag\U000e0041\U000e0042.jpg": small, " big\u2066.jpg": big}  # ASCII in tag characters
    cleaned = ["photoabc.exe.jpg", "line break .jpg", "tag.jpg", "big.jpg"]
    browser.get(stack.web_url + "/")
    browser.execute_script(UPLOADS_BY_FETCH + """
      document.body.dataset.maxFileBytes = arguments[0];
      const realFetch = window.fetch;  // no upload is ever answered
      window.fetch = (url, options) => url === "/api/jobs" ? new Promise(() => {}) : realFetch(url, options);
      """, str(len(small)))
    assert drop_files(browser, files)
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["uploading"] * 3 + ["failed"], 30,
             "three rows uploading, the large file refused")
    assert [name for name, _, _ in rows_shown(browser)] == cleaned
    names = "return [...document.querySelectorAll('#results .name')].map((name) => name.textContent)"
    assert browser.execute_script(names) == cleaned

    browser.refresh()
    browser.execute_script("document.body.dataset.unsentWatchMs = '500';")
    wait_for(lambda: [s for _, s, _ in rows_shown(browser)] == ["failed"] * 4, 30, "the saved files")
    shown = rows_shown(browser)
    assert [name for name, _, _ in shown] == cleaned and browser.execute_script(names) == cleaned
    assert [state for _, state, _ in shown] == ["failed"] * 4
    assert all("not stored" in text for _, _, text in shown[:3])


# The page's uploads (real XMLHttpRequests) wait to be sent while window.held.
HOLD_UPLOADS = """
  window.held = true;
  window.XMLHttpRequest = class extends window.XMLHttpRequest {
    send(body) {
      const go = () => (window.held ? setTimeout(go, 50) : super.send(body));
      go();
    }
  };"""


def test_names_the_server_reads_otherwise_than_typed_are_shown_as_it_reads_them_from_the_start(
        stack, browser):
    """Werkzeug reads a multipart file name as a quoted string: a backslash escapes the
    next character, and %22 (how browsers write a quote) is a quote (docs/known-limits.md;
    load_test.py received_name). "dir\\name.jpg" showed as typed while uploading, then
    changed to "dirname.jpg" once stored. Each row shows from the start the name the
    server then stores (sent by a real XMLHttpRequest, held back meanwhile)."""
    names = {"dir\\name.jpg": "dirname.jpg", "two\\\\back.jpg": "two\\back.jpg",
             'quo"te.jpg': 'quo"te.jpg', "pct%22.jpg": 'pct".jpg', "new\nline.jpg": "new%0Aline.jpg"}
    browser.get(stack.web_url + "/")
    browser.execute_script(HOLD_UPLOADS)
    assert drop_files(browser, {name: make_image(1540 + i, size=(64, 48)) for i, name in enumerate(names)})
    wait_for(lambda: [state for _, state, _ in rows_shown(browser)] == ["uploading"] * len(names), 30,
             "the rows, uploading")
    assert [name for name, _, _ in rows_shown(browser)] == list(names.values())
    browser.execute_script("window.held = false;")
    shown = finished_rows(browser, stack, len(names), timeout_s=120)
    assert all(row.get_attribute("data-state") == "done" for row in shown.values()), list(shown)
    assert [name for name, _, _ in rows_shown(browser)] == list(names.values())
    batch_id = browser.current_url.split("#batches=")[1]
    assert sorted(item["filename"] for item in server_items(stack, batch_id)) == sorted(names.values())


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
