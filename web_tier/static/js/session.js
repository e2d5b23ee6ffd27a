// One upload, and one batch: its sends and resends, following the batch's results,
// and (restore.js) a batch shown again after a reload.
import { DEAD_LETTER, isDeadLetter } from "./again.js";
import { addNotice, sayNext, sayOnce, someFiles, uploadBegins } from "./announce.js";
import {
  batchesInUrl, explainedOnly, forgetBatch, newBatchId, rememberBatch, sameFile, saveResults, saveShown,
  setUnconfirmed,
} from "./batches.js";
import { bytesOf, chunked } from "./chunks.js";
import { $, keyInput, resultsEl } from "./dom.js";
import { fetchBatch, freeSendPlace, post, refusedWhole, sendItemAgain, takeSendPlace } from "./http.js";
import { requestUnanswered, serverAnswered, serverSilent } from "./reach.js";
import { authHeaders, keyProblem, sayKeyProblem, storedKey } from "./key.js";
import { updateSummary } from "./refresh.js";
import {
  FINISHED, answerShown, makeResult, makeRow, sentName, setName, setPath, setState, showFailure, showItem,
  showItemFailure, showSentAgain,
} from "./rows.js";
import { PARALLEL_CHUNKS, RESEND_DELAYS_MS, resendDelayMs, setting, tooLargeText } from "./settings.js";
import { page } from "./state.js";
import { ASK_WAIT_MS, SILENT_ASKS, tell } from "./tabs.js";

const SSE_GIVE_UP = 3;       // consecutive stream errors before polling instead
// Event streams open at once; other batches are polled. Each holds one of the
// browser's six connections to the server until its batch is done: one per upload
// would leave later uploads, the status line and other tabs waiting. Across tabs, a
// hidden tab holds none (hide), and a stream that brings nothing for a while gives its
// connection back (follow).
const MAX_STREAMS = 2;
// A file this tab had chosen but not yet heard stored when the page was reloaded or left.
const NOT_STORED = "not stored: its upload had not finished when the page was left or reloaded; choose it again";
// The same, while the restored batch is still watched for it (unsentWatchMs): a chunk
// the server had received whole as the page left may yet be stored.
const CUT_OFF = "upload cut off by the reload: waiting to see whether the server got it";
// A file of a batch another tab was sending, not stored once that tab had ended its
// sends (or was closed or reloaded): this page was not left, nor the file cut off here.
const NOT_STORED_ELSEWHERE = "not stored by the tab that sent it; see that tab for why";
// Its sender answers no more: closed or reloaded, it has no reason left to show.
const NOT_STORED_SENDER_GONE = "not stored: the tab sending it was closed or reloaded; choose it again";
const STOPPED_AGAIN = "not sent again: you stopped the upload (the server may hold it: reload to see)";
// Why a server no longer holds a batch the page sent.
const LOSS_WHY = "restarted with its storage reset, or the batch expired";
const GONE = `the server no longer holds its batch (${LOSS_WHY})`;
// A file stored in a batch the server has since lost (see lose): no answer will come for it.
const LOST = `not classified: ${GONE}`;
// The same, of a file a reload had saved classified, its answer not kept (batches.js
// saveResults keeps so many, and gives way when storage is full): "not classified"
// would be false, and sent again, it would be classified a second time unawares.
const ANSWER_GONE = `classified, but its answer is gone: ${GONE}, and this tab did not keep the answer; ` +
  "choose the file again to see it";
// A row classified is saved this long after (saveSoon), with the others classified
// meanwhile: each save writes the batch's rows whole, and a batch of thousands of files
// is classified one file at a time.
const SAVE_AFTER_MS = 1000;
const SAVE_AT_ONCE_MAX_ROWS = 500;
// Saves spaced so as to take at most 1/SAVE_TIME_SHARE of the main thread: one of 10,000
// classified rows and their answers took 100-120 ms, every second while they were
// classified (a page being left saves what is pending all the same: savePending).
const SAVE_TIME_SHARE = 20;

// How long after a row is classified the batch is saved, given how long the last save took.
export function saveDelayMs(lastSaveMs) {
  return Math.max(SAVE_AFTER_MS, SAVE_TIME_SHARE * lastSaveMs);
}
// A row as saved for a reload (saveShown; restore.js reads it back).
function savedRow(entry) {
  return {
    // Its name too: a reload that finds the server no longer lists it shows its row lost
    // (restore.js showRows), not nothing; and that it was lost, for the reload to show
    // it so at once, not queued until two reads have left it out, then said again.
    // And that it was classified: its answer may not be kept (saveResults), and a
    // reload that finds the batch lost must not say it was not.
    ...(entry.id ? { id: entry.id, name: entry.el.dataset.filename,
                     ...(entry.failure && entry.failure.lost ? { lost: true } : {}),
                     ...(entry.el.dataset.state === "done" || entry.classified ? { done: 1 } : {}) }
      : entry.refused ? { name: entry.el.dataset.filename, error: entry.refused }
        : { name: entry.el.dataset.filename, unsent: true, why: entry.unsentWhy, token: entry.token,
          // A reload counts it apart too, as this page does (rows.js isStopped).
          ...(entry.failure && entry.failure.stopped ? { stopped: true } : {}) }),
    ...(entry.path ? { path: entry.path } : {}),
    ...(entry.again ? { again: entry.again } : {}),
    ...(entry.replaced ? { replaced: entry.replaced } : {}),
  };
}

// How many answers in a row must say "no such batch" of a batch the server had held
// before the page gives it up (see confirmedLost); and how many reads in a row must
// leave out a file the server had stored before the page takes it for lost with it
// (see loseUnlisted).
const LOST_AFTER = 2;

