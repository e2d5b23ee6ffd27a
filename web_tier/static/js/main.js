// The upload page: send images in chunks, then follow their results live.
// User data (file names, labels, errors) is only ever set with textContent.
import { PARALLEL_CHUNKS, RESEND_DELAYS_MS, resendDelayMs, setting, tooLargeText } from "./settings.js";
import { fetchBatch, freeSendPlace, post, refusedWhole, takeSendPlace, timeoutSignal } from "./http.js";
import { page } from "./state.js";
import { refreshSummaryNow, setSummaryRefresh, updateSummary } from "./refresh.js";

const { sendProgress } = page;
const POLL_MS = 2000;        // fallback polling when EventSource fails
const STATUS_MS = 2000;
const SSE_GIVE_UP = 3;       // consecutive stream errors before polling instead
// Event streams open at once; other batches are polled. Each holds one of the
// browser's six connections to the server until its batch is done: one per upload
// left later uploads, the status line and other tabs waiting (explorer).
const MAX_STREAMS = 2;
const KEY_STORE = "imgclass.apiKey";
const BATCH_ID = /^[0-9a-f]{32}$/;
const SHOWN_STORE = "imgclass.shown.";  // + batch id, in this tab's sessionStorage
const UNCONFIRMED_STORE = "imgclass.unconfirmed.";  // + id of a batch not yet known to hold a file
const FINISHED = new Set(["done", "failed"]);
// A file this tab had chosen but not yet heard stored when the page was reloaded or left.
const NOT_STORED = "not stored: its upload had not finished when the page was left or reloaded; choose it again";
// A file of a batch another tab was sending, not stored once that tab had ended its
// sends (or was closed or reloaded): this page was not left, nor the file cut off here.
const NOT_STORED_ELSEWHERE = "not stored by the tab that sent it; see that tab for why";
// Its sender answers no more: closed or reloaded, it has no reason left to show (reviewer).
const NOT_STORED_SENDER_GONE = "not stored: the tab sending it was closed or reloaded; choose it again";

const $ = (id) => document.getElementById(id);
const resultsEl = $("results");
const template = $("result-template");
const banner = $("untrained-banner");
const keyBox = $("api-key-box");
const keyInput = $("api-key");
const sessions = [];
const notices = [];      // said in the summary line, e.g. a batch that could not be loaded
let droppedSaid = false; // a batch left the address (maxBatchesInUrl): said once
// What the last upload's folders held that was not sent (or that they are still being
// read): replaced at each upload, where kept they piled up across uploads (reviewer).
let folderNotices = [];
let leaving = false;     // the page is being unloaded: its uploads are cut off, not refused
let openStreams = 0;
const TITLE = document.title;
window.addEventListener("pagehide", () => { leaving = true; });
// Back in view from the back/forward cache: live again, its uploads go on (they
// were left "uploading" for good, none sent again).
window.addEventListener("pageshow", () => { leaving = false; });

// --- API key ---------------------------------------------------------------
function storedKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}
function authHeaders() {
  const key = storedKey();
  return key ? { "X-API-Key": key } : {};
}
// An HTTP header carries printable ASCII only (fetch refuses anything else before
// sending, which read as "no server"): a key pasted with a curly quote is said to be wrong.
const HEADER_SAFE = /^[\x20-\x7e]*$/;
function keyProblem() {
  return HEADER_SAFE.test(storedKey()) ? "" :
    "the API key holds a character an HTTP header cannot carry: enter it again above";
}
keyInput.value = storedKey();
// As typed, not only on leaving the box: files dropped straight after typing were sent
// without it (explorer).
// Why the key did not do, beside the box (and read with it), not only in the rows.
function sayKeyProblem(text) {
  keyBox.hidden = false;
  $("api-key-problem").textContent = text;
  $("api-key-problem").hidden = !text;
  if (text) keyInput.setAttribute("aria-invalid", "true");
  else keyInput.removeAttribute("aria-invalid");
}
for (const type of ["input", "change"]) {
  keyInput.addEventListener(type, () => {
    sayKeyProblem("");
    try { localStorage.setItem(KEY_STORE, keyInput.value.trim()); } catch { /* private mode */ }
    updateSummary();  // files refused for the old key may now be sent again (notWorthAgain)
  });
}
// Enter in the box would submit its form, reloading the page and cutting off uploads.
keyBox.addEventListener("submit", (event) => event.preventDefault());

const bytesOf = (entries) => entries.reduce((bytes, { file }) => bytes + (file ? file.size : 0), 0);
// Of the uploads under way, all of them: the files answered, in hand and still to go.
// Of the requests in flight alone, the figures went backwards as each ended, and
// never said the upload's size (reviewer).
// The uploads since none was under way: one that ended while another goes on stays
// in the figures, which went back ("75 of 100" to "25 of 50") as it left (reviewer).
// What went counts as sent, a request answered 503 or cut off included: its files to
// go again add their bytes to the size instead. Taken back from the bytes sent, the
// figure went backwards at each resend ("1.0 of 2.0 MB" after "2.0 of 2.0").
const sendingNow = new Set();
function sendingText() {
  const uploading = sessions.filter((session) => session.uploading);
  if (!uploading.length) sendingNow.clear();
  for (const session of uploading) sendingNow.add(session);
  let sent = 0, size = 0;
  for (const session of sendingNow) {
    const toGo = [...session.inHand, ...session.queue.map(({ chunk }) => chunk), ...session.resends.values()];
    sent += session.sentBytes;
    size += session.sentBytes + bytesOf(toGo.flat());
  }
  for (const bytes of sendProgress.values()) sent += bytes;
  if (!size) return "";
  const mb = (bytes) => (bytes / 1048576).toFixed(1);
  return `sending ${mb(Math.min(sent, size))} of ${mb(size)} MB`;
}


// Files per POST /api/jobs: filesPerRequest, 20 at most.
function chunkFiles() {
  return Math.max(1, Math.min(20, setting("filesPerRequest")));
}

// And 8 MB at most whatever the limit (maxChunkBytes): a request carrying 100 MB of
// photos holds its files back from classification until the last byte is in, and is
// all sent again if the link drops near its end.
const CHUNK_BYTES = 8 * 1024 * 1024;
function maxChunkBytes() {
  return Math.min(CHUNK_BYTES, setting("maxChunkBytes"));
}

// `entries` in chunks of at most chunkFiles() files and maxChunkBytes() bytes (a file
// alone may be larger: the server then says why).
function chunked(entries) {
  const chunks = [];
  let bytes = 0;
  for (const entry of entries) {
    const last = chunks[chunks.length - 1];
    if (last && last.length < chunkFiles() && bytes + entry.file.size <= maxChunkBytes()) {
      last.push(entry);
      bytes += entry.file.size;
    } else {
      chunks.push([entry]);
      bytes = entry.file.size;
    }
  }
  return chunks;
}

// --- result elements ---------------------------------------------------------
function makeResult(name, after = null) {
  const el = template.content.firstElementChild.cloneNode(true);
  setName(el, name);
  setState(el, "uploading");
  if (after) after.after(el);
  else resultsEl.append(el);
  return el;
}

// The name as the server keeps it once it has one (control and bidi characters
// taken out), so that the page shows what a reload and the output bucket show; and
// cleaned the same way before (uploading, refused unsent, not stored): shown raw,
// "photo\u202eabc.exe.jpg" read as "photogpj.exe.cba" (explorer).
function setName(el, name) {
  const shown = shownName(name);
  el.dataset.filename = shown;
  el.querySelector(".name").textContent = shown;
}

// As web_tier/filenames.py clean_name (its _BIDI_CONTROLS and _LINE_BREAKING), but
// not cut for length: bidi controls dropped, controls and line or paragraph
// separators shown as spaces, trimmed. Files are still matched by token, not name.
const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const LINE_BREAKING = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g;
function shownName(name) {
  return name.replace(BIDI_CONTROLS, "").replace(LINE_BREAKING, " ").trim() || "upload";
}

// Where a file was in the folder it came from, for one whose name another file of
// its upload has too: two "same.jpg" from two subfolders were two rows alike (reviewer).
function setPath(el, path) {
  const folder = (path || "").split("/").slice(0, -1).join("/");
  el.dataset.path = folder ? path : "";
  el.querySelector(".path").textContent = folder ? `in ${folder}/` : "";
  el.querySelector(".path").hidden = !folder;
}

function setState(el, state) {
  el.dataset.state = state;
  el.querySelector(".state").textContent = state;
}

// A row whose file was sent again (`times`: how many times) says so, beside its
// state: its failure gone, the row would otherwise read as if all had gone well the
// first time, and a reload in this tab says it too (save).
function showSentAgain(entry, times) {
  entry.again = times;
  const mark = entry.el.querySelector(".again");
  mark.textContent = times > 1 ? `sent again (${times} times)` : "sent again";
  mark.hidden = false;
}

