"""The upload page in a real browser: folders chosen or dropped, hidden and skipped
files, files dropped anywhere on the page, and touch screens (offered images only)."""

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
    NEEDS_CHROMIUM,
    choose,
    choose_folder,
    drop_files,
    finished_rows,
    record_announcements,
    rows_shown,
)

pytestmark = [NEEDS_CHROMIUM, STACK_TIMEOUT]


def test_files_dropped_anywhere_on_the_page_are_uploaded(stack, browser, reference_model):
    """Dropped beside the drop zone, a file was left to the browser, which opens it in
    the tab: the page and its uploads were gone."""

    data = make_image(970)
    browser.get(stack.web_url + "/")
    assert drop_files(browser, {"dropped.jpg": data})
    shown = finished_rows(browser, stack, 1, timeout_s=60)
    assert_row_shows(shown["dropped.jpg"], reference(reference_model, data), "dropped.jpg")


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
