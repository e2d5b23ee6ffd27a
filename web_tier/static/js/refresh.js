// The summary line (and all that follows the rows: the title, the buttons, what screen
// readers hear) is refreshed once for all the rows changed in one go (a chunk refused,
// a poll's items): a summary per row would have screen readers hear the first row's
// reason replaced, within the same moment, by the last row's bare count; and would
// rescan every row per row.
// The refresh itself is summary.js's, which reads every part of the page; main.js hands
// it over here, so that the parts that change rows can ask for it without importing it.
let refresh = () => {};
let summaryDue = false;
// A refresh reads every row: with 1,000 rows, one per result of an event stream and per
// upload progress event would freeze the page for up to 4 s at a time, 27 s of an 80 s
// upload. So each waits after the one before for SPARE times as long as that one
// took: refreshing takes at most a fifth of the page's time. A page of a few rows
// refreshes in well under a millisecond, and so at once.
const SPARE = 4;
let notBefore = 0;  // performance.now() before which the next refresh waits

export function setSummaryRefresh(fn) {
  refresh = fn;
}

// Asks for a refresh, after the changes of this moment.
export function updateSummary() {
  if (summaryDue) return;
  summaryDue = true;
  const wait = notBefore - performance.now();
  if (wait > 0) setTimeout(runDue, wait);
  else queueMicrotask(runDue);
}

function runDue() {
  summaryDue = false;
  refreshSummaryNow();
}

// Refreshes now (announce.js's timer, when a count is due).
export function refreshSummaryNow() {
  const started = performance.now();
  refresh();
  const ended = performance.now();
  notBefore = ended + SPARE * (ended - started);
}