function formatScore(score) {
  return typeof score === "number" ? `${(score * 100).toFixed(1)}%` : "";
}

function showFailure(el, message) {
  if (FINISHED.has(el.dataset.state)) return;
  setState(el, "failed");
  el.querySelector(".error").textContent = message;
  updateSummary();
}

function showItem(el, item) {
  // The first answer wins, as on the server: a replayed event changes nothing. But a
  // late answer does replace a failure (a dead letter's, which the server replaces
  // too): the row stayed "failed" while the batch said "done" (reviewer).
  const lateAnswer = el.dataset.state === "failed" && item.state === "done";
  if (FINISHED.has(el.dataset.state) && !lateAnswer) return;
  if (lateAnswer) el.querySelector(".error").textContent = "";
  if (item.state === "queued") {
    setState(el, "queued");
    return;
  }
  if (item.state === "failed") {
    showFailure(el, item.error || "failed");
    return;
  }
  el.dataset.label = item.label ?? "";
  el.dataset.score = typeof item.score === "number" ? item.score.toFixed(6) : "";
  el.querySelector(".label").textContent = item.label ?? "";
  el.querySelector(".score").textContent = formatScore(item.score);
  const top5 = el.querySelector(".top5");
  top5.replaceChildren();
  for (const guess of item.top5 || []) {
    const li = document.createElement("li");
    li.textContent = `${guess.label} ${formatScore(guess.score)}`;
    top5.append(li);
  }
  el.querySelector(".guesses").hidden = !top5.children.length;
  // Named for its row: 200 disclosures all read "top 5" (reviewer).
  el.querySelector(".guesses summary").setAttribute("aria-label", `top 5 for ${el.dataset.filename}`);
  if (item.untrained) {
    el.classList.add("untrained");
    el.querySelector(".untrained-mark").hidden = false;
    banner.hidden = false;
  }
  setState(el, "done");
  updateSummary();
}

setSummaryRefresh(refreshSummary);

function refreshSummary() {
  const all = resultsEl.querySelectorAll(".result");
  let done = 0, failed = 0;
  for (const el of all) {
    if (el.dataset.state === "done") done += 1;
    else if (el.dataset.state === "failed") failed += 1;
  }
  const counts = all.length ? `${done} of ${all.length} classified${failed ? `, ${failed} failed` : ""}` : "";
  $("summary").textContent = [counts, sendingText(), ...notices, ...folderNotices].filter(Boolean).join(" · ");
  // Among hundreds of rows, the few that failed are the ones to act on.
  const onlyFailedBox = $("only-failed-box");
  if (!failed && !onlyFailedBox.hidden) {
    // No row failed any more (a late answer replaced a failure): hidden with the focus
    // on it, the focus fell to the page's body; and left checked, it filtered the
    // rows at once when a failure brought it back (reviewer).
    if (document.activeElement === $("only-failed")) $("download-csv").focus();
    $("only-failed").checked = false;
  }
  onlyFailedBox.hidden = !failed;
  $("only-failed-count").textContent = failed ? ` (${failed})` : "";
  resultsEl.classList.toggle("only-failed", Boolean(failed) && $("only-failed").checked);
  $("download-csv").textContent = onlyFailed() ? "Download the failed files (CSV)"
    : done + failed < all.length ? "Download the results so far (CSV)" : "Download the results (CSV)";
  $("tools").hidden = !all.length;
  const stopSending = $("stop-sending");
  const sending = sessions.some((session) => session.uploading && !session.stopped);
  // Hidden with the focus on it (the uploads ended), it left the focus on nothing.
  if (!sending && document.activeElement === stopSending) $("download-csv").focus();
  stopSending.hidden = !sending;
  showSendAgain();
  sayAgainDone();
  const finished = done + failed === all.length;
  // The tab's title follows too: a user waiting in another tab could not. Once all
  // are finished it says how they ended, until the next upload: it went back to the
  // bare title, and a user coming back to the tab could not tell (reviewer).
  const ended = `Done: ${done} classified${failed ? `, ${failed} failed` : ""}`;
  document.title = !counts ? TITLE : finished ? `${ended} · ${TITLE}` : `(${done + failed}/${all.length}) ${TITLE}`;
  announceProgress(counts, failed, finished);
}

// What screen readers hear: not each result (hundreds would flood them), but each
// upload's first failure at once with its reason, the count (and the MB sent, while
// sending) every setting("announceEveryMs") while it changes, and the count once all are
// finished. Said only at the end, 500 files gave 24 s of silence, a refused API key
// none at all; said for the page's first failure only, a later upload's refused key
// never was (reviewers). A count that does not change is said again less and less
// often (15 s, 30, 60, then every 120 s): a stalled run said "0 of 500 classified"
// every 15 s for ever (reviewer). The summary's notices are said once each (sayOnce).
const REPEAT_BACK_OFF_MAX = 8;  // the same count waits at most 8 periods: 120 s
let announcedAt = 0;      // when the live region was last given a text
let announceTimer = null; // the next time a count may be due
let progressSaid = "";    // the count (with the MB sent) said last
let repeatMs = 0;         // how long after it the same count is said again
const notesForNext = [];  // said once, first in the next announcement, whatever it is
let failedAtUpload = 0;   // the page's failed rows when the latest upload began
let failureSaid = false;  // ...and whether one of its failures has been said
function uploadBegins() {
  failedAtUpload = resultsEl.querySelectorAll('.result[data-state="failed"]').length;
  failureSaid = false;
}
// `text` is said once, with the summary's next refresh: only the summary line showed
// its notices, and a folder of no images was chosen in silence (reviewer).
function sayOnce(text) {
  notesForNext.push(text);
  updateSummary();
}
// A notice kept in the summary line, and said once (`spoken`, where the shown text
// is no good read aloud).
function addNotice(text, spoken = text) {
  notices.push(text);
  sayOnce(spoken);
}
// A long name said whole took a screen reader half a minute (reviewer): its start and
// end, cut between characters as seen (a flag or a family emoji kept whole).
const graphemes = typeof Intl !== "undefined" && Intl.Segmenter
  ? (text) => Array.from(new Intl.Segmenter(undefined, { granularity: "grapheme" }).segment(text),
                         ({ segment }) => segment)
  : (text) => Array.from(text);
function shortened(name) {
  const parts = graphemes(name);
  return parts.length > 60 ? `${parts.slice(0, 40).join("")}…${parts.slice(-15).join("")}` : name;
}
function announceProgress(counts, failed, finished) {
  clearTimeout(announceTimer);
  announceTimer = null;
  const every = setting("announceEveryMs");
  // With how far the sending has got: on a slow link the count alone stayed
  // "0 of 24 classified" for minutes, where the summary showed the MB (reviewer).
  const progress = [counts, sendingText()].filter(Boolean).join(", ");
  const heard = (said) => {  // the count in `said` is the one to say again, later
    if (said !== progressSaid) repeatMs = every;
    progressSaid = said;
  };
  let text = null;
  if (counts) {
    if (!announcedAt) announcedAt = Date.now();  // the first files chosen start the clock
    const changed = progress !== progressSaid;
    const due = Date.now() >= announcedAt + (changed ? every : repeatMs);
    if (failed > failedAtUpload && !failureSaid) {
      failureSaid = true;  // later ones are in the counts said every setting("announceEveryMs")
      // The newest rows are last: the latest upload's.
      const rows = resultsEl.querySelectorAll('.result[data-state="failed"]');
      const newest = rows[rows.length - 1];
      const said = shortened(newest.dataset.filename);
      text = `${counts}. ${said}: ${newest.querySelector(".error").textContent}`;
      heard(counts);  // with it: not said again bare at once, which cut the reason off
    } else if (changed ? finished || due : !finished && due) {
      text = progress;
      if (!changed) repeatMs = Math.min(2 * repeatMs, REPEAT_BACK_OFF_MAX * every);
      heard(progress);
    }
  }
  const notes = notesForNext.splice(0);
  if (notes.length) text = [...notes, text].filter(Boolean).join(". ");
  if (text !== null) {
    announcedAt = Date.now();
    $("announce").textContent = text;
  }
  if (counts && !finished) {
    // Nothing changes while files wait for a worker: without a timer, the count due
    // was not said (24 s of silence from a cold start: reviewer). None once all are
    // finished: left to fire, it said the final count a second time.
    const next = announcedAt + (progress === progressSaid ? repeatMs : every);
    announceTimer = setTimeout(refreshSummaryNow, Math.max(next - Date.now(), 0));
  }
}

