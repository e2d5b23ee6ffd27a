// The summary line under the rows, and all that follows them at each refresh: the
// tools shown (filter, CSV, "Stop sending", "Send again"), the tab's title, and what
// screen readers hear. Refreshed through refresh.js's updateSummary.
import { announceProgress, sayNext } from "./announce.js";
import { sayAgainDone, showSendAgain } from "./again.js";
import { bytesOf } from "./chunks.js";
import { onlyFailed } from "./csv.js";
import { $, resultsEl } from "./dom.js";
import { updateSummary } from "./refresh.js";
import { isStopped } from "./rows.js";
import { page, sendingSessions } from "./state.js";

const TITLE = document.title;

// Of the uploads under way, all of them: the files answered, in hand and still to go.
// Of the requests in flight alone, the figures would go backwards as each ended, and
// never say the upload's size.
// The uploads since none was under way: one that ended while another goes on stays
// in the figures, which would go back ("75 of 100" to "25 of 50") as it left.
// What went counts as sent, a request answered 503 or cut off included: its files to
// go again add their bytes to the size instead. Taken back from the bytes sent, the
// figure would go backwards at each resend ("1.0 of 2.0 MB" after "2.0 of 2.0").
// (page.sendingNow: those uploads.)
function sendingText() {
  const { sendingNow } = page;
  const uploading = page.sessions.filter((session) => session.uploading);
  if (!uploading.length) sendingNow.clear();
  for (const session of uploading) sendingNow.add(session);
  let sent = 0, size = 0;
  for (const session of sendingNow) {
    const toGo = [...session.inHand, ...session.queue.map(({ chunk }) => chunk), ...session.resends.values()];
    sent += session.sentBytes;
    size += session.sentBytes + bytesOf(toGo.flat());
  }
  for (const bytes of page.sendProgress.values()) sent += bytes;
  if (!size) return "";
  const { amount, unit } = inUnits(size);
  if (sent >= size && page.awaitingAnswer.size) {
    return `sent ${amount(size)} ${unit}; the server is storing the files`;
  }
  return `sending ${amount(Math.min(sent, size))} of ${amount(size)} ${unit}`;
}

// Both figures in the unit of the whole `size`: kB below 0.1 MB, where MB to one decimal
// said "sending 0.0 of 0.0 MB" of a few small images; kB to one decimal below 10.
function inUnits(size) {
  if (size >= 0.1 * 1048576) return { amount: (bytes) => (bytes / 1048576).toFixed(1), unit: "MB" };
  return { amount: (bytes) => (bytes / 1024).toFixed(size < 10 * 1024 ? 1 : 0), unit: "kB" };
}


// ", 10 failed, 900 not sent (stopped)": the files the user stopped ("Stop sending"),
// though failed rows, are said apart. Counted as failed, 900 of 1,000 files stopped on
// purpose would read "90 of 1000 classified, 910 failed", a service gone wrong.
function failedText(failed, stopped) {
  return `${failed ? `, ${failed} failed` : ""}${stopped ? `, ${stopped} not sent (stopped)` : ""}`;
}

export function refreshSummary() {
  const all = resultsEl.querySelectorAll(".result");
  let done = 0, failed = 0, stopped = 0;  // failed: those not stopped
  for (const el of all) {
    if (el.dataset.state === "done") done += 1;
    else if (el.dataset.state === "failed" && isStopped(el)) stopped += 1;
    else if (el.dataset.state === "failed") failed += 1;
  }
  const counts = all.length ? `${done} of ${all.length} classified${failedText(failed, stopped)}` : "";
  const sending = sendingText();
  const notices = page.notices.map((notice) => (typeof notice === "function" ? notice() : notice));
  $("summary").textContent = [counts, sending, ...notices, ...page.folderNotices].filter(Boolean)
    .join(" · ");
  // Among hundreds of rows, the few that failed are the ones to act on: not those the
  // user stopped, among which they would be lost (10 among 900), and which "Send
  // again" offers anyway.
  const onlyFailedBox = $("only-failed-box");
  if (!failed && !onlyFailedBox.hidden) {
    // No row failed any more (a late answer replaced a failure): hidden with the focus
    // on it, the focus would fall to the page's body; and left checked, it would filter
    // the rows at once when a failure brought it back.
    if (document.activeElement === $("only-failed")) $("download-csv").focus();
    $("only-failed").checked = false;
  }
  onlyFailedBox.hidden = !failed;
  $("only-failed-count").textContent = failed ? ` (${failed})` : "";
  resultsEl.classList.toggle("only-failed", Boolean(failed) && $("only-failed").checked);
  const unfinished = done + failed + stopped < all.length;
  $("download-csv").textContent = onlyFailed() ? "Download the failed files (CSV)"
    : unfinished ? "Download the results so far (CSV)" : "Download the results (CSV)";
  $("tools").hidden = !all.length;
  const stopSending = $("stop-sending");
  const stoppable = sendingSessions().length > 0;
  // Hidden with the focus on it (the uploads ended), it would leave the focus on nothing.
  if (!stoppable && document.activeElement === stopSending) $("download-csv").focus();
  stopSending.hidden = !stoppable;
  showSendAgain();
  sayAgainDone();
  const finished = !unfinished;
  // The tab's title follows too: a user waiting in another tab could not. Once all
  // are finished it says how they ended, until the next upload: back to the bare
  // title, a user coming back to the tab could not tell.
  const ended = `Done: ${done} classified${failedText(failed, stopped)}`;
  document.title = !counts ? TITLE : finished ? `${ended} · ${TITLE}`
    : `(${done + failed + stopped}/${all.length}) ${TITLE}`;
  announceProgress(counts, sending, failed, stopped, finished);
}

// The filter and "Stop sending", which the summary shows or hides.
export function wireTools() {
  $("only-failed").addEventListener("change", updateSummary);
  $("stop-sending").addEventListener("click", () => {
    // Rows being sent stay "uploading" until their request ends: said, or the press
    // would seem to do nothing. In the one text the summary's next refresh says,
    // with the files the stop left unsent if any: said apart, ms apart, one goes unheard.
    sayNext("Stopped: files already on their way finish sending, the rest are not sent");
    for (const session of page.sessions) session.stop();
    updateSummary();
    $("download-csv").focus();  // the button goes: else focus is left on nothing
  });
}