// One upload session = one batch.
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
// it was sent again (sendAgain), `replaced`: the ids of its items failed by a worker;
// `storedRead`: the reads of the batch begun (`reads`) when it was heard stored, and
// `unlisted`: how many reads in a row since have left its item out (loseUnlisted);
// `classified`: a restored row saved classified, its answer not kept (showUnlisted).
export class Session {
  constructor(chosen) {  // [{file, path}]
    this.batchId = newBatchId();
    this.created = false;     // the server holds the batch: a file of it was stored
    this.unanswered = false;  // a send got no answer: the server may hold files it stored
    this.uploading = true;
    this.byId = new Map();    // item id -> element
    this.early = new Map();   // results that beat their upload's answer
    const named = new Map();
    for (const { file } of chosen) named.set(file.name, (named.get(file.name) || 0) + 1);
    // Put on the page at once: one at a time, 10,000 rows took the main thread for seconds.
    const rows = document.createDocumentFragment();
    this.entries = chosen.map(({ file, path }, n) => {
      // Its size read here, once, and kept (`size`): the first read of a File's size asks
      // the browser's process, synchronously (0.2 ms each, 2,000 files 0.4 s).
      const entry = { file, size: file.size, token: String(n), el: makeRow(sentName(file.name) || "upload") };
      rows.append(entry.el);
      if (path) entry.el.dataset.chosenPath = path;  // for the CSV, whose rows are not seen side by side
      if (path && named.get(file.name) > 1) this.setPath(entry, path);
      return entry;
    });
    resultsEl.append(rows);
    this.stream = null;
    this.streamIdleTimer = null; // closes a stream that brings nothing (follow)
    this.pollingHidden = false;  // polled, not streamed, as the tab is hidden (hide)
    this.pollingIdle = false;  // polled, not streamed, as its stream brought nothing (follow)
    this.lastEventId = "";    // the id of the last event its streams sent: a new one starts after it
    this.sseErrors = 0;
    this.pollTimer = null;
    this.restored = false;    // rebuilt from the address after a reload, not uploaded here
    this.place = null;        // a restored batch's rows go after this (kept in address order)
    this.queue = [];          // {chunk, attempt}: to be sent, resends first
    this.waiting = 0;         // chunks waiting their delay to be sent again (sendLater)
    this.resends = new Map(); // their timers -> their entries (see stop)
    this.resendDue = new Map(); // ...and when each goes (nextResendAt)
    this.inHand = new Set();  // chunks taken from the queue, their answer not in yet
    this.sentBytes = 0;       // of the requests answered or given up, as far as each got (sendingText)
    this.stopped = false;     // the user stopped it: nothing more is sent
    this.keyRefused = false;  // the server refused its API key (refuseKey)
    this.resendReady = null;  // resolves when one of them joins the queue
    this.wake = () => {};
    this.watchFrom = 0;       // a restored batch: watched setting("unsentWatchMs") from then for unsent files
    this.unknown = false;     // the server's last answer: no such batch
    this.held = false;        // the server has been seen holding the batch (a file stored, or read)
    this.unknownInARow = 0;   // answers in a row, since, that it holds no such batch
    this.lost = false;        // ...enough of them: given up (lose), until a file of it is stored again
    this.lostRead = 0;        // ...at which of the reads begun (`reads`)
    this.lossNoticed = false; // its loss (or its files') has a notice in the summary line (lossText)
    this.reads = 0;           // reads of the batch begun (refresh): one begun after a file was heard stored
    this.confirmTimer = null; // a second read, due to confirm files left out of one (loseUnlisted)
    this.grewAt = 0;          // opened from its link: when it last showed a file new here
    // A restored batch that another tab of this browser is still sending (see "other
    // tabs" below): its files not yet stored are shown still being sent there, and the
    // batch polled, until that tab says it is done or stops answering.
    this.otherTabSends = false;
    this.otherTabEnded = false;   // ...and has said it is done, or stopped answering
    this.otherTabGone = false;    // ...the latter: closed or reloaded, it has no reasons to show
    this.unansweredAsks = 0;      // asks in a row that no tab answered
    this.built = false;           // restore() has built the batch's rows, and follows it
    this.rebuilding = false;      // restore() is building them: save() waits for the last (showRows)
    this.saveWaits = false;       // ...and was asked for meanwhile
    this.saveTimer = null;        // a save due soon (saveSoon)
    this.lastSaveMs = 0;          // how long the last save took (saveDelayMs)
    this.replaced = new Set();    // ids of items a file sent again replaces: not shown (sendAgain)
  }

  async run() {
    // In the address from the start, so that a reload shows the files the server
    // stored even if no answer came back; until one does, a reload that finds no
    // such batch shows the files as saved (none stored yet: see restore).
    rememberBatch(this.batchId);
    setUnconfirmed(this.batchId, true);
    // The setting read once, not for each file (a read of the body's dataset each).
    const most = setting("maxFileBytes");
    const tooLarge = this.entries.filter(({ size }) => size > most);
    this.refuse(tooLarge, tooLargeText(), true, { code: "too_large" });
    if (!tooLarge.length) this.save();  // saved from the start, as refuse saves (see save)
    const refused = new Set(tooLarge);
    await this.sendAll(this.entries.filter((entry) => !refused.has(entry)));
  }

  // "Send N failed files again": `entries`, failed files of this upload that
  // notWorthAgain lets go. A dead letter is queued again in place (queueAgain). The
  // others go again by the upload's own path (chunks, tokens, resends, "Stop sending"),
  // into this batch, not a new one. A file whose answer was lost may be stored
  // already, and only its batch and token keep it from being stored twice (the server
  // answers `again` with its item); the batch stays the one the address names; and a
  // row stays one row, counted once, on this page and after a reload.
  async sendAgain(entries) {
    const inPlace = entries.filter(isDeadLetter);
    this.queueAgain(inPlace);
    const uploads = entries.filter((entry) => !inPlace.includes(entry));
    if (uploads.length) await this.uploadAgain(uploads);
  }

  // A dead letter (no worker answered it: the workers holding it crashed, stalled or
  // were stopped) goes again as the same item: the server queues it again under its
  // id (POST .../again), and its row shows it queued, then its outcome. Not sent
  // again, it stays failed, with why, and still offered.
  queueAgain(entries) {
    for (const entry of entries) {
      // Without what an earlier press added, which each press added to again.
      const error = entry.el.querySelector(".error").textContent
        .replace(/ \(not sent again(?: in place)?: [\s\S]*\)$/, "");
      entry.el.querySelector(".error").textContent = "";
      setState(entry.el, "uploading");
      const before = entry.again || 0;
      showSentAgain(entry, before + 1);
      this.askToQueueAgain(entry, error, before);
    }
    if (entries.length) {
      this.save();
      updateSummary();
    }
  }