// The rows on the page as a CSV file, in their order: with the files the server
// refused, which a batch's GET /api/jobs/<id>/results.csv cannot hold (they were never
// stored: a reviewer's CSV of 1,500 files had none of its 38 failed), and the path of
// each file chosen in a folder. A byte-order mark first, for Excel to read the names as UTF-8.
const CSV_COLUMNS = ["filename", "path", "state", "label", "score", "error", "untrained"];
const FORMULA_START = /^[=+\-@\t\r]/;
function csvCell(value) {
  // A cell a spreadsheet would run as a formula is shown as text (web_tier/results_csv.py).
  const text = FORMULA_START.test(value) ? `'${value}` : value;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}
function resultsCsv() {
  const lines = [CSV_COLUMNS.join(",")];
  for (const el of resultsEl.querySelectorAll(onlyFailed() ? '.result[data-state="failed"]' : ".result")) {
    const row = el.dataset;
    const done = row.state === "done";
    // A label's own model says; for a row without one, the model the page knows of.
    const untrained = done ? el.classList.contains("untrained") : !banner.hidden;
    const error = row.state === "failed" ? el.querySelector(".error").textContent : "";
    const path = row.chosenPath || row.path || "";  // a restored row knows it only if shown
    lines.push([row.filename, path, row.state, done ? row.label : "", done ? row.score : "",
                error, String(untrained)].map(csvCell).join(","));
  }
  return "\ufeff" + lines.join("\r\n") + "\r\n";
}
// What is shown is what is downloaded: with the filter on, the failed files alone.
function onlyFailed() {
  return resultsEl.classList.contains("only-failed");
}
$("download-csv").addEventListener("click", () => {
  const url = URL.createObjectURL(new Blob([resultsCsv()], { type: "text/csv;charset=utf-8" }));
  const link = document.createElement("a");
  link.href = url;
  const now = new Date();
  const stamp = new Date(now - now.getTimezoneOffset() * 60000).toISOString().slice(0, 19).replace(/:/g, "-");
  link.download = `results-${stamp}.csv`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
});
$("only-failed").addEventListener("change", updateSummary);
const STOPPED_AGAIN = "not sent again: you stopped the upload (the server may hold it: reload to see)";
$("stop-sending").addEventListener("click", () => {
  // Rows being sent stay "uploading" until their request ends: said, or the press
  // seemed to do nothing (reviewer). In the one text the summary's next refresh says,
  // with the files the stop left unsent if any: said apart, ms apart, one went unheard.
  notesForNext.push("Stopped: files already on their way finish sending, the rest are not sent");
  for (const session of sessions) session.stop();
  updateSummary();
  $("download-csv").focus();  // the button goes: focus left on nothing (reviewer)
});

// --- sending failed files again ---------------------------------------------------
// The one rule of which failed files "Send N failed files again" offers (README's
// page section says it too): "" for a file that sending again as it is could help,
// else why not, a key of LEFT_OUT. Worth it: a file not stored for the service's
// sake (no answer through the page's resends; `busy`, `aws_unavailable`, or a 502-504
// with no code, past them) or refused for an API key since changed in its box; and, of
// those a worker failed, a dead letter (the workers holding it crashed, stalled or were
// stopped: not known to be the image's doing) or an image gone from the input bucket
// (this page still has it). Not worth it: a file the server refuses for what it is
// (too large, empty, not an image, unreadable, a token conflict...: refusals.py Code,
// README "Error codes"), which it would refuse again; a worker's failure on the image
// itself (it could not decode or classify it, and the same bytes fail the same way);
// a file the browser can no longer read; and one whose upload the user stopped.
const SEND_AGAIN_CODES = new Set(["busy", "aws_unavailable"]);  // refusals.py SEND_AGAIN
const NOT_THERE_YET = new Set([502, 503, 504]);  // a proxy's, or a web tier's answer without JSON
// How the worker failures worth another try begin: common/failure_tags.py
// DEAD_LETTER_ERROR, and app_tier/worker.py's missing input (test_web_uploads checks both).
const WORKER_MAY_DO_BETTER = ["could not be processed: no worker answered for it",
                              "the uploaded image is missing from the input bucket"];
const LEFT_OUT = {  // as the page says them, after a count
  refused: "refused by the server for the file itself",
  worker: "failed by a worker on the image itself",
  key: "refused for an API key not changed since",
  unreadable: "no longer readable by the browser",
  stopped: "stopped by you",
};
function notWorthAgain(entry) {
  if (entry.id) {  // stored, then failed by a worker or a dead letter
    const error = entry.el.querySelector(".error").textContent;
    return WORKER_MAY_DO_BETTER.some((start) => error.startsWith(start)) ? "" : "worker";
  }
  const failure = entry.failure || {};
  if (failure.unanswered) return "";
  if ("key" in failure) return failure.key === storedKey() ? "key" : "";
  if (failure.unreadable) return "unreadable";
  if (failure.stopped) return "stopped";
  const serviceFailed = failure.code ? SEND_AGAIN_CODES.has(failure.code) : NOT_THERE_YET.has(failure.status);
  return serviceFailed ? "" : "refused";
}

// The failed files the page could send again, by upload: {offered: Map(session ->
// entries), count, leftOut: "" or why the others it holds are not offered}. Only
// files whose File this page view holds: a reloaded page has none, and no button.
// An upload still sending is left to end first (its own resends are under way):
// its failures join the offer then.
function failedFiles() {
  const offered = new Map(), leftOut = new Map();
  let count = 0;
  for (const session of sessions) {
    if (session.uploading) continue;
    for (const entry of session.entries) {
      if (!entry.file || entry.el.dataset.state !== "failed") continue;
      const why = notWorthAgain(entry);
      if (why) {
        leftOut.set(why, (leftOut.get(why) || 0) + 1);
      } else {
        offered.set(session, [...(offered.get(session) || []), entry]);
        count += 1;
      }
    }
  }
  const reasons = [...leftOut].map(([why, n]) => `${n} ${LEFT_OUT[why]}`);
  return { offered, count, leftOut: reasons.length ? `not offered: ${reasons.join(", ")}` : "" };
}
const someFiles = (n) => `${n} file${n === 1 ? "" : "s"}`;

function showSendAgain() {
  const { count, leftOut } = failedFiles();
  const button = $("send-again");
  // Hidden with the focus on it (its files went), it left the focus on nothing.
  if (!count && document.activeElement === button) $("download-csv").focus();
  button.hidden = !count;
  button.textContent = `Send ${count} failed file${count === 1 ? "" : "s"} again`;
  const note = $("send-again-note");
  note.textContent = count && leftOut ? `(${leftOut})` : "";
  note.hidden = !note.textContent;
}

// The rows sent again whose outcome is still to be said (sayAgainDone).
let sentAgain = [];
$("send-again").addEventListener("click", () => {
  const { offered, count, leftOut } = failedFiles();
  if (!count) return;
  for (const [session, entries] of offered) {
    sentAgain.push(...entries);
    session.sendAgain(entries);  // its rows are "uploading" once this returns
  }
  uploadBegins();  // its first failure is said as an upload's is
  sayOnce(`Sending ${someFiles(count)} again${leftOut ? `; ${leftOut}` : ""}`);
});

// Once every row sent again has finished, how they ended is said, once: the counts
// said at the end are the page's, the first upload's files among them.
function sayAgainDone() {
  if (!sentAgain.length || !sentAgain.every(({ el }) => FINISHED.has(el.dataset.state))) return;
  const failed = sentAgain.filter(({ el }) => el.dataset.state === "failed").length;
  notesForNext.push(`Of the ${someFiles(sentAgain.length)} sent again, ` +
                    `${sentAgain.length - failed} classified${failed ? `, ${failed} failed again` : ""}`);
  sentAgain = [];
}

