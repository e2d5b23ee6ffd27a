// The batches named in the address, shown again after a reload (or from a shared
// link): as this tab showed them (its rows saved in sessionStorage), then whatever
// else the server holds of them, and followed until they are done.
import { addNotice, restoreRead, restoresBegin } from "./announce.js";
import {
  batchesInUrl, explainedOnly, forgetBatch, isUnconfirmed, sameFile, savedResults, savedShown, setUnconfirmed,
} from "./batches.js";
import { resultsEl } from "./dom.js";
import { fetchBatch } from "./http.js";
import { updateSummary } from "./refresh.js";
import { showFailure, showSentAgain } from "./rows.js";
import { Session } from "./session.js";
import { page } from "./state.js";

// All at once (a batch rebuilt after a restart may take seconds, and one that never
// answers would hold up every batch after it), each shown at a place kept for it
// in the order the batches were sent in. One count is said once all are read (announce.js).
export function restoreFromAddress() {
  const batchIds = batchesInUrl();
  restoresBegin(batchIds.length);
  for (const batchId of batchIds) {
    const place = document.createElement("li");
    place.hidden = true;
    resultsEl.append(place);
    restore(batchId, place).finally(restoreRead);
  }
}

async function restore(batchId, place) {
  const session = restoredSession(batchId, place);
  // Whether its files not heard stored are lost, and how long the batch is followed,
  // depend on whether another tab still sends it: asked now; the answer awaited a
  // moment only where it changes what is shown (else it may come later).
  session.askSender();
  const { body, unknown } = await fetchBatch(batchId);
  session.unknown = unknown;
  // This read is the first of the two in a row that give a batch the server held up (Session.lose).
  session.unknownInARow = unknown ? 1 : 0;
  const saved = savedShown(batchId);
  // Lost, if it is later said unknown (Session.lose): it answered now, or this tab heard
  // a file of it stored before the reload.
  session.held = Boolean(body) || saved.some((shown) => shown.id);
  if (unknown || saved.some((shown) => shown.unsent)) await session.senderAnswer();
  // One this tab was sending when it reloaded (or another tab still sends), of which
  // the server holds no file yet (it does not know the batch, or holds it still
  // empty): its files as the tab saved them, those not stored said so, and watched as
  // any restored batch is, for a chunk that reaches the server after the reload. Kept
  // in the address (and unconfirmed) until that watch is over: a reload within it
  // shows them again, where dropped it would lose them without a word.
  const sending = unknown && ((isUnconfirmed(batchId) && saved.length > 0) || session.otherTabSends);
  // An upload whose every file was refused: no batch was made, and the server has
  // nothing to add to the reasons this tab saved.
  const refusals = unknown && explainedOnly(saved);
  // One this tab heard a file of stored, that the server no longer holds (restarted with
  // its storage reset, or the batch expired): its rows as the tab saved them, those
  // classified with their results, and the batch given up as a live page gives it up
  // (the next read saying it unknown too), its other files failed as lost, and said so.
  // Said "unknown here", the user would be told nothing of what happened, and lose the
  // results the tab had shown.
  const lost = unknown && session.held;
  const items = body && Array.isArray(body.items) ? body.items : sending || refusals || lost ? [] : null;
  if (!items) {
    sayNotLoaded(batchId, unknown);
    return;
  }
  if (items.length) setUnconfirmed(batchId, false);  // else a reload may still find none
  // Watched from now, before its rows are shown: those not stored wait for the watch.
  session.watchFrom = Date.now();
  showRows(session, saved, items, savedResults(batchId));
  updateSummary();
  if (refusals) return;  // nothing will come of it: not followed (which would drop it)
  // Polled, not streamed: each event stream holds one of the browser's few
  // connections to this server (six over HTTP/1.1), and a reload may bring back many.
  // (Whether another tab sends it is asked again at each poll.)
  // Nothing saved of it in this tab: opened from its link, perhaps while another
  // browser still sends it (a tab of this browser that sends it answers the asks).
  if (!saved.length) session.grewAt = Date.now();
  session.built = true;
  session.poll();
}

// The session of a batch not uploaded by this page view, its rows to go after `place`.
function restoredSession(batchId, place) {
  const session = new Session([]);
  session.batchId = batchId;
  session.created = true;
  session.uploading = false;
  session.restored = true;
  session.place = place;
  page.sessions.push(session);
  return session;
}

// No rows to show: the server does not know the batch (`unknown`), or gave no answer.
function sayNotLoaded(batchId, unknown) {
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
}

// The batch's rows: as this tab showed them before (`saved`), then whatever else the
// server's `items` hold. A row the server no longer lists shows the answer this tab saved
// of it (`results`), if any: the server's, where it lists the item, comes first.
function showRows(session, saved, items, results) {
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
  const listed = new Set(items.map((item) => item.id));
  session.rebuilding = true;  // nothing saved until every row is in (Session.save)
  for (const shown of saved) {
    const rows = session.entries.length;
    if (shown.id && byId.has(shown.id)) {
      session.showNew(byId.get(shown.id), false);
      byId.delete(shown.id);
    } else if (shown.id && !listed.has(shown.id)) {
      // Heard stored before the reload, and not in the batch the server holds now: lost
      // with it (the batch made anew since), shown so rather than dropped without a word.
      session.showUnlisted(shown, !session.unknown, results.get(shown.id));
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
        session.showUnsent(shown.name || "upload", shown.why, shown.token, Boolean(shown.stopped));
      }
    }
    if (shown.path && session.entries.length > rows) session.setPath(session.entries[rows], shown.path);
    if (shown.again && session.entries.length > rows) showSentAgain(session.entries[rows], shown.again);
    // Kept for the next save, or it drops them and the next reload shows the items replaced.
    if (shown.replaced && session.entries.length > rows) session.entries[rows].replaced = shown.replaced;
  }
  byId.forEach((item) => session.showNew(item));
  session.rebuilding = false;
  if (session.saveWaits) {
    session.saveWaits = false;
    session.save();
  }
}
