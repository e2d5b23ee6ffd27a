// What screen readers hear, in the live region #announce.
import { $, FAILED_ROWS, resultsEl } from "./dom.js";
import { refreshSummaryNow, updateSummary } from "./refresh.js";
import { setting } from "./settings.js";
import { page } from "./state.js";

// What screen readers hear: not each result (hundreds would flood them), but each
// upload's first failure at once with its reason, the count (and the MB sent, while
// sending) every announceEveryMs (settings.js) while it changes, and the count once all are
// finished. Said only at the end, 500 files would give 24 s of silence, a refused API
// key none at all; said for the page's first failure only, a later upload's refused key
// never would be. A count that does not change is said again less and less often
// (15 s, 30, 60, then every 120 s), not "0 of 500 classified" every 15 s for ever
// from a stalled run. The summary's notices are said once each (sayOnce).
const REPEAT_BACK_OFF_MAX = 8;  // the same count waits at most 8 periods: 120 s
let announcedAt = 0;      // when the live region was last given a text
let announceTimer = null; // the next time a count may be due
let progressSaid = "";    // the count (with the MB sent) said last
let repeatMs = 0;         // how long after it the same count is said again
const notesForNext = [];  // said once, first in the next announcement, whatever it is (sayNext)
let failedAtUpload = 0;   // the page's failed rows when the latest upload began
let failureSaid = false;  // ...and whether one of its failures has been said
let stoppedBefore = 0;    // the rows stopped by the user ("Stop sending") at the last count
// After a reload, the batches in the address not yet read (or given up on): the count
// waits for them. Each batch shown made the count change with all its files finished,
// so said at once: "4 of 4 classified", "16 of 16"... within 74 ms, and a failure of
// before the reload named as if new.
let restoresLeft = 0;
let restoredCountDue = false;  // ...all read: their count is said at once, once
// `n` batches of the address are being read after a reload.
export function restoresBegin(n) {
  restoresLeft = n;
}
// One of them has been read, or given up on.
export function restoreRead() {
  restoresLeft -= 1;
  if (restoresLeft) return;
  restoredCountDue = true;
  updateSummary();
}
export const someFiles = (n) => `${n} file${n === 1 ? "" : "s"}`;
export function uploadBegins() {
  failedAtUpload = resultsEl.querySelectorAll(FAILED_ROWS).length;
  failureSaid = false;
  page.firstFailure = null;
}
// `text` is said first in the next announcement, whatever it is, without asking for one:
// for a text to go with what the caller is about to change.
export function sayNext(text) {
  notesForNext.push(text);
}
// `text` is said once, with the summary's next refresh: the summary line alone shows
// its notices, and a folder of no images would be chosen in silence.
export function sayOnce(text) {
  notesForNext.push(text);
  updateSummary();
}
// A notice kept in the summary line, and said once (`spoken`, where the shown text
// is no good read aloud). `text` may be a function, read at each refresh of the
// summary ("" for nothing to show now): for a notice that what it tells of can undo
// (a lost batch made anew, session.js lossText), which a fixed text would contradict.
export function addNotice(text, spoken) {
  page.notices.push(text);
  sayOnce(spoken === undefined ? text : spoken);
}
// A long name said whole takes a screen reader half a minute: its start and
// end, cut between characters as seen (a flag or a family emoji kept whole).
const graphemes = typeof Intl !== "undefined" && Intl.Segmenter
  ? (text) => Array.from(new Intl.Segmenter(undefined, { granularity: "grapheme" }).segment(text),
                         ({ segment }) => segment)
  : (text) => Array.from(text);
function shortened(name) {
  const parts = graphemes(name);
  return parts.length > 60 ? `${parts.slice(0, 40).join("")}…${parts.slice(-15).join("")}` : name;
}
// `counts` and `sending` as the summary line shows them (summary.js); `failed` and
// `stopped` the rows failed, and those of them the user stopped.
export function announceProgress(counts, sending, failed, stopped, finished) {
  clearTimeout(announceTimer);
  announceTimer = null;
  const every = setting("announceEveryMs");
  // With how far the sending has got: on a slow link the count alone stays
  // "0 of 24 classified" for minutes, where the summary shows the MB.
  const progress = [counts, sending].filter(Boolean).join(", ");
  const heard = (said) => {  // the count in `said` is the one to say again, later
    if (said !== progressSaid) repeatMs = every;
    progressSaid = said;
  };
  let text = null;
  // Files just stopped ("Stop sending") are counted aloud at once, after the press's
  // own note: no failure is named for them, and left to the next count due, the note
  // would be said alone.
  const newlyStopped = stopped > stoppedBefore;
  stoppedBefore = stopped;
  // Failed rows answered since the upload began (a late answer, a batch looked at
  // again) lower the mark its first failure must pass: else only brought back to it, it
  // was never said.
  failedAtUpload = Math.min(failedAtUpload, failed);
  const restored = restoredCountDue;  // (set only once no batch is left to read)
  if (restored) {
    restoredCountDue = false;
    // Failed before the reload: in the count, not named as news.
    failedAtUpload = failed;
  }
  if (counts && !restoresLeft) {
    if (!announcedAt) announcedAt = Date.now();  // the first files chosen start the clock
    const changed = progress !== progressSaid;
    const due = Date.now() >= announcedAt + (changed ? every : repeatMs);
    if (failed > failedAtUpload && !failureSaid) {
      failureSaid = true;  // later ones are in the counts said every announceEveryMs
      // Still failed (a late answer may have replaced it), else the last failed row.
      const first = page.firstFailure;
      const rows = resultsEl.querySelectorAll(FAILED_ROWS);
      const failure = first && first.matches(FAILED_ROWS) ? first : rows[rows.length - 1];
      const said = shortened(failure.dataset.filename);
      text = `${counts}. ${said}: ${failure.querySelector(".error").textContent}`;
      heard(counts);  // with it: not said again bare at once, which cut the reason off
    } else if (restored || (changed ? finished || due || newlyStopped : !finished && due)) {
      text = progress;
      if (!changed && !restored) repeatMs = Math.min(2 * repeatMs, REPEAT_BACK_OFF_MAX * every);
      heard(progress);
    }
  }
  const notes = notesForNext.splice(0);
  if (notes.length) text = [...notes, text].filter(Boolean).join(". ");
  if (text !== null) {
    announcedAt = Date.now();
    $("announce").textContent = text;
  }
  if (counts && !finished && !restoresLeft) {  // held, restoreRead asks for the count
    // Nothing changes while files wait for a worker: without a timer, the count due
    // would not be said (24 s of silence from a cold start). None once all are
    // finished: left to fire, it would say the final count a second time.
    const next = announcedAt + (progress === progressSaid ? repeatMs : every);
    announceTimer = setTimeout(refreshSummaryNow, Math.max(next - Date.now(), 0));
  }
}