// 32 hex digits, as the server's ids (crypto.randomUUID needs HTTPS, this may not be).
function newBatchId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)),
                    (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// --- one upload session = one batch ----------------------------------------------
// The page names the batch and gives each file a token (its place in the upload):
// a chunk sent again after its answer was lost (a connection cut, a web tier
// restarted mid-request) then joins the same batch, and the server does not store
// again the files it already holds under their tokens.
// Each entry is one row: `el`; `file` and `token` (its place in the upload) for a file
// chosen in this tab, or the token saved by the tab that chose it; `id` once the
// server holds it; `refused`: why it was never stored (not sent again); `unsentWhy`:
// why this tab gave up sending it (the server may hold it after all); `unsent`: a
// restored row of a file the server did not hold (see showPendingRow); `path`: where
// it was in a folder chosen or dropped, shown if another file of the upload has its name;
// `failure`: how a file not stored failed, for notWorthAgain; `again`: how many times
// it was sent again (sendAgain), `replaced`: the ids of its items failed by a worker.
class Session {
  constructor(chosen) {  // [{file, path}]
    this.batchId = newBatchId();
    this.created = false;     // the server holds the batch: a file of it was stored
    this.unanswered = false;  // a send got no answer: the server may hold files it stored
    this.uploading = true;
    this.byId = new Map();    // item id -> element
    this.early = new Map();   // results that beat their upload's answer
    const named = new Map();
    for (const { file } of chosen) named.set(file.name, (named.get(file.name) || 0) + 1);
    this.entries = chosen.map(({ file, path }, n) => {
      const entry = { file, token: String(n), el: makeResult(file.name || "upload") };
      if (path) entry.el.dataset.chosenPath = path;  // for the CSV, whose rows are not seen side by side
      if (path && named.get(file.name) > 1) this.setPath(entry, path);
      return entry;
    });
    this.stream = null;
    this.sseErrors = 0;
    this.pollTimer = null;
    this.restored = false;    // rebuilt from the address after a reload, not uploaded here
    this.place = null;        // a restored batch's rows go after this (kept in address order)
    this.queue = [];          // {chunk, attempt}: to be sent, resends first
    this.waiting = 0;         // chunks waiting their delay to be sent again (sendLater)
    this.resends = new Map(); // their timers -> their entries (see stop)
    this.inHand = new Set();  // chunks taken from the queue, their answer not in yet
    this.sentBytes = 0;       // of the requests answered or given up, as far as each got (sendingText)
    this.stopped = false;     // the user stopped it: nothing more is sent
    this.keyRefused = false;  // the server refused its API key (refuseKey)
    this.resendReady = null;  // resolves when one of them joins the queue
    this.wake = () => {};
    this.watchFrom = 0;       // a restored batch: watched setting("unsentWatchMs") from then for unsent files
    this.unknown = false;     // the server's last answer: no such batch
    this.grewAt = 0;          // opened from its link: when it last showed a file new here
    // A restored batch that another tab of this browser is still sending (see "other
    // tabs" below): its files not yet stored are shown still being sent there, and the
    // batch polled, until that tab says it is done or stops answering.
    this.otherTabSends = false;
    this.otherTabEnded = false;   // ...and has said it is done, or stopped answering
    this.otherTabGone = false;    // ...the latter: closed or reloaded, it has no reasons to show
    this.unansweredAsks = 0;      // asks in a row that no tab answered
    this.built = false;           // restore() has built the batch's rows, and follows it
    this.replaced = new Set();    // ids of items a file sent again replaces: not shown (sendAgain)
  }

  async run() {
    // In the address from the start, so that a reload shows the files the server
    // stored even if no answer came back; until one does, a reload that finds no
    // such batch shows the files as saved (none stored yet: see restore).
    rememberBatch(this.batchId);
    setUnconfirmed(this.batchId, true);
    const tooLarge = this.entries.filter(({ file }) => file.size > setting("maxFileBytes"));
    this.refuse(tooLarge, tooLargeText(), true,
                { code: "too_large" });  // and saves
    await this.sendAll(this.entries.filter((entry) => !tooLarge.includes(entry)));
  }

  // "Send N failed files again": `entries`, failed files of this upload that
  // notWorthAgain lets go, go again by the upload's own path (chunks, tokens, resends,
  // "Stop sending"), into this batch, not a new one. A file whose answer was lost may
  // be stored already, and only its batch and token keep it from being stored twice
  // (the server answers `again` with its item); the batch stays the one the address
  // names; and a row stays one row, counted once, on this page and after a reload.
  // A file a worker failed (a dead letter) is another matter: the batch holds it
  // under its token, which would only give the failure back. It goes under a new token,
  // and the failed item it replaces is kept off the page (`replaced`, saved for a
  // reload in this tab too; a browser with nothing saved shows both: README).
  async sendAgain(entries) {
    for (const entry of entries) {
      if (entry.id) {
        this.byId.delete(entry.id);
        this.replaced.add(entry.id);
        entry.replaced = [...(entry.replaced || []), entry.id];
        delete entry.id;
        entry.token = `${entry.token.split(".")[0]}.${entry.replaced.length}`;
        entry.maybeStored = false;  // under its new token, never sent
      }
      delete entry.refused;
      delete entry.unsentWhy;
      delete entry.failure;
      entry.el.querySelector(".error").textContent = "";
      setState(entry.el, "uploading");
      showSentAgain(entry, (entry.again || 0) + 1);
    }
    // Figures of their own (sendingText), unless the summary still counts this
    // upload's first sends beside others going on: taken out, its figures went back.
    if (!sendingNow.has(this)) this.sentBytes = 0;
    this.uploading = true;
    this.stopped = false;
    this.keyRefused = false;
    // Back in the address if it had left it (an upload whose every file was refused
    // is dropped once nothing of it is saved); where it is, kept in its place.
    if (!batchesInUrl().includes(this.batchId)) rememberBatch(this.batchId);
    if (!this.created) setUnconfirmed(this.batchId, true);
    this.save();
    await this.sendAll(entries);
  }

  // Sends `entries` (in the upload's chunks), then follows the batch.
  async sendAll(entries) {
    this.queue = chunked(entries).map((chunk) => ({ chunk, attempt: 0 }));
    // Until the batch exists, chunks go one at a time (its event stream can only be
    // followed then); the rest then join it in parallel. Files sent again later (see
    // sendLater) keep the upload open until they are in.
    await this.drain(1, () => this.created);
    await this.drain(PARALLEL_CHUNKS, () => false);
    this.uploading = false;
    tell({ done: this.batchId });  // a tab that restored this batch stops waiting for it
    if (this.created && !this.stream && !this.pollTimer) this.follow();
    if (!this.created && !this.unanswered) {  // every file refused or stopped: no such batch
      setUnconfirmed(this.batchId, false);
      // Kept in the address while this tab holds the refusals, which a reload shows
      // (restore): dropped, the reasons went with a reload (reviewer).
      if (!explainedOnly(savedShown(this.batchId))) forgetBatch(this.batchId);
    }
    updateSummary();
  }

  // Sends the queued chunks, `width` at once (and within the page's places: see
  // takeSendPlace), until none is left nor waits to be sent again, or until
  // `enough()`. A resend joins the queue once its delay is over, so never more than
  // `width` requests are in flight: resends sent beside the pool's choked a slow link
  // further, and were cut off in turn (reviewer).
  async drain(width, enough) {
    const worker = async () => {
      while (!enough() && !this.stopped) {
        if (this.queue.length) {
          await takeSendPlace();
          // Another of this upload's workers may have taken the last chunk meanwhile.
          const next = enough() ? null : this.queue.shift();
          if (next) this.inHand.add(next.chunk);
          try {
            if (next) await this.send(next.chunk, next.attempt);
          } finally {
            if (next) this.inHand.delete(next.chunk);
            freeSendPlace();
          }
        } else if (this.waiting) {
          await this.resendReady;
        } else {
          return;
        }
      }
    };
    await Promise.all(Array.from({ length: width }, worker));
  }

  async send(chunk, attempt = 0) {
    const taken = chunk;  // as in this.inHand
    chunk = await this.readable(chunk, attempt > 0);  // each time: a file may go while a resend waits
    if (!chunk.length) return;
    const form = new FormData();
    for (const { file, token } of chunk) {
      form.append("files", file, file.name);
      form.append("tokens", token);
    }
    form.append("batch_id", this.batchId);
    form.append("create", "1");
    if (keyProblem()) {
      sayKeyProblem(keyProblem());
      this.refuse(chunk, keyProblem(), true, { key: storedKey() });
      return;
    }
    const headers = authHeaders();  // as sent: the key may be edited while this request goes
    let status, body;
    try {
      // The answer's body within the answer's time: one cut off or stalled after a
      // 202 is an answer lost (the files may be stored), not a refusal (explorer).
      let settle;
      ({ status, body, settle } = await post(form, headers, bytesOf(chunk)));
      // Counted once: answered, no longer in hand, nor in flight.
      this.inHand.delete(taken);
      this.sentBytes += bytesOf(chunk);
      settle();
    } catch (err) {
      // As far as it got, once: no longer in hand (its files go again), nor in flight.
      this.inHand.delete(taken);
      this.sentBytes += err.sentBytes;
      err.settle();
      this.unanswered = true;
      for (const entry of chunk) entry.maybeStored = true;  // see stop
      if (attempt < RESEND_DELAYS_MS.length) {
        // No server (the next web tier still starting), the answer lost or too long in
        // coming, or cut off by leaving the page: the files' tokens keep those it stored from being stored
        // twice. (A page left for good runs no timer; one kept in the back/forward
        // cache sends them when it is shown again.)
        this.sendLater(chunk, attempt);
        return;
      }
      // Not remembered for a reload: the server may have stored some, which a reload shows.
      // A timeout of this page's own is said so: "could not be reached" sent a user
      // with a slow link to look for a fault in the server (reviewer).
      if (!leaving) {
        this.refuse(chunk, err.timedOut || "upload failed: the server could not be reached", false,
                    { unanswered: true });
      }
      return;
    }
    if (status === 401) {
      // A key was sent and refused: said to be missing, a user who had typed one
      // looked for another fault (reviewer).
      const why = headers["X-API-Key"] ? "the API key was refused: check it above and upload again"
        : "an API key is required: enter it above and upload again";
      const key = headers["X-API-Key"] || "";
      this.refuseForKey(chunk, why, key);
      if (!this.keyRefused) this.refuseKey(why, key);
      return;
    }
    if (refusedWhole(body)) {
      // 503: not stored. 502 and 504 (a proxy in front): the web tier not there yet.
      const unstored = status === 503 || (attempt > 0 && [502, 504].includes(status));
      if (unstored && attempt < RESEND_DELAYS_MS.length) {
        this.sendLater(chunk, attempt);
        return;
      }
      this.refuse(chunk, (body && body.error) || `upload refused (HTTP ${status})`, true,
                  { code: body && body.code, status });
      return;
    }
    if (body.items.length && !this.created) {
      this.created = true;
      setUnconfirmed(this.batchId, false);
    }
    for (const item of body.items) {
      const entry = chunk[item.index];
      if (!entry) continue;
      entry.id = item.id;
      delete entry.failure;
      if (item.filename) setName(entry.el, item.filename);
      this.byId.set(item.id, entry.el);
      setState(entry.el, "queued");
      if (this.early.has(item.id)) showItem(entry.el, this.early.get(item.id));
    }
    const again = [];
    for (const rejection of body.rejected || []) {
      const entry = chunk[rejection.index];
      if (!entry) continue;
      if (rejection.status === 503 && attempt < RESEND_DELAYS_MS.length) {
        again.push(entry);  // still "uploading"
        continue;
      }
      entry.refused = rejection.error;
      entry.failure = { code: rejection.code, status: rejection.status };
      showFailure(entry.el, rejection.error);
    }
    this.save();
    if (again.length) this.sendLater(again, attempt);
    // Followed from the first stored file on, and again after a stream that ended
    // because all that had joined the batch were done (more chunks join it later).
    if (this.created && !this.stream && !this.pollTimer) this.follow();
  }

  // The server refused the API key (401): the chunks not yet sent are refused with the
  // same reason (sent, each would be refused so), and the focus moved to the key's box
  // once, where the fix is typed: a screen reader user hears the box, and why. It was
  // moved there at each chunk's 401, pulling the focus back from wherever the user had
  // gone, once per chunk (reviewer). Resends still waiting out their delay go as they
  // would, and are refused as their answers come.
  refuseKey(why, key) {
    this.keyRefused = true;
    sayKeyProblem(why);
    keyInput.focus();
    const unsent = this.queue.flatMap(({ chunk }) => chunk);
    this.queue = [];
    this.refuseForKey(unsent, why, key);
  }

  // Refused for the key: files an earlier send may have stored (its answer lost) are
  // said so, and not kept as refused for a reload, where the server's item shows
  // instead. Kept, a reload showed such a file twice, failed and done, and the advice
  // to send it again had it classified twice (reviewer).
  // `key`: the key refused ("" for none), which the files wait to see changed (notWorthAgain).
  refuseForKey(entries, why, key) {
    const mayBeStored = `${why} (an earlier send may have stored it: reload to see)`;
    this.refuse(entries.filter((entry) => entry.maybeStored), mayBeStored, false, { key });
    this.refuse(entries.filter((entry) => !entry.maybeStored), why, true, { key });
  }

  // The entries whose files can still be read; the others failed, each with why.
  // One file moved or deleted since it was chosen made the browser refuse to send its
  // whole chunk, which was then said to have found no server (explorer). `resending`:
  // an earlier send may have stored them (its answer lost), so they are failed as not
  // stored, which the server's item, found by token, replaces (showNew), not refused.
  async readable(chunk, resending) {
    // Its first byte, or the whole of an empty one: a deleted file's size reads as 0,
    // and only reading it whole fails then.
    const read = await Promise.all(chunk.map(({ file }) =>
      (file.size ? file.slice(0, 1) : file).arrayBuffer().then(() => true, () => false)));
    const unreadable = chunk.filter((_, i) => !read[i]);
    // Changed too: the browser refuses a file whose size or date moved since (reviewer).
    this.refuse(unreadable, "the file could not be read: changed, moved or deleted since it was chosen?",
                !resending, { unreadable: true });
    return chunk.filter((_, i) => read[i]);
  }

  // Send `entries` again after a while, without holding up the other chunks: they
  // wait outside the pool, then go first (see drain).
  sendLater(entries, attempt) {
    if (this.stopped) {
      this.refuseStopped(entries);
      return;
    }
    if (!this.waiting) this.resendReady = new Promise((resolve) => { this.wake = resolve; });
    this.waiting += 1;
    const timer = setTimeout(() => {
      this.resends.delete(timer);
      this.waiting -= 1;
      this.queue.unshift({ chunk: entries, attempt: attempt + 1 });
      this.wakeDrain();
    }, resendDelayMs(attempt));
    this.resends.set(timer, entries);
  }

  wakeDrain() {
    const wake = this.wake;
    this.resendReady = new Promise((resolve) => { this.wake = resolve; });
    wake();
  }

  // The user's "Stop sending": the chunks in flight end as they would (the server
  // may be storing them), and nothing else is sent. A wrong folder of thousands of
  // files on a slow link could only be stopped by leaving the page (reviewer).
  stop() {
    if (!this.uploading || this.stopped) return;
    this.stopped = true;
    // Resends first: the server may hold those files (their answers were lost), as a
    // reload then shows; the rest were never sent.
    for (const [timer, entries] of this.resends) {
      clearTimeout(timer);
      this.refuseStopped(entries);
    }
    this.resends.clear();
    this.waiting = 0;
    const queued = this.queue.flatMap(({ chunk }) => chunk);
    this.queue = [];
    this.refuseStopped(queued);
    this.wakeDrain();
    updateSummary();
  }

  // Files the stop left unsent, each said as what the server may hold of it: those
  // whose answer was lost may be stored; those it answered 503 (or never got) are not.
  refuseStopped(entries) {
    const stopped = { stopped: true };
    this.refuse(entries.filter((entry) => entry.maybeStored), STOPPED_AGAIN, false, stopped);
    this.refuse(entries.filter((entry) => !entry.maybeStored), "not sent: you stopped the upload", false,
                stopped);
  }

  setPath(entry, path) {
    entry.path = path;
    setPath(entry.el, path);
  }

  // `failure`: how it failed, for notWorthAgain ({code, status} of a refusal, or
  // {unanswered}, {key}, {unreadable}, {stopped}).
  refuse(chunk, why, remember = true, failure = {}) {
    for (const entry of chunk) {
      if (remember) entry.refused = why;
      else entry.unsentWhy = why;  // a reload shows it so, unless the server has it
      entry.failure = failure;
      showFailure(entry.el, why);
    }
    this.save();
  }

  // What the server cannot tell a reloaded page: the order the files were chosen in
  // (chunks sent in parallel join the batch in any order), the files it refused, and
  // those not yet stored (a reload that left them out said nothing of them: explorer).
  // Saved from the start: a reload before the first answer came may find files stored.
  save() {
    const shown = this.entries.map((entry) => ({
      ...(entry.id ? { id: entry.id }
        : entry.refused ? { name: entry.el.dataset.filename, error: entry.refused }
          : { name: entry.el.dataset.filename, unsent: true, why: entry.unsentWhy, token: entry.token }),
      ...(entry.path ? { path: entry.path } : {}),
      ...(entry.again ? { again: entry.again } : {}),
      ...(entry.replaced ? { replaced: entry.replaced } : {}),
    }));
    try {
      sessionStorage.setItem(SHOWN_STORE + this.batchId, JSON.stringify(shown));
    } catch { /* storage full or disabled: a reload shows the server's order */ }
  }

  apply(item) {
    if (this.replaced.has(item.id)) return;  // its file was sent again: its new item stands
    const el = this.byId.get(item.id);
    if (el) showItem(el, item);
    // Joined the batch after it was loaded, or stored by a send whose answer was lost.
    else if (this.restored || this.pendingRowFor(item)) this.showNew(item);
    else this.early.set(item.id, item);
  }

  // The row of a file not heard stored that is `item` (sameFile): one this tab gave up
  // sending, or a restored one; the server stored it after all (a send's answer lost).
  pendingRowFor(item) {
    return this.entries.find((entry) => (entry.unsent || entry.unsentWhy) && !entry.id &&
      sameFile({ token: entry.token, name: entry.el.dataset.filename }, item));
  }

  // A new row of a restored batch, after the batch's other rows (or its place).
  newRow(name) {
    return makeResult(name, this.entries.length ? this.entries[this.entries.length - 1].el : this.place);
  }

  // An item of a restored batch, after the batch's other rows; or, if `adopt`, in the
  // row of a file shown not stored (see sameFile), which the server stored after all.
  showNew(item, adopt = true) {
    const unsent = adopt && this.pendingRowFor(item);
    let el;
    if (unsent) {
      ({ el } = unsent);
      delete unsent.unsent;
      delete unsent.unsentWhy;
      delete unsent.failure;
      unsent.id = item.id;
      if (item.filename) setName(el, item.filename);  // as the server keeps it
      el.querySelector(".error").textContent = "";
      setState(el, "queued");
    } else {
      el = this.newRow(item.filename || "upload");
      this.entries.push({ file: null, el, id: item.id });
    }
    this.byId.set(item.id, el);
    showItem(el, item);
    if (this.built && this.grewAt) this.grewAt = Date.now();
    updateSummary();  // a row that joins queued is counted too
  }

  // A file chosen in this tab (or the one it was copied from) that the server did not
  // hold when the batch was restored.
  showUnsent(name, why, token) {
    const entry = { file: null, el: this.newRow(name), unsent: true, unsentWhy: why, token };
    this.entries.push(entry);
    this.showPendingRow(entry);
  }

  // A restored row the server does not hold: failed with its own reason if it has one.
  // Else, while another tab still sends the batch, shown being sent there, neither
  // failed nor counted so (told to choose it again, a user sent it twice: explorer);
  // failed as lost once that tab is done. Its item takes the row if it comes (showNew).
  showPendingRow(entry) {
    const { el } = entry;
    if (this.otherTabSends && !entry.unsentWhy) {
      setState(el, "uploading");
      el.querySelector(".state").textContent = "uploading in another tab";
      el.querySelector(".error").textContent = "";
    } else {
      const ended = this.otherTabGone ? NOT_STORED_SENDER_GONE : NOT_STORED_ELSEWHERE;
      showFailure(el, entry.unsentWhy || (this.otherTabEnded ? ended : NOT_STORED));
    }
  }

  showPending() {
    for (const entry of this.entries) if (entry.unsent && !entry.id) this.showPendingRow(entry);
    updateSummary();
  }

  askSender() {
    this.unansweredAsks += 1;
    tell({ ask: this.batchId });
  }

  // Resolves once another tab has said it sends this batch, or after ASK_MS.
  async senderAnswer() {
    const until = Date.now() + (channel ? ASK_MS : 0);
    while (!this.otherTabSends && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 20));
  }

  // Another tab says it sends this batch: its files not yet stored are being sent
  // (again, if that tab had been taken for gone: busy or frozen a while), and the
  // batch followed.
  senderAnswered() {
    this.unansweredAsks = 0;
    if (this.otherTabSends) return;
    this.otherTabSends = true;
    this.otherTabEnded = false;
    this.showPending();
    if (this.built && !this.pollTimer) this.poll();
  }

  // The tab sending this batch has ended its sends, or answers no more (`gone`: closed
  // or reloaded, it could not say so): what it did not store is lost, and the batch
  // watched a while for a late chunk. `refreshed`: the caller has just read the batch.
  async senderDone(refreshed = false, gone = false) {
    this.otherTabSends = false;
    this.otherTabEnded = true;
    this.otherTabGone = gone;
    this.watchFrom = Date.now();
    // Its last chunks may be stored and not yet seen here: looked for first, so that
    // no file the server holds is shown failed, even for a poll (explorer).
    if (this.built && !refreshed) await this.refresh();
    this.showPending();
    if (this.built && !this.pollTimer) this.poll();
  }

  unfinished() {
    return this.entries.some(({ el }) => !FINISHED.has(el.dataset.state));
  }

  async refresh() {
    const { body, unknown } = await fetchBatch(this.batchId);
    this.unknown = unknown;
    try {
      // A file of it is stored: a reload that finds no such batch now finds it expired.
      if (body.items.length) setUnconfirmed(this.batchId, false);
      body.items.forEach((item) => this.apply(item));
    } catch { /* no answer in time, or no such batch (yet): the next event or poll fills the gap */ }
  }

  follow() {
    if (!window.EventSource || this.sseErrors >= SSE_GIVE_UP || openStreams >= MAX_STREAMS) {
      this.poll();
      return;
    }
    const stream = new EventSource(`/api/jobs/${this.batchId}/events`);
    this.stream = stream;
    openStreams += 1;
    let reconnecting = false;
    stream.onopen = () => {
      // Whatever finished while we were away: fetch it once.
      if (reconnecting) this.refresh();
      reconnecting = false;
    };
    stream.onmessage = (event) => {
      this.sseErrors = 0;
      try { this.apply(JSON.parse(event.data)); } catch { /* ignore a damaged event */ }
    };
    stream.addEventListener("end", () => {
      this.closeStream();
      // More chunks may still be uploading: send() follows again when one is in.
      // If they are all in and some still wait, this `end` was sent before the last
      // chunk joined the batch: poll until they finish (a single refresh could miss them).
      if (!this.uploading && this.unfinished()) this.poll();
    });
    stream.onerror = () => {
      reconnecting = true;
      this.sseErrors += 1;
      if (stream.readyState === EventSource.CLOSED || this.sseErrors >= SSE_GIVE_UP) {
        this.closeStream();
        this.poll();
      }
    };
  }

  closeStream() {
    if (!this.stream) return;
    this.stream.close();
    this.stream = null;
    openStreams -= 1;
  }

  poll() {
    if (this.pollTimer) return;
    // The next poll POLL_MS after this one answers, not every POLL_MS: a batch
    // rebuilt from S3 after a restart can take many seconds to answer.
    const tick = async () => {
      await this.refresh();
      // Some asks in a row unanswered: the sending tab was closed or reloaded, or is
      // frozen (if it answers again, senderAnswered brings its rows back).
      if (this.otherTabSends && this.unansweredAsks >= SILENT_ASKS) this.senderDone(true, true);
      if (this.restored) this.askSender();
      // A while after a restore (a chunk received whole before the reload, for an
      // unsent row) and after the sending tab ended (its last chunks).
      const watched = Date.now() < this.watchFrom + setting("unsentWatchMs") &&
        (this.otherTabEnded || this.entries.some((entry) => entry.unsent));
      const growing = Date.now() < this.grewAt + setting("followIdleMs");
      const watching = this.uploading || this.unfinished() || this.otherTabSends || watched || growing;
      this.pollTimer = watching ? setTimeout(tick, POLL_MS) : null;
      if (!watching && this.restored && this.unknown) {
        // Still no such batch once the watch is over: nothing of it will come now, and
        // each reload showed its files "not stored" again, for good. Their rows stay
        // for this page view.
        setUnconfirmed(this.batchId, false);
        forgetBatch(this.batchId);
      }
    };
    this.pollTimer = setTimeout(tick, 0);
  }
}

