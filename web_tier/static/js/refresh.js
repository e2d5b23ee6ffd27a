// The summary line (and all that follows the rows: the title, the buttons, what screen
// readers hear) is refreshed once for all the rows changed in one go (a chunk refused,
// a poll's items): a summary per row had screen readers hear the first row's reason
// replaced, within the same moment, by the last row's bare count (reviewer); and
// rescanned every row per row.
// The refresh itself is summary.js's, which reads every part of the page; main.js hands
// it over here, so that the parts that change rows can ask for it without importing it.
let refresh = () => {};
let summaryDue = false;

export function setSummaryRefresh(fn) {
  refresh = fn;
}

// Asks for a refresh, after the changes of this moment.
export function updateSummary() {
  if (summaryDue) return;
  summaryDue = true;
  queueMicrotask(() => {
    summaryDue = false;
    refresh();
  });
}

// Refreshes now (announce.js's timer, when a count is due).
export function refreshSummaryNow() {
  refresh();
}
