// "Send N failed files again": which failed files it offers (notWorthAgain), and
// sending them, each by its own upload (session.js sendAgain): a dead letter queued
// again in place, any other file uploaded again.
import { sayNext, sayOnce, someFiles, uploadBegins } from "./announce.js";
import { $ } from "./dom.js";
import { storedKey } from "./key.js";
import { FINISHED, isStopped } from "./rows.js";
import { page } from "./state.js";

// The one rule of which failed files "Send N failed files again" offers (README's
// page section says it too): "" for a file that sending again as it is could help,
// else why not, a key of LEFT_OUT. Worth it: a file not stored for the service's
// sake (no answer through the page's resends, a proxy's 502 or 504 in its place
// included; `busy`, `aws_unavailable`, or a 503 with no code, past them) or refused for an API key since changed in its box; and, of
// those a worker failed, a dead letter (the workers holding it crashed, stalled or were
// stopped: not known to be the image's doing) or an image gone from the input bucket
// (this page still has it); a file stored in a batch the server has since lost (its
// storage reset by a restart, or the batch expired: never tried); and one whose upload
// the user stopped: a stray press of "Stop sending" would leave the rest of a batch to
// be chosen again by hand. Not
// worth it: a file the server refuses for what it is (too large, empty, not an image,
// unreadable, a token conflict...: refusals.py Code, README "Error codes"), which it
// would refuse again; a worker's failure on the image itself (it could not decode or
// classify it, and the same bytes fail the same way); and a file the browser can no
// longer read.
const SEND_AGAIN_CODES = new Set(["busy", "aws_unavailable", "request_timeout"]);  // refusals.py SEND_AGAIN
// A web tier's answer without a code (a proxy's 502, 504 or 5xx not in JSON is an answer
// lost: session.js answerLost).
const NOT_THERE_YET = new Set([502, 503, 504]);
// A stored item's failure worth another try: a dead letter (its `code`, refusals.py
// DEAD_LETTER), or a worker's failure that begins as app_tier/fetch.py's missing input
// (test_web_uploads checks it), whose code is the worker's failure on the image.
export const DEAD_LETTER = "dead_letter";
const INPUT_MISSING = "the uploaded image is missing from the input bucket";
const LEFT_OUT = {  // as the page says them, after a count
  refused: "refused for the file itself",
  worker: "failed by a worker on the image itself",
  key: "refused for an API key not changed since",
  unreadable: "no longer readable by the browser",
};
// A row of a dead letter: the server queues it again in place, the same item (session.js
// queueAgain), with no need of its File. Unless the server could not (`notInPlace`: its
// image gone from the input bucket, or the item from the server): then it goes as a new
// upload, as a file no worker found does, if this page holds the File.
export function isDeadLetter(entry) {
  return Boolean(entry.id) && !entry.notInPlace && entry.el.dataset.code === DEAD_LETTER;
}
function notWorthAgain(entry) {
  // Stored, then lost with its batch (session.js lose): never tried, uploaded anew.
  if (entry.failure && entry.failure.lost) return "";
  if (entry.id) {  // stored, then failed by a worker or a dead letter
    const error = entry.el.querySelector(".error").textContent;
    return entry.el.dataset.code === DEAD_LETTER || error.startsWith(INPUT_MISSING) ? "" : "worker";
  }
  const failure = entry.failure || {};
  if (failure.unanswered) return "";
  if ("key" in failure) return failure.key === storedKey() ? "key" : "";
  if (failure.unreadable) return "unreadable";
  if (failure.stopped) return "";
  const serviceFailed = failure.code ? SEND_AGAIN_CODES.has(failure.code) : NOT_THERE_YET.has(failure.status);
  return serviceFailed ? "" : "refused";
}

// The failed files the page could send again, by upload: {offered: Map(session ->
// entries), count, stopped: how many of them the user stopped, leftOut: "" or why the
// others it holds are not offered}. Only files whose File this page view holds (a
// reloaded page has none), but dead letters, which the server holds. An upload still
// sending is left to end first (its own resends are under way): its failures join the
// offer then.
function failedFiles() {
  const offered = new Map(), leftOut = new Map();
  let count = 0, stopped = 0;
  for (const session of page.sessions) {
    if (session.uploading) continue;
    for (const entry of session.entries) {
      if (entry.el.dataset.state !== "failed" || !(entry.file || isDeadLetter(entry))) continue;
      const why = notWorthAgain(entry);
      if (why) {
        leftOut.set(why, (leftOut.get(why) || 0) + 1);
      } else {
        // Added to, not copied: copied at each, 10,000 failed files would take ~200 ms.
        if (!offered.has(session)) offered.set(session, []);
        offered.get(session).push(entry);
        count += 1;
        if (isStopped(entry.el)) stopped += 1;
      }
    }
  }
  const reasons = [...leftOut].map(([why, n]) => `${n} ${LEFT_OUT[why]}`);
  return { offered, count, stopped, leftOut: reasons.length ? `not offered: ${reasons.join(", ")}` : "" };
}

// The files the user stopped named apart, as the summary counts them ("10 failed, 900
// not sent (stopped)"): "Send 910 failed files again" beside it would call them failed.
function offerText(count, stopped) {
  const failed = count - stopped;
  const failedOnes = `${failed} failed file${failed === 1 ? "" : "s"} again`;
  const notSent = stopped === 1 ? "the file not sent" : `the ${stopped} files not sent`;
  return `Send ${!stopped ? failedOnes : !failed ? notSent : `${failedOnes} and ${notSent}`}`;
}

export function showSendAgain() {
  const { count, stopped, leftOut } = failedFiles();
  const button = $("send-again");
  // Hidden with the focus on it (its files went), it would leave the focus on nothing.
  if (!count && document.activeElement === button) $("download-csv").focus();
  button.hidden = !count;
  button.textContent = offerText(count, stopped);
  const note = $("send-again-note");
  note.textContent = count && leftOut ? `(${leftOut})` : "";
  note.hidden = !note.textContent;
}

// The rows sent again whose outcome is still to be said (sayAgainDone): a set, as a row
// refused at once may be pressed again while others still wait, and is one row.
const sentAgain = new Set();
export function wireSendAgain() {
  $("send-again").addEventListener("click", sendFailedAgain);
}

function sendFailedAgain() {
  const { offered, count, leftOut } = failedFiles();
  if (!count) return;
  for (const [session, entries] of offered) {
    for (const entry of entries) sentAgain.add(entry);
    session.sendAgain(entries);  // its rows are "uploading" once this returns
  }
  uploadBegins();  // its first failure is said as an upload's is
  sayOnce(`Sending ${someFiles(count)} again${leftOut ? `; ${leftOut}` : ""}`);
}

// Once every row sent again has finished, how they ended is said, once: the counts
// said at the end are the page's, the first upload's files among them.
export function sayAgainDone() {
  if (!sentAgain.size) return;  // (each summary's refresh asks)
  const rows = [...sentAgain];
  if (!rows.every(({ el }) => FINISHED.has(el.dataset.state))) return;
  const failed = rows.filter(({ el }) => el.dataset.state === "failed" && !isStopped(el)).length;
  const stopped = rows.filter(({ el }) => isStopped(el)).length;
  const classified = rows.length - failed - stopped;
  sayNext(`Of the ${someFiles(rows.length)} sent again, ${classified} classified` +
          `${failed ? `, ${failed} failed again` : ""}${stopped ? `, ${stopped} not sent (stopped)` : ""}`);
  sentAgain.clear();
}