// --- batches kept in the address, so a reload (or a shared link) shows them again ---
function idsInUrl() {
  const match = /(?:^#|&)batches=([^&]*)/.exec(location.hash);
  return match ? match[1].split(",").filter(Boolean) : [];
}

function batchesInUrl() {  // each once: a batch named twice was shown twice
  return [...new Set(idsInUrl().filter((id) => BATCH_ID.test(id)))];
}

function writeBatches(ids) {
  history.replaceState(null, "", ids.length ? `#batches=${ids.join(",")}` : location.pathname);
}

function rememberBatch(batchId) {
  const ids = batchesInUrl().filter((id) => id !== batchId);
  const most = setting("maxBatchesInUrl");
  const kept = [...ids, batchId];
  while (kept.length > most) {
    // The oldest upload whose every file was refused leaves first (only this tab has
    // its reasons, and nothing of it is on the server), then the oldest batch.
    const refused = kept.findIndex((id) => id !== batchId && explainedOnly(savedShown(id)));
    kept.splice(Math.max(refused, 0), 1);
  }
  if (kept.length < ids.length + 1 && !droppedSaid) {
    // Their rows stay on the page, but a reload or the link would not show them: say so.
    droppedSaid = true;
    addNotice(`the address keeps the latest ${most} batches: older ones left it, and a ` +
              "reload will not show them");
  }
  writeBatches(kept);
}

function forgetBatch(batchId) {
  writeBatches(batchesInUrl().filter((id) => id !== batchId));
}

function setUnconfirmed(batchId, unconfirmed) {
  try {
    if (unconfirmed) sessionStorage.setItem(UNCONFIRMED_STORE + batchId, "1");
    else sessionStorage.removeItem(UNCONFIRMED_STORE + batchId);
  } catch { /* storage disabled: a reload then says the batch could not be loaded */ }
}

function isUnconfirmed(batchId) {
  try { return sessionStorage.getItem(UNCONFIRMED_STORE + batchId) === "1"; } catch { return false; }
}

function savedShown(batchId) {
  try {
    const shown = JSON.parse(sessionStorage.getItem(SHOWN_STORE + batchId) || "[]");
    return Array.isArray(shown) ? shown : [];
  } catch {
    return [];
  }
}

// Whether saved rows are of an upload whose every file was refused, or not sent, each
// with its reason: nothing of it is on the server. Refused only, a batch stopped after
// a 503 was dropped from the address, and the reload it told of showed nothing (reviewer).
function explainedOnly(saved) {
  return saved.length > 0 && saved.every((shown) => shown.error || shown.why);
}

// Whether `item` (the server's) is the file of a saved row not heard stored: by the
// token the file was sent under, which the server keeps with it and echoes. By name,
// a name the server cleans (web_tier/filenames.py clean_name: spaces around it, a control or
// bidi character, one cut for length) was not recognised, and its file was shown
// twice, failed and with its result. A row saved without a token (by an older page)
// is still matched by name.
function sameFile(row, item) {
  return row.token !== undefined ? item.token === row.token : item.filename === row.name;
}

async function restore(batchId, place) {
  const session = new Session([]);
  session.batchId = batchId;
  session.created = true;
  session.uploading = false;
  session.restored = true;
  session.place = place;
  sessions.push(session);
  // Whether its files not heard stored are lost, and how long the batch is followed,
  // depend on whether another tab still sends it: asked now; the answer awaited a
  // moment only where it changes what is shown (else it may come later).
  session.askSender();
  const { body, unknown } = await fetchBatch(batchId);
  session.unknown = unknown;
  const saved = savedShown(batchId);
  if (unknown || saved.some((shown) => shown.unsent)) await session.senderAnswer();
  // One this tab was sending when it reloaded (or another tab still sends), of which
  // the server holds no file yet (it does not know the batch, or holds it still
  // empty): its files as the tab saved them, those not stored said so, and watched as
  // any restored batch is, for a chunk that reaches the server after the reload. Kept
  // in the address (and unconfirmed) until that watch is over: a reload within it
  // shows them again, where dropped it lost them without a word.
  const sending = unknown && ((isUnconfirmed(batchId) && saved.length > 0) || session.otherTabSends);
  // An upload whose every file was refused: no batch was made, and the server has
  // nothing to add to the reasons this tab saved.
  const refusals = unknown && explainedOnly(saved);
  const items = body && Array.isArray(body.items) ? body.items : sending || refusals ? [] : null;
  if (!items) {
    if (unknown) {
      // One this tab was sending when it reloaded, of which it saved nothing.
      // Said without its id: 32 hex digits read out one by one (the summary shows it).
      if (!isUnconfirmed(batchId)) {
        addNotice(`batch ${batchId} could not be loaded (unknown here, or expired)`,
                  "a batch in the address could not be loaded (unknown here, or expired)");
      }
      setUnconfirmed(batchId, false);
      forgetBatch(batchId);
    } else {  // the server is unreachable or failing for now: keep the batch for a reload
      addNotice(`batch ${batchId} could not be loaded now: reload to try again`,
                "a batch in the address could not be loaded now: reload to try again");
    }
    updateSummary();
    return;
  }
  if (items.length) setUnconfirmed(batchId, false);  // else a reload may still find none
  const byId = new Map(items.map((item) => [item.id, item]));
  // The server's items no saved row names by id: those this tab had not yet heard
  // stored (its answer cut off by the reload), found by sameFile.
  const claimed = new Set(saved.map((shown) => shown.id).filter(Boolean));
  // Items a file sent again replaced (a worker's failure, sendAgain): its row shows
  // the file once, as this tab did.
  for (const id of saved.flatMap((shown) => shown.replaced || [])) {
    claimed.add(id);
    session.replaced.add(id);
    byId.delete(id);
  }
  const unclaimed = items.filter((item) => !claimed.has(item.id));
  // As this tab showed them before, then whatever else the batch holds.
  for (const shown of saved) {
    const rows = session.entries.length;
    if (shown.id && byId.has(shown.id)) {
      session.showNew(byId.get(shown.id), false);
      byId.delete(shown.id);
    } else if (shown.error) {
      const el = session.newRow(shown.name || "upload");
      session.entries.push({ file: null, el, refused: shown.error });
      showFailure(el, shown.error);
    } else if (shown.unsent) {
      const stored = unclaimed.find((item) => byId.has(item.id) && sameFile(shown, item));
      if (stored) {
        session.showNew(stored, false);
        byId.delete(stored.id);
      } else {
        session.showUnsent(shown.name || "upload", shown.why, shown.token);
      }
    }
    if (shown.path && session.entries.length > rows) session.setPath(session.entries[rows], shown.path);
    if (shown.again && session.entries.length > rows) showSentAgain(session.entries[rows], shown.again);
  }
  byId.forEach((item) => session.showNew(item));
  updateSummary();
  if (refusals) return;  // nothing will come of it: not followed (which would drop it)
  // Polled, not streamed: each event stream holds one of the browser's few
  // connections to this server (six over HTTP/1.1), and a reload may bring back many.
  // (Whether another tab sends it is asked again at each poll.)
  session.watchFrom = Date.now();
  // Nothing saved of it in this tab: opened from its link, perhaps while another
  // browser still sends it (a tab of this browser that sends it answers the asks).
  if (!saved.length) session.grewAt = Date.now();
  session.built = true;
  session.poll();
}

// --- other tabs of this page ----------------------------------------------------------
// A duplicated tab (or one opened from this one) starts with a copy of this tab's
// sessionStorage, and restores the batches this tab is still sending: their files not
// yet stored were shown failed "not stored... choose it again", and the batch no
// longer followed, while this tab went on sending them (explorer). So tabs say here
// which batches they are sending: asked {ask: id}, a tab sending it answers {sending:
// id}; it says {done: id} once its sends end. Without BroadcastChannel, a tab knows
// only of its own sends (a restored batch's unstored files are then said lost).
const channel = window.BroadcastChannel ? new BroadcastChannel("imgclass.uploads") : null;
const ASK_MS = 250;  // how long a restore may wait for an answer (tabs answer in milliseconds)
const SILENT_ASKS = 3;  // asks, one a poll, a sending tab leaves unanswered before it is taken for gone
function tell(message) {
  if (channel) channel.postMessage(message);
}
if (channel) {
  channel.onmessage = ({ data }) => {
    if (!data) return;
    if (data.ask && sessions.some((s) => s.uploading && !s.restored && s.batchId === data.ask)) {
      tell({ sending: data.ask });
    }
    for (const session of sessions) {
      if (!session.restored) continue;
      if (session.batchId === data.sending) session.senderAnswered();
      if (session.batchId === data.done) session.senderDone();
    }
  };
}

// Leaving while files are still being sent would lose those not yet sent: ask first.
window.addEventListener("beforeunload", (event) => {
  if (sessions.some((session) => session.uploading)) {
    event.preventDefault();
    event.returnValue = "";  // what older browsers look for
  }
});

// An address edited by hand may name what is not a batch id: say so, not nothing.
const malformed = idsInUrl().filter((id) => !BATCH_ID.test(id));
if (malformed.length) {
  addNotice(`not a batch id, ignored: ${malformed.map((id) => id.slice(0, 40)).join(", ")}`);
}
if (malformed.length || batchesInUrl().length !== idsInUrl().length) writeBatches(batchesInUrl());
// All at once (a batch rebuilt after a restart may take seconds, and one that never
// answered held up every batch after it: explorer), each shown at a place kept for it
// in the order the batches were sent in.
for (const batchId of batchesInUrl()) {
  const place = document.createElement("li");
  place.hidden = true;
  resultsEl.append(place);
  restore(batchId, place);
}
// The address edited by hand (or a link to other batches followed in this tab):
// show what it names now. The page's own changes (replaceState) fire no event.
window.addEventListener("hashchange", () => location.reload());

function upload(chosen) {  // [{file, path}]
  if (!chosen.length) return;
  uploadBegins();
  const session = new Session(chosen);
  sessions.push(session);
  updateSummary();
  session.run();
}

// --- choosing files ------------------------------------------------------------
const asChosen = (files) => Array.from(files || [], (file) => ({ file }));
const input = $("file-input");
input.addEventListener("change", () => {
  folderNotices = [];
  upload(asChosen(input.files));
  input.value = "";
});

// By type or, where the browser knows none (a .webp on a system without its codec,
// say), by extension. Only files from folders are sorted so: a file chosen by name is
// sent, and the server says why it refuses it.
const IMAGE_EXTENSION = /\.(jpe?g|jpe|jfif|mpo|png|gif|bmp|webp|tiff?|avif|heic|heif)$/i;
function looksLikeImage(file) {
  return file.type.startsWith("image/") || IMAGE_EXTENSION.test(file.name);
}

// A few names of `paths`, for the summary line.
function someOf(paths) {
  return paths.slice(0, 3).join(", ") + (paths.length > 3 ? ", …" : "");
}

// Hidden files and folders of a folder (names starting with "."): thumbnail caches,
// and the "._name.jpg" twin macOS writes beside each file on a USB stick, which
// failed "not an image", one failed row per photo (reviewer). The path of the first
// such part of `path` below the folder chosen or dropped ("Photos/.thumbnails/"), or "".
function hiddenPart(path) {
  const parts = path.split("/");
  const at = parts.findIndex((part, i) => i > 0 && part.startsWith("."));
  if (at < 0) return "";
  return parts.slice(0, at + 1).join("/") + (at < parts.length - 1 ? "/" : "");
}

// `found` ({file, path, inFolder}): files chosen or dropped, some from folders. Those of
// folders that are hidden or not images are skipped, the summary saying how many and
// naming a few, rather than each shown failed: a folder of photos holds files nobody
// meant to classify (.xmp sidecars, .DS_Store, Thumbs.db, videos), whose failed rows
// would bury the results and count as failures. `unreadable`: paths in them that could
// not be read; `hidden`: paths of hidden files and folders already left out (a folder's end in "/").
function uploadFound(found, unreadable = [], hidden = []) {
  // A Set: a stick's 10,000 "._" twins are 10,000 hidden paths, each looked up here.
  const hiddenPaths = new Set(hidden);
  const notImages = [];
  const kept = found.filter(({ file, path, inFolder }) => {
    if (!inFolder) return true;
    const part = hiddenPart(path);
    if (part) hiddenPaths.add(part);
    else if (!looksLikeImage(file)) notImages.push(path);
    else return true;
    return false;
  });
  hidden = [...hiddenPaths];
  folderNotices = [];
  if (!found.length && !unreadable.length && !hidden.length) folderNotices.push("the folder holds no files");
  const paths = [...hidden, ...notImages];
  if (paths.length) {
    const folders = hidden.filter((path) => path.endsWith("/")).length;
    const what = !folders ? (paths.length === 1 ? "file" : "files")
      : folders === paths.length ? (folders === 1 ? "folder" : "folders") : "files and folders";
    const why = hidden.length && notImages.length ? "hidden or not images" : hidden.length ? "hidden" : "not images";
    folderNotices.push(`${paths.length} ${what} in the folder skipped, ${why}: ${someOf(paths)}`);
  }
  if (unreadable.length) {
    folderNotices.push(`${unreadable.length} in the folder could not be read: ${someOf(unreadable)}`);
  }
  // Together, in one text: said one by one in the same moment, each replaced the one
  // before it in the live region, and a screen reader heard only the last (reviewer).
  if (folderNotices.length) sayOnce(folderNotices.join(". "));
  updateSummary();
  upload(kept);
}

// Names in a folder's order ("img_2" before "img_10"), by one collator: localeCompare
// with options builds one at each comparison, 0.85 s to sort 10,000 paths (reviewer).
const byName = new Intl.Collator(undefined, { numeric: true }).compare;

const folderInput = $("folder-input");
folderInput.addEventListener("change", () => {
  const found = Array.from(folderInput.files, (file) =>
    ({ file, path: file.webkitRelativePath || file.name, inFolder: true }));
  // In the folder's order by name, as a dropped one (the browser's order is its own).
  uploadFound(found.sort((a, b) => byName(a.path, b.path)));
  folderInput.value = "";
});

// Every file under the dropped `entries` (FileSystemEntry): {found, unreadable, hidden},
// each found with its path from the drop ("Holiday/day 1/same.jpg"); in a folder's order
// by name. The files of each batch a folder gives are read together, and `onFound`
// told how many files were found so far: read one at a time, a folder of 10,000
// showed nothing for 20 s (reviewer).
async function walk(entries, onFound) {
  const found = [], unreadable = [], hidden = [];
  let count = 0;
  const pathOf = (entry) => entry.fullPath.replace(/^\//, "");
  // Its File, or null if it cannot be read (moved or deleted since the drop).
  const read = (entry) => (entry.isFile ? new Promise((resolve, reject) => entry.file(resolve, reject))
    .catch(() => null) : Promise.resolve(null));
  const take = async (entry, file) => {
    const path = pathOf(entry);
    if (entry.isFile) {
      if (file) found.push({ file, path, inFolder: path.includes("/") });
      else unreadable.push(path);
    } else if (entry.isDirectory) {
      await visit(entry);
    }
  };
  const visit = async (folder) => {
    const children = [];  // [entry, its File or null]
    try {
      const reader = folder.createReader();
      // A batch at a time (100 in Chromium): called until it gives none.
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        const shown = [];
        for (const child of batch) {
          if (child.name.startsWith(".")) hidden.push(pathOf(child) + (child.isDirectory ? "/" : ""));
          else shown.push(child);
        }
        const files = await Promise.all(shown.map(read));
        shown.forEach((child, i) => children.push([child, files[i]]));
        count += files.filter(Boolean).length;
        onFound(count);
      }
    } catch {
      unreadable.push(pathOf(folder));  // moved or deleted since the drop, or not to be read
      return;
    }
    children.sort(([a], [b]) => byName(a.name, b.name));
    for (const [child, file] of children) await take(child, file);
  };
  const files = await Promise.all(entries.map(read));
  for (const [i, entry] of entries.entries()) await take(entry, files[i]);
  return { found, unreadable, hidden };
}

// Files dropped anywhere on the page are uploaded: left to the browser, a drop
// beside the zone would open the file in this tab, leaving the page.
const zone = $("drop-zone");
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  zone.classList.toggle("over", zone.contains(event.target));
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) zone.classList.remove("over");  // left the window
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  const dropped = event.dataTransfer;
  if (!dropped) return;
  // A dropped folder is in `files` as one file that cannot be read (it failed "could
  // not be read": reviewer); its entry can be walked. Taken now: the drop's items
  // are emptied once this handler returns.
  const entries = Array.from(dropped.items || [], (item) =>
    item.kind === "file" && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null);
  if (!entries.some((entry) => entry && entry.isDirectory)) {
    folderNotices = [];
    upload(asChosen(dropped.files));
    return;
  }
  const reading = (count) => {
    folderNotices = [`reading the folder… ${count} file${count === 1 ? "" : "s"} found`];
    updateSummary();
  };
  sayOnce("reading the folder…");  // once: its count, said at each batch of files read, was chatter
  reading(0);
  walk(entries.filter(Boolean), reading)
    .then(({ found, unreadable, hidden }) => uploadFound(found, unreadable, hidden));
});