  // `before`: how many times it had been sent again before this press, which says so
  // again if the press is refused (it was not sent again).
  async askToQueueAgain(entry, error, before) {
    const { el } = entry;
    const problem = keyProblem();
    const { status, body } = problem ? { status: 0, body: { error: problem } }
      : await sendItemAgain(this.batchId, entry.id, authHeaders());
    const item = body && body.item;
    // Queued again; or, refused 409, as it is now if no longer failed (another tab sent
    // it again, or a late answer came).
    if (item && (status === 202 || (status === 409 && item.state !== "failed"))) {
      if (status === 202) el.dataset.sentAgain = String(item.sent_again || 1);
      this.showAnswer(el, item);
      updateSummary();
      if (!FINISHED.has(el.dataset.state) && !this.stream && !this.pollTimer) {
        if (this.restored) this.poll();  // as restore follows it: no stream held
        else this.follow();
      }
      return;
    }
    const why = ((body && body.error) || "the server could not be reached").replace(/^not sent again: /, "");
    showSentAgain(entry, before);
    this.save();
    if (status === 409 && item && item.state === "failed" && item.code !== DEAD_LETTER) {
      showItemFailure(el, item);  // failed otherwise since (by a worker, on the image): as it is
      return;
    }
    if ((status === 404 && body && body.code === "unknown_item") || (status === 409 && item)) {
      // Not to be queued in place (its image gone from the input bucket, or the item from
      // the server): the next "send again" uploads the File as a new item, if this page
      // holds it.
      entry.notInPlace = true;
      const next = entry.file ? "; send it again to upload it anew" : "";
      showFailure(el, `${error} (not sent again in place: ${why}${next})`);
      return;
    }
    showFailure(el, `${error} (not sent again: ${why})`);
  }

