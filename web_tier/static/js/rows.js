// The result rows: one <li> per file, made from #result-template. User data (file
// names, labels, errors) is only ever set with textContent.
import { banner, resultsEl, template } from "./dom.js";
import { updateSummary } from "./refresh.js";
import { page } from "./state.js";

// The states a row ends in.
export const FINISHED = new Set(["done", "failed"]);

export function makeResult(name, after = null) {
  const el = makeRow(name);
  if (after) after.after(el);
  else resultsEl.append(el);
  return el;
}

// A row not yet on the page: an upload's are put there together (session.js).
export function makeRow(name) {
  const el = template.content.firstElementChild.cloneNode(true);
  setName(el, name);
  setState(el, "uploading");
  return el;
}

// The name as the server keeps it once it has one (control and bidi characters
// taken out), so that the page shows what a reload and the output bucket show; and
// cleaned the same way before (uploading, refused unsent, not stored): shown raw,
// "photo\u202eabc.exe.jpg" reads as "photogpj.exe.cba".
export function setName(el, name) {
  const shown = shownName(name);
  el.dataset.filename = shown;
  el.querySelector(".name").textContent = shown;
}

// As web_tier/filenames.py clean_name (its DROPPED_CHARACTERS and _LINE_BREAKING), but
// not cut for length: bidi controls and characters that show nothing dropped, controls
// and line or paragraph separators shown as spaces, trimmed. Files are still matched by
// token, not name.
// (A regular expression of code points, "u": the tag characters are past U+FFFF.)
const DROPPED = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u00ad\u180e\u200b\u2060-\u2064\ufeff\u115f\u1160\u3164\uffa0\u206a-\u206f\ufff9-\ufffb\u{1d173}-\u{1d17a}\u{1bca0}-\u{1bca3}\u{e0001}\u{e0020}-\u{e007f}]/gu;
const LINE_BREAKING = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g;
function shownName(name) {
  return name.replace(DROPPED, "").replace(LINE_BREAKING, " ").trim() || "upload";
}

// The name of a file chosen here as the server will read it, before clean_name (as
// load_test.py received_name): the browser writes a line feed, a carriage return and a
// quote in the multipart body as %0A, %0D and %22, and Werkzeug reads the name as a
// quoted string, a backslash escaping the next character, and %22 as a quote
// (docs/known-limits.md). Shown as chosen, "dir\name.jpg" changed to "dirname.jpg" once
// stored. Only for a name as chosen: one from the server has been read so already, and
// a backslash it kept ("a\\b.jpg" is stored as "a\b.jpg") would be dropped.
const ON_THE_WIRE = { "\n": "%0A", "\r": "%0D", '"': "%22" };
export function sentName(name) {
  return name.replace(/[\n\r"]/g, (c) => ON_THE_WIRE[c]).replace(/\\(.)/gsu, "$1").replace(/%22/g, '"');
}

// Where a file was in the folder it came from, for one whose name another file of
// its upload has too: two "same.jpg" from two subfolders would be two rows alike.
export function setPath(el, path) {
  const folder = (path || "").split("/").slice(0, -1).join("/");
  el.dataset.path = folder ? path : "";
  el.querySelector(".path").textContent = folder ? `in ${folder}/` : "";
  el.querySelector(".path").hidden = !folder;
}

// A row failed because the user stopped its upload ("Stop sending") is still
// data-state="failed", but marked data-stopped, which the summary counts apart: a user
// who stopped 900 of 1,000 files on purpose would else read "910 failed". The mark
// holds only as long as that failure: any later state (a late answer, the file sent
// again) takes it away, here, where every change of state goes. So does data-lost, of
// a row failed because the server lost its batch (session.js lose).
export function isStopped(el) {
  return "stopped" in el.dataset;
}

export function setState(el, state) {
  delete el.dataset.stopped;
  delete el.dataset.lost;
  el.dataset.state = state;
  el.querySelector(".state").textContent = state;
}

// A row whose file was sent again (`times`: how many times) says so, beside its
// state: its failure gone, the row would otherwise read as if all had gone well the
// first time, and a reload in this tab says it too (save). 0: never (a press refused).
export function showSentAgain(entry, times) {
  const mark = entry.el.querySelector(".again");
  if (!times) {
    delete entry.again;
    mark.textContent = "";
    mark.hidden = true;
    return;
  }
  entry.again = times;
  mark.textContent = times > 1 ? `sent again (${times} times)` : "sent again";
  mark.hidden = false;
}

function formatScore(score) {
  return typeof score === "number" ? `${(score * 100).toFixed(1)}%` : "";
}

// `stopped`: the user stopped its upload (see isStopped). Not the failure screen readers
// hear named at once: the press was said, and the count says the files it left unsent.
export function showFailure(el, message, stopped = false) {
  if (FINISHED.has(el.dataset.state)) return;
  setState(el, "failed");
  if (stopped) el.dataset.stopped = "true";
  el.querySelector(".error").textContent = message;
  if (!page.firstFailure && !stopped) page.firstFailure = el;
  updateSummary();
}

// A stored item failed, with its `code` kept for "send again" (again.js): a dead letter
// is told by it, not by its error's words.
export function showItemFailure(el, item) {
  if (FINISHED.has(el.dataset.state)) return;
  el.dataset.code = item.code || "";
  showFailure(el, item.error || "failed");
}

// The answer each row shows, once done: saved for a reload (session.js save), which
// shows it again if the server has lost the batch by then (restore.js showRows).
const answers = new WeakMap();

export function answerShown(el) {
  return el.dataset.state === "done" ? answers.get(el) : undefined;
}

export function showItem(el, item) {
  // The first answer wins, as on the server: a replayed event changes nothing. But a
  // late answer does replace a failure (a dead letter's, which the server replaces
  // too), or the row would stay "failed" while the batch says "done". So does the
  // item queued again (sent_again) as many times as the row knows of, or more: its
  // failure is over (an answer from before it, come late, is put right by the next).
  const lateAnswer = el.dataset.state === "failed" && item.state === "done";
  const sentAgain = item.sent_again || 0;
  const queuedAgain = el.dataset.state === "failed" && item.state === "queued" && sentAgain > 0 &&
    sentAgain >= Number(el.dataset.sentAgain || 0);
  if (FINISHED.has(el.dataset.state) && !lateAnswer && !queuedAgain) return;
  if (lateAnswer || queuedAgain) {
    el.querySelector(".error").textContent = "";
    delete el.dataset.code;
  }
  if (sentAgain) el.dataset.sentAgain = String(sentAgain);
  if (item.state === "queued") {
    setState(el, "queued");
    if (queuedAgain) updateSummary();  // one fewer failed
    return;
  }
  if (item.state === "failed") {
    showItemFailure(el, item);
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
  // Named for its row, or 200 disclosures would all read "top 5".
  el.querySelector(".guesses summary").setAttribute("aria-label", `top 5 for ${el.dataset.filename}`);
  if (item.untrained) {
    el.classList.add("untrained");
    el.querySelector(".untrained-mark").hidden = false;
    banner.hidden = false;
  }
  answers.set(el, { label: item.label ?? "", score: item.score, top5: item.top5 || [],
                    untrained: Boolean(item.untrained) });
  setState(el, "done");
  updateSummary();
}