// --- live status line -------------------------------------------------------------
// A hung server (stopped, restarting) never answered: the line kept its old figures
// as if current, and a new request every 2 s piled up behind the first (explorer).
let statusAsking = false;
let statusAnsweredAt = null;
async function refreshStatus() {
  if (statusAsking) return;
  statusAsking = true;
  const line = $("status-line");
  try {
    const response = await fetch("/api/status", { cache: "no-store", signal: timeoutSignal(setting("statusTimeoutMs")) });
    const s = await response.json();
    statusAnsweredAt = new Date();
    if (s.api_key_required) keyBox.hidden = false;
    if (s.untrained) banner.hidden = false;
    const parts = [];
    if (s.queue) parts.push(`queue: ${s.queue.visible} waiting, ${s.queue.in_flight} in progress`);
    if (s.instances_total !== null && s.instances_total !== undefined) {
      const i = s.instances || {};
      parts.push(`instances: ${i.running || 0} running, ${i.pending || 0} starting, ` +
                 `${(i.stopping || 0) + (i["shutting-down"] || 0)} stopping` +
                 (s.workers_failed ? `, ${s.workers_failed} whose worker failed` : ""));
    }
    if (s.totals) {
      // This web tier process's counts: a restarted one starts again from zero.
      const since = s.totals_since ? ` since ${new Date(s.totals_since * 1000).toLocaleTimeString()}` : "";
      // Failed after upload (by a worker, or every attempt lost): refused uploads are
      // not counted, and a batch's own summary counts them too.
      parts.push(`answered here${since}: ${s.totals.answered}, failed after upload: ${s.totals.failed}`);
    }
    // What could not be read, or how old the figures are while AWS does not answer.
    if (Array.isArray(s.errors)) parts.push(...s.errors.map(String));
    line.textContent = parts.join(" · ") || "status unavailable";
  } catch {
    line.textContent = statusAnsweredAt
      ? `status unavailable: the server has not answered since ${statusAnsweredAt.toLocaleTimeString()}`
      : "status unavailable";
  } finally {
    statusAsking = false;
  }
}
refreshStatus();
setInterval(refreshStatus, STATUS_MS);