  // Files not stored, or gone from the input bucket (a new item, under a new token).
  async uploadAgain(entries) {
    for (const entry of entries) {
      // A file a worker could not find in the input bucket: its batch holds it under its
      // token, which would only give the failure back. It goes under a new token, and the
      // failed item it replaces is kept off the page (`replaced`, saved for a reload in
      // this tab too; a browser with nothing saved shows both: README).
      if (entry.id) {
        this.byId.delete(entry.id);
        this.replaced.add(entry.id);
        entry.replaced = [...(entry.replaced || []), entry.id];
        delete entry.id;
        delete entry.notInPlace;  // the old item's: a new one that fails as a dead letter may go in place
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
    // upload's first sends beside others going on: taken out, its figures would go back.
    if (!page.sendingNow.has(this)) this.sentBytes = 0;
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
      // (restore): dropped, the reasons would go with a reload. Told by its rows, not by
      // what storage held of them: full, it held none, and the batch left the address
      // unsaid (batches.js says the rows not kept).
      if (!explainedOnly(this.entries.map(savedRow))) {
        forgetBatch(this.batchId);
      }
    }
    updateSummary();
  }

  // Sends the queued chunks, `width` at once (and within the page's places: see
  // takeSendPlace), until none is left nor waits to be sent again, or until
  // `enough()`. A resend joins the queue once its delay is over, so never more than
  // `width` requests are in flight: resends sent beside the pool's would choke a slow
  // link further, and be cut off in turn.
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

  // Sends `chunk` (its `attempt`-th time), and takes the answer: each step below.
  async send(chunk, attempt = 0) {
    const taken = chunk;  // as in this.inHand
    chunk = await this.readable(chunk, attempt > 0);  // each time: a file may go while a resend waits
    if (!chunk.length) return;
    if (this.stopped) {  // "Stop sending" pressed while its files were read: not sent after all
      this.refuseStopped(chunk);
      updateSummary();
      return;
    }
    const form = this.formFor(chunk);
    if (keyProblem()) {
      sayKeyProblem(keyProblem());
      this.refuse(chunk, keyProblem(), true, { key: storedKey() });
      return;
    }
    const headers = authHeaders();  // as sent: the key may be edited while this request goes
    let answer;
    try {
      // The answer's body within the answer's time: one cut off or stalled after a
      // 202 is an answer lost (the files may be stored), not a refusal.
      answer = await post(form, headers, bytesOf(chunk));
      this.counted(taken, bytesOf(chunk), answer.settle);
    } catch (err) {
      this.counted(taken, err.sentBytes, err.settle);  // as far as it got
      // A timeout of this page's own is said so: "could not be reached" would send a
      // user with a slow link to look for a fault in the server.
      this.noAnswer(chunk, attempt, err.timedOut || "upload failed: the server could not be reached");
      // After noAnswer: its next try is known.
      requestUnanswered(err.timedOut ? "timeout" : "unreachable", "upload");
      return;
    }
    const { status, body } = answer;
    // Said on the page as well as in the rows (reach.js), after the resend is set: those
    // resends went in silence, rows "uploading" for 76 s with no word of the server.
    const outage = answerLost(status, body) ? (status === 504 ? "timeout" : "unreachable")
      : status === 503 && refusedWhole(body) ? "busy" : "";
    if (status === 401) this.keyRefusedBy(headers, chunk);
    else if (answerLost(status, body)) this.noAnswer(chunk, attempt, answerLostText(status));
    else if (refusedWhole(body)) this.allRefused(chunk, attempt, status, body);
    else this.stored(chunk, attempt, body);
    if (outage) serverSilent(outage, "upload");
    else serverAnswered("upload");
  }

  formFor(chunk) {
    const form = new FormData();
    for (const { file, token } of chunk) {
      form.append("files", file, file.name);
      form.append("tokens", token);
    }
    form.append("batch_id", this.batchId);
    form.append("create", "1");
    return form;
  }

  // A request ended, answered or not: counted once, `sentBytes` of it sent, no longer
  // in hand (its files go again if they must), nor in flight (`settle`, post's).
  counted(taken, sentBytes, settle) {
    this.inHand.delete(taken);
    this.sentBytes += sentBytes;
    settle();
  }

  // No answer came (post's SendFailure): no server (the next web tier still starting),
  // the answer lost or too long in coming, or cut off by leaving the page; or a proxy's
  // in its place (answerLost). The chunk goes again: the files' tokens keep those it
  // stored from being stored twice. (A page left for good runs no timer; one kept in
  // the back/forward cache sends them when it is shown again.) `why`: said once the
  // resends are over.
  noAnswer(chunk, attempt, why) {
    this.unanswered = true;
    for (const entry of chunk) entry.maybeStored = true;  // see stop
    if (attempt < RESEND_DELAYS_MS.length) {
      this.sendLater(chunk, attempt);
      return;
    }
    if (page.leaving) {
      // Cut off by leaving, not refused: a page kept in the back/forward cache sends it
      // again once shown (its timers frozen meanwhile); a page left for good never does.
      this.sendLater(chunk, attempt - 1);
      return;
    }
    // Not remembered for a reload: the server may have stored some, which a reload shows.
    this.refuse(chunk, why, false, { unanswered: true });
    // Or shows already: the server's items for them, come on the batch's stream before
    // the resends gave up, were kept for an answer that never came. The stream does not
    // send them again, and the minute's look passes rows with no item id.
    for (const [id, item] of this.early) {
      if (this.pendingRowFor(item)) {
        this.early.delete(id);
        this.showNew(item);
      }
    }
  }

  // 401: the key sent with the chunk (`headers`) was refused, or none was sent.
  keyRefusedBy(headers, chunk) {
    // A key was sent and refused: said to be missing, a user who had typed one
    // would look for another fault.
    const why = headers["X-API-Key"] ? "the API key was refused: check it above, then send the files again"
      : "an API key is required: enter it above, then send the files again";
    const key = headers["X-API-Key"] || "";
    this.refuseForKey(chunk, why, key);
    if (!this.keyRefused) this.refuseKey(why, key);
  }

  // The request was refused whole (refusedWhole) by the web tier: sent again if it was
  // stopping or AWS failing it (503: nothing stored), else each file failed with the
  // server's reason.
  allRefused(chunk, attempt, status, body) {
    if (status === 503 && attempt < RESEND_DELAYS_MS.length) {
      this.sendLater(chunk, attempt);
      return;
    }
    this.refuse(chunk, (body && body.error) || `upload refused (HTTP ${status})`, true,
                { code: body && body.code, status });
  }

  // The answer's `items` (stored) and `rejected` (refused one by one; those refused
  // 503, not stored, go again).
  stored(chunk, attempt, body) {
    if (body.items.length && !this.created) {
      this.created = true;
      setUnconfirmed(this.batchId, false);
    }
    // Made anew, if lost (create=1): followed again for the files just stored.
    if (body.items.length) this.heldAgain();
    for (const item of body.items) {
      const entry = chunk[item.index];
      if (!entry) continue;
      entry.id = item.id;
      entry.storedRead = this.reads;
      entry.unlisted = 0;
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
    this.saveAfterChunk();
    if (again.length) this.sendLater(again, attempt);
    // Followed from the first stored file on, and again after a stream that ended
    // because all that had joined the batch were done (more chunks join it later).
    if (this.created && !this.stream && !this.pollTimer) this.follow();
  }

  // The server refused the API key (401): the chunks not yet sent are refused with the
  // same reason (sent, each would be refused so), and the focus moved to the key's box
  // once, where the fix is typed: a screen reader user hears the box, and why. Not at
  // each chunk's 401, which would pull the focus back from wherever the user had
  // gone, once per chunk. Resends still waiting out their delay go as they
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
  // instead. Kept, a reload would show such a file twice, failed and done, and the advice
  // to send it again have it classified twice.
  // `key`: the key refused ("" for none), which the files wait to see changed (notWorthAgain).
  refuseForKey(entries, why, key) {
    const mayBeStored = `${why} (an earlier send may have stored it: reload to see)`;
    this.refuse(entries.filter((entry) => entry.maybeStored), mayBeStored, false, { key });
    this.refuse(entries.filter((entry) => !entry.maybeStored), why, true, { key });
  }

  // The entries whose files can still be read; the others failed, each with why.
  // One file moved or deleted since it was chosen makes the browser refuse to send its
  // whole chunk, which would then be said to have found no server. `resending`:
  // an earlier send may have stored them (its answer lost), so they are failed as not
  // stored, which the server's item, found by token, replaces (showNew), not refused.
  async readable(chunk, resending) {
    // Its first byte, or the whole of an empty one: a deleted file's size reads as 0,
    // and only reading it whole fails then.
    const read = await Promise.all(chunk.map(({ file, size }) =>
      (size ? file.slice(0, 1) : file).arrayBuffer().then(() => true, () => false)));
    const unreadable = chunk.filter((_, i) => !read[i]);
    // Changed too: the browser refuses a file whose size or date moved since.
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
      this.resendDue.delete(timer);
      this.waiting -= 1;
      this.queue.unshift({ chunk: entries, attempt: attempt + 1 });
      this.wakeDrain();
      updateSummary();  // the page's notice may name this try (reach.js)
    }, resendDelayMs(attempt));
    this.resends.set(timer, entries);
    this.resendDue.set(timer, Date.now() + resendDelayMs(attempt));
  }

  // When the next of its chunks waiting to be sent again goes (Infinity for none), for
  // the page's notice while the server does not answer (reach.js).
  nextResendAt() {
    return Math.min(...this.resendDue.values());
  }

  wakeDrain() {
    const wake = this.wake;
    this.resendReady = new Promise((resolve) => { this.wake = resolve; });
    wake();
  }

