// The batches kept in the address (#batches=id,id...), so that a reload (or a shared
// link) shows them again, and what this tab keeps of each in sessionStorage.
import { addNotice } from "./announce.js";
import { setting } from "./settings.js";

const BATCH_ID = /^[0-9a-f]{32}$/;
const SHOWN_STORE = "imgclass.shown.";  // + batch id, in this tab's sessionStorage
const UNCONFIRMED_STORE = "imgclass.unconfirmed.";  // + id of a batch not yet known to hold a file
const RESULTS_STORE = "imgclass.results.";  // + batch id: the answers its classified rows show
const resultCounts = new Map();  // batch id -> answers saved of it (read once, then kept up to date)
let droppedSaid = false;  // a batch left the address (maxBatchesInUrl): said once
// The least total (keys and texts) this tab's storage has refused: a write that would
// make as much is not tried (setItemMakingRoom).
let overQuota = Infinity;
const unsaved = new Set();  // batch ids whose rows storage could not hold (notKept)
let unsavedSaid = false;

// 32 hex digits, as the server's ids (crypto.randomUUID needs HTTPS, this may not be).
export function newBatchId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)),
                    (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function idsInUrl() {
  const match = /(?:^#|&)batches=([^&]*)/.exec(location.hash);
  return match ? match[1].split(",").filter(Boolean) : [];
}

export function batchesInUrl() {  // each once: a batch named twice was shown twice
  return [...new Set(idsInUrl().filter((id) => BATCH_ID.test(id)))];
}

function writeBatches(ids) {
  history.replaceState(null, "", ids.length ? `#batches=${ids.join(",")}` : location.pathname);
}

export function rememberBatch(batchId) {
  const ids = batchesInUrl().filter((id) => id !== batchId);
  const most = setting("maxBatchesInUrl");
  const kept = [...ids, batchId];
  while (kept.length > most) {
    // The oldest upload whose every file was refused leaves first (only this tab has
    // its reasons, and nothing of it is on the server), then the oldest batch.
    const refused = kept.findIndex((id) => id !== batchId && explainedOnly(savedShown(id)));
    forgetShown(kept.splice(Math.max(refused, 0), 1)[0]);
  }
  if (kept.length < ids.length + 1 && !droppedSaid) {
    // Their rows stay on the page, but a reload or the link would not show them: say so.
    droppedSaid = true;
    addNotice(`the address keeps the latest ${most} batches: older ones left it, and a ` +
              "reload will not show them");
  }
  writeBatches(kept);
}

export function forgetBatch(batchId) {
  writeBatches(batchesInUrl().filter((id) => id !== batchId));
  forgetShown(batchId);
}

// What this tab saved of a batch that has left the address, which no reload shows now:
// kept, each such batch's rows would stay in sessionStorage until its quota is full, and
// then no batch's rows be saved, without a word.
function forgetShown(batchId) {
  unsaved.delete(batchId);  // no reload shows it now anyway
  try { sessionStorage.removeItem(SHOWN_STORE + batchId); } catch { /* storage disabled */ }
  forgetResults(batchId);
}

export function setUnconfirmed(batchId, unconfirmed) {
  // Not written (storage disabled), a reload then says the batch could not be loaded.
  if (unconfirmed) {
    if (!setItemMakingRoom(UNCONFIRMED_STORE + batchId, "1", batchId)) notKept(batchId, true);
    return;
  }
  try { sessionStorage.removeItem(UNCONFIRMED_STORE + batchId); } catch { /* storage disabled */ }
}

export function isUnconfirmed(batchId) {
  try { return sessionStorage.getItem(UNCONFIRMED_STORE + batchId) === "1"; } catch { return false; }
}

// The rows this tab showed of the batch (Session.save): [] if none.
export function savedShown(batchId) {
  try {
    const shown = JSON.parse(sessionStorage.getItem(SHOWN_STORE + batchId) || "[]");
    return Array.isArray(shown) ? shown : [];
  } catch {
    return [];
  }
}

// Keeps `shown`, the batch's rows as this tab shows them, for a reload (savedShown):
// while the batch is in the address (its rows stay on the page once it has left).
// Not written (storage full, or disabled), a reload shows only what the server holds,
// in its order (said: notKept).
export function saveShown(batchId, shown) {
  if (!batchesInUrl().includes(batchId)) return;
  notKept(batchId, !setItemMakingRoom(SHOWN_STORE + batchId, JSON.stringify(shown), batchId));
}

// Writes one of the tab's own records (a batch's rows, its unconfirmed mark) of
// `batchId`, which come before the answers (saveResults), and before the rows of the
// batches before it in the address (the latest come first, as there): storage full,
// the answers give way, the oldest batch's first, then those rows, until it fits.
// Kept, a tab's answers (~2 MB) could leave a later batch no room for its rows, which a
// reload would then show in the server's order, its refusals gone; or for its
// unconfirmed mark, and a reload while it is still being sent say it could not be
// loaded. Only what the record needs goes, and nothing if it cannot fit: each answer
// deleted in turn before, to no end, a batch of 10,000 long names took every batch's
// answers with it, and still was not saved. Whether the record was written.
function setItemMakingRoom(key, text, batchId) {
  try {
    sessionStorage.setItem(key, text);
    return true;
  } catch { /* storage full (or disabled: below, reading it fails too) */ }
  let sizes;
  try { sizes = storedSizes(); } catch { return false; }
  sizes.delete(key);  // replaced by the record
  let total = key.length + text.length;  // the record's and the others': what the write would make
  for (const size of sizes.values()) total += size;
  overQuota = Math.min(overQuota, total);
  const ids = batchesInUrl();
  const older = ids.slice(0, Math.max(ids.indexOf(batchId), 0));
  const givers = [...ids.map((id) => RESULTS_STORE + id), ...older.map((id) => SHOWN_STORE + id)]
    .filter((giver) => sizes.has(giver));
  let spare = givers.reduce((sum, giver) => sum + sizes.get(giver), 0);
  const taken = [];  // [key, text]: put back, unless the record needed their room
  const written = () => {
    if (total >= overQuota) return false;  // refused before: not tried
    try {
      sessionStorage.setItem(key, text);
      return true;
    } catch {
      overQuota = total;
      return false;
    }
  };
  // Sizes first: nothing is taken while even all of it would leave a total refused
  // before; then one at a time, the oldest first, the record tried after each.
  let fits = false;
  for (let next = 0; ; next += 1) {
    fits = written();
    if (fits || next === givers.length || total - spare >= overQuota) break;
    const giver = givers[next];
    taken.push([giver, sessionStorage.getItem(giver)]);
    sessionStorage.removeItem(giver);
    total -= sizes.get(giver);
    spare -= sizes.get(giver);
  }
  // The rows first, the latest first, then the answers: what the record did not need
  // back. Not written, all of it, as it was (the record's old text still there).
  for (const [giver, kept] of taken.reverse()) {
    if (fits && total + sizes.get(giver) >= overQuota) {
      gaveWay(giver);
      continue;
    }
    try {
      sessionStorage.setItem(giver, kept);
      if (fits) total += sizes.get(giver);
    } catch {
      if (fits) overQuota = total + sizes.get(giver);
      gaveWay(giver);
    }
  }
  return fits;
}

// The characters each of this tab's records takes (its key's and its text's), as the
// browser counts them against its quota.
function storedSizes() {
  const sizes = new Map();
  for (let i = 0; i < sessionStorage.length; i += 1) {
    const key = sessionStorage.key(i);
    sizes.set(key, key.length + (sessionStorage.getItem(key) || "").length);
  }
  return sizes;
}

// A record of another batch's that gave way (setItemMakingRoom): its answers, or its
// rows, which a reload then does not show.
function gaveWay(giver) {
  if (giver.startsWith(RESULTS_STORE)) resultCounts.set(giver.slice(RESULTS_STORE.length), 0);
  else notKept(giver.slice(SHOWN_STORE.length), true);
}

// Batches whose rows this tab could not keep for a reload (storage full), said in the
// summary line while it holds, and aloud once: a reload then shows only what the server
// holds of them, which of an upload all refused or stopped is nothing. (Said nowhere, a
// reload lost 20,000 rows of 40,000 unseen.)
function notKept(batchId, unkept) {
  if (!unkept) {
    unsaved.delete(batchId);
    return;
  }
  unsaved.add(batchId);
  if (unsavedSaid) return;
  unsavedSaid = true;
  addNotice(() => {
    if (!unsaved.size) return "";
    const ids = [...unsaved];
    const which = ids.length === 1 ? `batch ${ids[0]}` : `${ids.length} batches (${ids.join(", ")})`;
    return `this tab's storage is full (or turned off): a reload will not show the rows of ${which}, only ` +
      "what the server holds of them";
  }, "this tab's storage is full (or turned off): a reload will not show the rows of some batches, only " +
    "what the server holds of them");
}

function resultsCount(batchId) {
  if (!resultCounts.has(batchId)) resultCounts.set(batchId, packedResults(batchId).length);
  return resultCounts.get(batchId);
}

function packedResults(batchId) {
  try {
    const packed = JSON.parse(sessionStorage.getItem(RESULTS_STORE + batchId) || "[]");
    return Array.isArray(packed) ? packed : [];
  } catch {
    return [];
  }
}

function forgetResults(batchId) {
  resultCounts.set(batchId, 0);
  try { sessionStorage.removeItem(RESULTS_STORE + batchId); } catch { /* storage disabled */ }
}

// Keeps the answers the batch's classified rows show (`results`: [item id, answer
// (rows.js answerShown)], in row order), for a reload that finds the server has lost
// the batch (savedResults): the server holds them no more, and those rows would show
// failed. Bounded (sessionStorage holds ~5 MB a tab, and a batch may hold thousands of
// files): setting("savedResults") answers in all, ~200 characters each, packed. Past
// that, the latest batches' come first, as in the address: the oldest batch's go, whole;
// a batch with more keeps its first rows'.
export function saveResults(batchId, results) {
  const ids = batchesInUrl();
  const at = ids.indexOf(batchId);
  if (at < 0) return;
  const most = setting("savedResults");
  const newer = ids.slice(at + 1).reduce((sum, id) => sum + resultsCount(id), 0);
  const kept = results.slice(0, Math.max(0, most - newer));
  let total = ids.reduce((sum, id) => sum + (id === batchId ? kept.length : resultsCount(id)), 0);
  for (const id of ids.slice(0, at)) {
    if (total <= most) break;
    total -= resultsCount(id);
    forgetResults(id);
  }
  if (!kept.length) {
    forgetResults(batchId);
    return;
  }
  const packed = kept.map(([id, { label, score, top5, untrained }]) =>
    [id, label, score, top5.map((guess) => [guess.label, guess.score]), untrained ? 1 : 0]);
  try {
    sessionStorage.setItem(RESULTS_STORE + batchId, JSON.stringify(packed));
    resultCounts.set(batchId, kept.length);
  } catch { /* storage full or disabled: the answers saved before stay, still true */ }
}

// The answers saveResults kept of the batch, by item id, each as the server's item would
// give it (rows.js showItem).
export function savedResults(batchId) {
  const results = new Map();
  for (const packed of packedResults(batchId)) {
    try {
      const [id, label, score, top5, untrained] = packed;
      results.set(id, { id, state: "done", label, score, untrained: Boolean(untrained),
                        top5: top5.map(([guess, guessScore]) => ({ label: guess, score: guessScore })) });
    } catch { /* damaged: its row shows as if nothing was saved */ }
  }
  return results;
}

// Whether saved rows are of an upload whose every file was refused, or not sent, each
// with its reason: nothing of it is on the server. Refused only, a batch stopped after
// a 503 would be dropped from the address, and the reload it told of show nothing.
export function explainedOnly(saved) {
  return saved.length > 0 && saved.every((shown) => shown.error || shown.why);
}

// Whether `item` (the server's) is the file of a saved row not heard stored: by the
// token the file was sent under, which the server keeps with it and echoes. By name,
// a name the server cleans (web_tier/filenames.py clean_name: spaces around it, a control or
// bidi character, one cut for length) was not recognised, and its file was shown
// twice, failed and with its result. A row saved without a token (by an older page)
// is still matched by name.
export function sameFile(row, item) {
  return row.token !== undefined ? item.token === row.token : item.filename === row.name;
}

// An address edited by hand may name what is not a batch id: said, not nothing, and
// left out of the address, as is a batch named twice. One naming more batches than
// the page keeps there (a link made to have each visitor's browser read hundreds of
// batches, each a listing of S3) keeps the latest, as the page would have.
export function tidyAddress() {
  const malformed = idsInUrl().filter((id) => !BATCH_ID.test(id));
  if (malformed.length) {
    addNotice(`not a batch id, ignored: ${malformed.map((id) => id.slice(0, 40)).join(", ")}`);
  }
  const ids = batchesInUrl();
  const most = setting("maxBatchesInUrl");
  if (ids.length > most) {
    addNotice(`the address named ${ids.length} batches: only the latest ${most} are shown`);
    writeBatches(ids.slice(-most));
  } else if (malformed.length || ids.length !== idsInUrl().length) {
    writeBatches(ids);
  }
}
