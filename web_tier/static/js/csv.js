// "Download the results (CSV)", and the "only failed" filter it follows.
import { $, FAILED_ROWS, banner, resultsEl } from "./dom.js";

// The rows on the page as a CSV file, in their order: with the files the server
// refused, which a batch's GET /api/jobs/<id>/results.csv cannot hold (they were never
// stored: a CSV of 1,500 files would have none of its 38 failed), and the path of
// each file chosen in a folder. A byte-order mark first, for Excel to read the names as UTF-8.
const CSV_COLUMNS = ["filename", "path", "state", "label", "score", "error", "untrained"];
const FORMULA_START = /^[=+\-@\t\r]/;
const FORMULA_AFTER_SEMICOLON = /;(?=["\s]*[=+\-@\t\r])/g;  // through quotes and spaces too
function csvCell(value) {
  // A cell a spreadsheet would run as a formula is shown as text, and one Excel would
  // begin at a ";" (where it splits on them) too (web_tier/results_csv.py).
  const quoted = String(value ?? "").replace(FORMULA_AFTER_SEMICOLON, ";'");
  const text = FORMULA_START.test(quoted) ? `'${quoted}` : quoted;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}
function resultsCsv() {
  const lines = [CSV_COLUMNS.join(",")];
  const shown = onlyFailed() ? FAILED_ROWS : ".result";
  for (const el of resultsEl.querySelectorAll(shown)) {
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
// What is shown is what is downloaded: with the filter on, the failed files alone (not
// those the user stopped: style.css).
export function onlyFailed() {
  return resultsEl.classList.contains("only-failed");
}
export function wireCsvDownload() {
  $("download-csv").addEventListener("click", downloadCsv);
}

function downloadCsv() {
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
}