  // The user's "Stop sending": the chunks in flight end as they would (the server
  // may be storing them), and nothing else is sent. A wrong folder of thousands of
  // files on a slow link could otherwise only be stopped by leaving the page.
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
    this.resendDue.clear();
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
    if (!chunk.length) return;  // nothing to save: readable() asks so for every chunk
    for (const entry of chunk) {
      if (remember) entry.refused = why;
      else entry.unsentWhy = why;  // a reload shows it so, unless the server has it
      entry.failure = failure;
      showFailure(entry.el, why, Boolean(failure.stopped));
    }
    this.save();
  }

  // What the server cannot tell a reloaded page: the order the files were chosen in
  // (chunks sent in parallel join the batch in any order), the files it refused, and
  // those not yet stored (a reload that left them out would say nothing of them).
  // Saved from the start: a reload before the first answer came may find files stored.
  // Not while a reload rebuilds the rows (restore.js showRows), which saves once they are
  // all in: a row sent again would save those rebuilt so far, and the next reload lose the rest.
  // The answers its classified rows show are saved too (saveResults): the server is
  // asked first after a reload, but one that has lost the batch by then holds them no more.
  save() {
    clearTimeout(this.saveTimer);
    this.saveTimer = null;
    if (this.rebuilding) {
      this.saveWaits = true;
      return;
    }
    const began = performance.now();
    saveShown(this.batchId, this.entries.map(savedRow));
    saveResults(this.batchId, this.entries.filter((entry) => entry.id)
      .map((entry) => [entry.id, answerShown(entry.el)]).filter(([, answer]) => answer));
    this.lastSaveMs = performance.now() - began;
  }

  // A chunk's answer taken: saved at once while the batch has a few hundred rows; past
  // that within SAVE_AFTER_MS (a page being left saves what is pending, savePending), as
  // each save writes every row: 10,000 files' 1,000 saves took 26 s of the main thread.
  saveAfterChunk() {
    if (this.entries.length > SAVE_AT_ONCE_MAX_ROWS) this.saveSoon();
    else this.save();
  }

  // A row just classified: saved with those classified within SAVE_AFTER_MS of it (or
  // longer, where saves take long: saveDelayMs).
  saveSoon() {
    if (!this.saveTimer) this.saveTimer = setTimeout(() => this.save(), saveDelayMs(this.lastSaveMs));
  }

  // The page is being left (a reload among others): what saveSoon had still to save.
  savePending() {
    if (this.saveTimer) this.save();
  }

  apply(item) {
    if (this.replaced.has(item.id)) return;  // its file was sent again: its new item stands
    const el = this.byId.get(item.id);
    if (el) this.showAnswer(el, item);
    // Joined the batch after it was loaded, or stored by a send whose answer was lost.
    else if (this.restored || this.pendingRowFor(item)) this.showNew(item);
    else this.early.set(item.id, item);
    if (el && item.sent_again) this.saySentAgain(item);
  }

  // `item` in its row `el`; saved soon if that classified it.
  showAnswer(el, item) {
    const wasDone = el.dataset.state === "done";
    showItem(el, item);
    if (!wasDone && el.dataset.state === "done") this.saveSoon();
  }

  // An item queued again from elsewhere (another tab, a script): its row says so here too.
  saySentAgain(item) {
    const entry = this.entries.find((shown) => shown.id === item.id);
    if (entry && (entry.again || 0) < item.sent_again) {
      showSentAgain(entry, item.sent_again);
      this.save();
    }
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
      unsent.storedRead = this.reads;
      unsent.unlisted = 0;
      if (item.filename) setName(el, item.filename);  // as the server keeps it
      el.querySelector(".error").textContent = "";
      setState(el, "queued");
    } else {
      el = this.newRow(item.filename || "upload");
      this.entries.push({ file: null, el, id: item.id, storedRead: this.reads, unlisted: 0 });
    }
    this.byId.set(item.id, el);
    showItem(el, item);
    if (el.dataset.state === "done") this.saveSoon();
    if (item.sent_again) this.saySentAgain(item);
    if (this.built && this.grewAt) this.grewAt = Date.now();
    updateSummary();  // a row that joins queued is counted too
  }

  // A file this tab (or the one it was copied from) heard stored, saved as `shown`, that
  // the server's batch, restored, does not list: lost with the batch, which was then made
  // anew without it (a chunk sent with create=1, here or elsewhere). Shown queued, as it
  // was stored, then failed as lost by loseUnlisted once two reads in a row leave it out,
  // as a tab that stayed open fails it; `readWhole`: the restore's read (begun after its
  // 202, as any read of this page view is) listed the batch, and is the first of them.
  // One this tab had shown lost already (`shown.lost`) is shown failed at once, as it was;
  // one it had shown classified, with the answer it saved (`saved`), as it was too: the
  // server's answer is gone with the batch, and that row then keeps its result, as it
  // does in a tab left open. One it had shown classified, its answer not saved, is
  // failed saying so once lost (failLost), not said not classified.
  showUnlisted(shown, readWhole, saved) {
    const el = this.newRow(shown.name || "upload");
    setState(el, "queued");
    const entry = { file: null, el, id: shown.id, storedRead: this.reads, unlisted: readWhole ? 1 : 0 };
    this.entries.push(entry);
    this.byId.set(shown.id, el);
    if (saved) {
      showItem(el, saved);
      return;
    }
    if (shown.done) entry.classified = true;
    if (shown.lost) {
      entry.notInPlace = true;
      this.failLost([entry]);
    }
  }

  // A file chosen in this tab (or the one it was copied from) that the server did not
  // hold when the batch was restored; `stopped`: its upload was stopped by the user.
  showUnsent(name, why, token, stopped = false) {
    const entry = { file: null, el: this.newRow(name), unsent: true, unsentWhy: why, token };
    if (stopped) entry.failure = { stopped: true };
    this.entries.push(entry);
    this.showPendingRow(entry);
  }

  // A restored row the server does not hold: failed with its own reason if it has one.
  // Else, while another tab still sends the batch, shown being sent there, and while
  // this tab's own reload cut its upload off, shown waiting for the watch of the
  // restored batch: neither failed nor counted so (told to choose it again, a user would
  // send it twice, and the file then come). Failed as lost once that tab is done,
  // or the watch over. Its item takes the row if it comes (showNew).
  showPendingRow(entry) {
    const { el } = entry;
    const cutOffHere = !this.otherTabSends && !this.otherTabEnded && this.watchingForUnsent();
    if (!entry.unsentWhy && (this.otherTabSends || cutOffHere)) {
      setState(el, "uploading");
      el.querySelector(".state").textContent = cutOffHere ? CUT_OFF : "uploading in another tab";
      el.querySelector(".error").textContent = "";
    } else {
      const ended = this.otherTabGone ? NOT_STORED_SENDER_GONE : NOT_STORED_ELSEWHERE;
      const stopped = Boolean(entry.unsentWhy && entry.failure && entry.failure.stopped);
      showFailure(el, entry.unsentWhy || (this.otherTabEnded ? ended : NOT_STORED), stopped);
    }
  }

  showPending() {
    for (const entry of this.entries) if (entry.unsent && !entry.id) this.showPendingRow(entry);
    updateSummary();
  }

  watchingForUnsent() {
    return Date.now() < this.watchFrom + setting("unsentWatchMs");
  }

  askSender() {
    this.unansweredAsks += 1;
    tell({ ask: this.batchId });
  }

  // Resolves once another tab has said it sends this batch, or after ASK_WAIT_MS.
  async senderAnswer() {
    const until = Date.now() + ASK_WAIT_MS;
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
    // no file the server holds is shown failed, even for a poll.
    if (this.built && !refreshed) await this.refresh();
    this.showPending();
    if (this.built && !this.pollTimer) this.poll();
  }

  unfinished() {
    return this.entries.some(({ el }) => !FINISHED.has(el.dataset.state));
  }

  async refresh() {
    this.reads += 1;
    const read = this.reads;
    const { body, unknown } = await fetchBatch(this.batchId);
    this.unknown = unknown;
    if (body) this.held = true;
    this.unknownInARow = unknown ? this.unknownInARow + 1 : 0;
    if (this.confirmedLost()) this.lose();
    // Given up, and now held again: made anew by a file stored in it elsewhere (another
    // tab's upload, a script), whose rows (a restored batch adopts those it showed not
    // stored) would else stay "queued" with nothing following them. Not by a read begun
    // before the batch was given up, which may have been answered before it was lost.
    const remade = Boolean(body) && this.lost && read > this.lostRead;
    if (remade) this.heldAgain();
    try {
      // A file of it is stored: a reload that finds no such batch now finds it expired.
      if (body.items.length) setUnconfirmed(this.batchId, false);
      body.items.forEach((item) => this.apply(item));
    } catch { /* no answer in time, or no such batch (yet): the next event or poll fills the gap */ }
    if (body && Array.isArray(body.items)) this.loseUnlisted(body.items, read);
    if (remade && !this.stream && !this.pollTimer) {
      if (this.restored) this.poll();  // as restore follows it: no stream held
      else this.follow();
    }
  }

  // Whether the server has lost the batch: it held it, and now says it holds no such
  // batch, twice in a row. Once would do as far as the web tier goes: a batch it is
  // still rebuilding from S3 (after a restart that kept it) is answered once rebuilt,
  // the request waiting for it (rebuild.py find_batch), never 404, and S3 lists what it
  // was just given; so a 404 means S3 holds nothing of the batch. But giving up is for
  // good (its rows failed, the batch no longer followed), and a second look costs one
  // poll, 2 s: a 404 from a case not foreseen here, in a live batch, is then passed
  // over. Any other answer between the two (a 503, none at all) starts the count
  // again: a web tier that has lost the batch says so at each poll once it serves.
  confirmedLost() {
    return this.held && !this.lost && this.unknownInARow >= LOST_AFTER;
  }

  // The files this page heard stored that the server's batch, read whole (`items`, the
  // answer to read number `read`), leaves out, LOST_AFTER reads in a row: lost as a lost
  // batch's are (lose), though the batch is held again. The batch was lost and then made
  // anew under its id, before two reads could both say "no such batch", by a chunk of
  // the upload sent with create=1 (or a resend, or another tab's): the new batch lists
  // only the files stored since. Followed as it is, the files stored before would stay
  // "queued" for ever, and the batch be polled every 2 s. The batch itself goes on
  // being followed, for the files it holds.
  // A file the server holds cannot be left out of a read begun after its 202 came: one
  // web tier, in one process (gunicorn.conf.py stops at start otherwise), answers a
  // batch whole (no paging); a 202 names an item only once its image is in S3 and the
  // item in the process's book; the book forgets a batch only whole, all of it
  // finished, and reads it back from S3 whole (merged with what it holds meanwhile),
  // also after a restart that kept S3, the read waiting for that (rebuild.py
  // find_batch). Left out, its image is gone from S3: storage reset, or expired. A
  // read begun before the 202 (a poll crossing the upload) may well leave it out: not
  // counted. Two reads, as for a 404, for a case not foreseen here: the second costs
  // one poll, 2 s, and giving a file up is for good.
  loseUnlisted(items, read) {
    const listed = new Set(items.map((item) => item.id));
    const gone = [];
    let unsure = false;
    for (const entry of this.entries) {
      if (!entry.id || read <= (entry.storedRead || 0)) continue;
      if (listed.has(entry.id)) {
        entry.unlisted = 0;
        continue;
      }
      entry.unlisted = (entry.unlisted || 0) + 1;
      if (entry.unlisted >= LOST_AFTER) gone.push(entry);
      else if (!FINISHED.has(entry.el.dataset.state)) unsure = true;
    }
    // Followed by its event stream, the batch is read only when the stream opens: the
    // second read is asked for here (polling asks it anyway). Not for a batch given up
    // (a read begun before, answered after): lose() has stopped its reads.
    if (unsure && !this.lost && !this.pollTimer && !this.confirmTimer) {
      this.confirmTimer = setTimeout(() => {
        this.confirmTimer = null;
        this.refresh();
      }, setting("pollEveryMs"));
    }
    if (!gone.length) return;
    // Failed in place by a worker (a dead letter), such a file can no longer be queued
    // again in place: sent again, it is uploaded anew (if this page holds it).
    for (const entry of gone) entry.notInPlace = true;
    const lost = gone.filter((entry) => !FINISHED.has(entry.el.dataset.state));
    if (!lost.length) return;  // finished before: their rows stand as they are
    this.failLost(lost);
    this.save();
    this.sayLost(lost, true);
  }

  // The server no longer holds the batch (restarted with its storage reset, as the
  // embedded AWS keeps nothing across a restart, or the batch expired): no answer will
  // come for its files still queued. Followed, the page would say them "queued" for
  // ever, and have the web tier list S3 for it every 2 s. They are failed, saying why
  // and what to do; those classified keep their results. Files this upload has still
  // to send are left to it: sent with create=1, they make the batch anew (heldAgain).
  // So are those another tab still sends (a restored batch, otherTabSends): this tab
  // cannot tell that tab will not send them, and goes on polling the batch while it
  // sends (poll), asking after it at each poll as before: its next chunk makes the
  // batch anew, which a poll finds (refresh); its end, or its silence, fails them as
  // any file that tab did not store (showPendingRow).
  lose() {
    this.lost = true;
    this.closeStream();
    if (!this.otherTabSends) {
      clearTimeout(this.pollTimer);
      this.pollTimer = null;
    }
    clearTimeout(this.confirmTimer);
    this.confirmTimer = null;
    this.lostRead = this.reads;
    const lost = this.entries.filter((entry) => !FINISHED.has(entry.el.dataset.state) &&
      (entry.id || !(this.uploading || this.otherTabSends)));
    this.failLost(lost);
    // The batch's dead letters can no longer be queued again in place: sent again, their
    // files are uploaded anew (if this page holds them).
    for (const entry of this.entries) if (entry.id) entry.notInPlace = true;
    this.save();
    this.sayLost(lost);
  }

  // Rows of files stored in a batch the server has lost (`lost`, unfinished): failed,
  // saying why and what to do, and offered again (again.js notWorthAgain) as new uploads.
  // A row classified whose answer a reload did not find kept (`classified`) is failed
  // too (done, it would have no answer to show), saying it was classified.
  failLost(lost) {
    for (const entry of lost) {
      entry.failure = { lost: true };
      showFailure(entry.el, entry.classified ? ANSWER_GONE
        : `${LOST}; ${entry.file ? "send it again" : "choose it again"}`);
      entry.el.dataset.lost = "true";
    }
  }

  // Said in the summary line, and once to screen readers (without the id's 32 digits):
  // what happened, which files it cost, and what to do for them. `remade`: the batch is
  // held again, without them (loseUnlisted). Said at each loss: one after the batch was
  // made anew is news. The summary line keeps one notice of the batch, as things stand
  // (lossText): a second would repeat the first's files.
  sayLost(lost, remade = false) {
    const spoken = `a batch on this page was ${remade ? "partly " : ""}lost: ${lossWhat(remade)}` +
      lostFilesText(lost);
    if (this.lossNoticed) {
      sayOnce(spoken);
    } else {
      this.lossNoticed = true;
      addNotice(() => this.lossText(), spoken);
    }
  }

  // The summary line's notice of the batch's loss, as things stand, not as they were
  // when it was said. Made anew (a send again, the upload's files still to send,
  // another tab), the batch is held: "the server no longer holds it" would be false,
  // and "Send again below" would point to a button gone once its files are all sent
  // again. So it says the batch lost the files it still shows lost, if any, and else
  // nothing: their rows, classified, are the news, and each says it was sent again.
  lossText() {
    const lost = this.entries.filter(({ el }) => "lost" in el.dataset && el.dataset.state === "failed");
    if (!this.lost && !lost.length) return "";
    return `batch ${this.batchId}: ${lossWhat(!this.lost)}${lostFilesText(lost)}`;
  }

  // A file of it stored again (by this upload, with create=1, or elsewhere: refresh):
  // the batch exists again, and is followed for the files just stored.
  heldAgain() {
    this.held = true;
    this.lost = false;
    this.unknownInARow = 0;
    if (this.lossNoticed) updateSummary();  // no longer "the server no longer holds it" (lossText)
  }

  follow() {
    if (this.lost) return;  // its files are shown lost: nothing more will come
    // A hidden tab holds no stream (hide, below): it polls until it is shown again.
    if (document.visibilityState === "hidden") this.pollingHidden = true;
    if (!window.EventSource || this.sseErrors >= SSE_GIVE_UP || page.openStreams >= MAX_STREAMS ||
        this.pollingHidden) {
      this.poll();
      return;
    }
    // After the last event seen, if any: each stream opened after an `end` (more chunks
    // joining the batch) would be sent every finished item of the whole batch again.
    const after = this.lastEventId ? `?after=${encodeURIComponent(this.lastEventId)}` : "";
    const stream = new EventSource(`/api/jobs/${this.batchId}/events${after}`);
    this.stream = stream;
    this.pollingIdle = false;
    page.openStreams += 1;
    let reconnecting = false;
    // A stream that brings nothing for streamIdleMs (workers starting, a backlog) gives
    // its connection back: the batch is polled instead until done, its first poll at once.
    // Held while nothing comes, the streams of a few tabs (or windows side by side)
    // took all six of the browser's connections to the server: another tab could not
    // load the page, and every request of these waited.
    const idle = () => {
      clearTimeout(this.streamIdleTimer);
      this.streamIdleTimer = setTimeout(() => {
        if (this.stream !== stream) return;
        this.closeStream();
        this.pollingIdle = true;
        this.poll();
      }, setting("streamIdleMs"));
    };
    idle();
    stream.onopen = () => {
      idle();
      // Whatever finished while we were away: fetch it once.
      if (reconnecting) this.refresh();
      reconnecting = false;
    };
    const applyEvent = (event) => {
      idle();
      this.sseErrors = 0;
      if (event.lastEventId) this.lastEventId = event.lastEventId;
      try { this.apply(JSON.parse(event.data)); } catch { /* ignore a damaged event */ }
    };
    stream.onmessage = applyEvent;  // an item finished
    stream.addEventListener("queued", applyEvent);  // an item queued again (send again)
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

  // The tab shown again (catchup.js): a batch no longer followed, its files all done,
  // heard nothing since its stream ended, though it may have changed (a failed file
  // queued again by another tab or a script, a late answer replacing a failure): a
  // reload alone would show that. Followed again from its last event (a restored batch
  // polled, as restore follows it); one still followed, or being sent, is left be.
  catchUp() {
    if (this.stream || this.pollTimer || this.uploading || this.lost) return;
    if (this.restored ? !this.built : !this.created) return;  // no batch shown to follow
    if (this.restored) this.poll();
    else this.follow();
  }

  closeStream() {
    clearTimeout(this.streamIdleTimer);
    if (!this.stream) return;
    this.stream.close();
    this.stream = null;
    page.openStreams -= 1;
  }

  // The tab hidden (catchup.js): its stream closed, and the batch polled instead, at
  // hiddenPollEveryMs, the first poll at once (what finished since the stream's last
  // event). Each stream holds one of the browser's six connections to the server until
  // its batch is done: three tabs of two uploads each waiting on a cold start held all
  // six, and a fourth tab could not load the page, nor a new upload of the first start.
  hide() {
    if (this.stream) {
      this.closeStream();
      this.pollingHidden = true;
      this.poll();
    } else if (this.pollTimer && this.pollingIdle) {
      // Polled already for a stream that brought nothing: at the hidden rate too. (Not
      // a batch another tab sends: its polls ask that tab whether it is still there.)
      this.pollingHidden = true;
    }
  }

  // The tab shown again: a batch polled because hidden is followed by its stream again,
  // from its last event (the server sends all that finished since), and read once more
  // as it opens: nothing is missed between the last poll and the stream. Not one done
  // meanwhile, no longer polled.
  show() {
    if (!this.pollingHidden) return;
    this.pollingHidden = false;
    if (!this.pollTimer) return;
    clearTimeout(this.pollTimer);
    this.pollTimer = null;  // a poll under way stops at its answer (poll's tick)
    this.follow();
    this.refresh();
  }

  finishedCount() {
    return this.entries.filter(({ el }) => FINISHED.has(el.dataset.state)).length;
  }

  poll() {
    if (this.pollTimer || (this.lost && !this.otherTabSends)) return;  // given up (see lose)
    // The next poll pollEveryMs after this one answers, not every pollEveryMs: a batch
    // rebuilt from S3 after a restart can take many seconds to answer.
    const tick = async () => {
      const mine = this.pollTimer;
      const finishedBefore = this.finishedCount();
      try {
        await this.refresh();
      } catch (error) {
        // A fault of this page's in one read must not end the batch's polls for good.
        console.error("a read of the batch failed:", error);
      }
      // lose() has stopped it; or, since, the batch held again, a poll started anew (refresh).
      if (this.pollTimer !== mine) return;
      // Polled since its stream brought nothing, and results come again: followed by a
      // stream again. Each poll reads the whole batch, every pollEveryMs until it is done.
      if (this.pollingIdle && this.finishedCount() > finishedBefore && !this.pollingHidden &&
          this.unfinished()) {
        this.pollingIdle = false;
        this.pollTimer = null;
        this.follow();
        return;
      }
      // Some asks in a row unanswered: the sending tab was closed or reloaded, or is
      // frozen (if it answers again, senderAnswered brings its rows back).
      if (this.otherTabSends && this.unansweredAsks >= SILENT_ASKS) this.senderDone(true, true);
      // Given up, and polled on only while another tab sent it (lose): that tab is done.
      if (this.lost && !this.otherTabSends) {
        this.pollTimer = null;
        return;
      }
      if (this.restored) this.askSender();
      // A while after a restore (a chunk received whole before the reload, for an
      // unsent row) and after the sending tab ended (its last chunks).
      const watchOver = !this.watchingForUnsent();
      const watched = !watchOver && (this.otherTabEnded || this.entries.some((entry) => entry.unsent));
      // The watch over: rows this tab's reload cut off, still waiting, are lost.
      const waiting = (entry) => entry.unsent && !entry.id && !FINISHED.has(entry.el.dataset.state);
      if (watchOver && !this.otherTabSends && this.entries.some(waiting)) this.showPending();
      const growing = Date.now() < this.grewAt + setting("followIdleMs");
      const watching = this.uploading || this.unfinished() || this.otherTabSends || watched || growing;
      const every = setting(this.pollingHidden ? "hiddenPollEveryMs" : "pollEveryMs");
      this.pollTimer = watching ? setTimeout(tick, every) : null;
      if (!watching && this.restored && this.unknown) {
        // Still no such batch once the watch is over: nothing of it will come now, and
        // each reload would show its files "not stored" again, for good. Their rows stay
        // for this page view.
        setUnconfirmed(this.batchId, false);
        forgetBatch(this.batchId);
      }
    };
    this.pollTimer = setTimeout(tick, 0);
  }
}

// Whether POST /api/jobs's answer (`status`, `body` null if not JSON) is not the web
// tier's but a proxy's in its place, which may have passed the request on: a 502 or
// 504 (the web tier too slow for the proxy's timeout, or a kept connection it had just
// closed: README's AWS notes), or any 5xx not in JSON. The files may be stored, or be
// being stored: an answer lost. Refused for good on a first send, the files would fail
// though stored, the server's items never be shown, and a reload show each twice.
function answerLost(status, body) {
  return status === 502 || status === 504 || (status >= 500 && !body);
}

function answerLostText(status) {
  return `upload failed: HTTP ${status} came in place of the server's answer (it may have stored the file: ` +
    "reload to see)";
}

// What a loss of the batch was: all of it (`remade` false), or the files stored in it
// before the batch was made anew.
function lossWhat(remade) {
  return remade
    ? `the server lost the files stored in it earlier (${LOSS_WHY}) and holds only those sent since`
    : `the server no longer holds it (${LOSS_WHY})`;
}

// The files a lost batch took with it (`failed`, their rows failed), and the way
// forward: "Send again" for those whose File this page holds (an upload of this page
// view), else choosing them again (a reloaded page holds none). Those classified whose
// answer went with it (a reload did not find it kept: failLost) are said apart: "not
// yet classified" would be false of them.
function lostFilesText(failed) {
  const lost = failed.filter((entry) => !entry.classified);
  const answersGone = answersGoneText(failed.length - lost.length);
  if (!lost.length) return answersGone && `, and ${answersGone}`;
  const them = lost.length === 1 ? "it" : "them";
  const held = lost.filter((entry) => entry.file).length;
  const next = held === lost.length ? `"Send again" below sends ${them} again`
    : !held ? `choose ${them} again to have ${them} classified`
      : `"Send again" below sends the ${held} this page still holds; choose the others again`;
  return `, and ${someFiles(lost.length)} of it not yet classified will not be: ${next}` +
    (answersGone && `; ${answersGone}`);
}

function answersGoneText(count) {
  if (!count) return "";
  return count === 1
    ? "the answer of 1 file of it classified is gone (this tab did not keep it): choose the file again " +
      "to see it"
    : `the answers of ${count} files of it classified are gone (this tab did not keep them): choose the ` +
      "files again to see them";
}

// A new upload of the files `chosen` ([{file, path}]), as one batch.
export function upload(chosen) {
  if (!chosen.length) return;
  uploadBegins();
  // "Show only the failed files" left ticked would hide the new upload's rows, none
  // failed yet: the files chosen would seem not to be there.
  $("only-failed").checked = false;
  // Said at once: the first count comes a period later (15 s), and screen readers would
  // hear nothing of the files just chosen till then.
  sayNext(`Sending ${someFiles(chosen.length)}`);
  const session = new Session(chosen);
  page.sessions.push(session);
  updateSummary();
  session.run();
}
