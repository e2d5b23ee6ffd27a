// The page's requests to the server: uploads (POST /api/jobs, with timeouts of their
// own and a limit on how many go at once) and reading a batch.
import { requestUnanswered, serverAnswered, serverSilent } from "./reach.js";
import { PARALLEL_CHUNKS, setting } from "./settings.js";
import { page } from "./state.js";
import { updateSummary } from "./refresh.js";

// A signal that aborts a fetch after `ms`: AbortSignal.timeout's, made by hand where an
// older browser lacks it (without one, a request to a hung server never ends).
export function timeoutSignal(ms) {
  if (AbortSignal.timeout) return AbortSignal.timeout(ms);
  const abort = new AbortController();
  setTimeout(() => abort.abort(), ms);
  return abort.signal;
}

const seconds = (ms) => Math.round(ms / 1000);

// Why a send failed: `timedOut`, what this page gave up waiting for ("" if the
// browser could not send it or get its answer: no server, a connection cut).
// `sentBytes`: how far its upload had got; `settle()` as post()'s (see there).
export class SendFailure extends Error {
  constructor(timedOut, sentBytes, settle) {
    super(timedOut || "network error");
    this.timedOut = timedOut;
    this.sentBytes = sentBytes;
    this.settle = settle;
  }
}

// Whether POST /api/jobs's answer `body` refused the whole request: neither a file
// stored nor one refused on its own. Every error answer of it lists both, empty then.
export function refusedWhole(body) {
  return !body || !Array.isArray(body.items) || (!body.items.length && !(body.rejected || []).length);
}

// POST `form`, holding `bytes` of files, to /api/jobs: {status, body, settle} (body
// null if not JSON), or throws a SendFailure. By XMLHttpRequest, not fetch: only it
// tells how far the upload has got (page.sendProgress). `settle()` drops the request
// from sendingText once its caller has counted the bytes it sent: dropped first, the MB
// sent would go backwards for a moment at each answer and at each failure.
export function post(form, headers, bytes) {
  const { sendProgress, awaitingAnswer } = page;
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    let timer = null, timedOut = "";
    const giveUpIn = (ms, why) => {
      clearTimeout(timer);
      timer = setTimeout(() => { timedOut = why; xhr.abort(); }, ms);
    };
    const stalled = () => giveUpIn(setting("stallTimeoutMs"),
      `upload timed out: no progress for ${seconds(setting("stallTimeoutMs"))} s (slow or broken connection?)`);
    const started = (event) => { if (event.loaded > 0) stalled(); };
    const progressed = (event) => {
      started(event);
      if (event.lengthComputable && event.total) {
        sendProgress.set(xhr, bytes * event.loaded / event.total);
        updateSummary();
      }
    };
    const settled = () => {
      awaitingAnswer.delete(xhr);
      if (sendProgress.delete(xhr)) updateSummary();
    };
    const fail = () => {
      clearTimeout(timer);
      reject(new SendFailure(timedOut, sendProgress.get(xhr) || 0, settled));
    };
    xhr.open("POST", "/api/jobs");
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = progressed;
    xhr.upload.onload = () => {
      awaitingAnswer.add(xhr);
      updateSummary();
      giveUpIn(setting("answerTimeoutMs"),
        `upload timed out: no answer ${seconds(setting("answerTimeoutMs"))} s after it was sent ` +
        "(server busy or unreachable?)");
    };
    xhr.onload = () => {
      clearTimeout(timer);
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // A 2xx whose body is cut off is an answer lost (the files may be stored),
        // not a refusal.
        if (xhr.status >= 200 && xhr.status < 300) { fail(); return; }
      }
      resolve({ status: xhr.status, body, settle: settled });
    };
    xhr.onerror = fail;
    xhr.onabort = fail;  // by this page's timer, or the page being left
    giveUpIn(setting("firstProgressTimeoutMs"),
      `upload timed out: nothing sent in ${seconds(setting("firstProgressTimeoutMs"))} s ` +
      "(slow or broken connection?)");
    xhr.send(form);
  });
}

// Upload requests in flight on the page, across all its uploads: PARALLEL_CHUNKS at
// most. Not per upload: three would ask for 9 of the browser's 6 connections to
// the server, and those it held back would be cut off as stalled.
let sendsInFlight = 0;
const sendsWaiting = [];  // each send waiting for a place: its resolve, first come first served
export async function takeSendPlace() {
  if (sendsInFlight < PARALLEL_CHUNKS) sendsInFlight += 1;
  else await new Promise((resolve) => sendsWaiting.push(resolve));
}
export function freeSendPlace() {
  const next = sendsWaiting.shift();
  if (next) next();  // the place passes to it
  else sendsInFlight -= 1;
}

// A batch as the server has it now: {body, unknown}; body null if no answer came in
// time (pollTimeoutMs). `unknown`: the web tier's own word that it holds no such batch
// (404 `unknown_batch`), not any 404: a proxy's in its place (a route or a machine
// missing for a moment) says nothing of the batch, and a page that took it so would
// give up a batch the server still holds.
// No answer is "nothing new" to the caller, but said on the page (reach.js): the rows
// would else wait on in silence.
export async function fetchBatch(batchId) {
  try {
    const signal = timeoutSignal(setting("pollTimeoutMs"));
    const response = await fetch(`/api/jobs/${batchId}`, { cache: "no-store", signal });
    // A proxy's 502 or 504 in the server's place: the web tier behind it is not answering.
    if (response.status === 502 || response.status === 504) serverSilent("unreachable");
    else serverAnswered();
    if (response.ok) return { body: await response.json(), unknown: false };
    return { body: null, unknown: response.status === 404 && (await errorCode(response)) === "unknown_batch" };
  } catch (error) {
    if (!(error instanceof SyntaxError)) requestUnanswered(error);  // not an answer not in JSON
    return { body: null, unknown: false };
  }
}

// The `code` of an error answer in JSON; "" for one not in JSON (a proxy's page).
async function errorCode(response) {
  try {
    const body = await response.json();
    return (body && body.code) || "";
  } catch {
    return "";
  }
}

// Asks the server to queue a dead letter again in place (POST /api/jobs/<batch>/items/
// <item>/again): {status, body}; status 0 and body null if no answer came in time.
export async function sendItemAgain(batchId, itemId, headers) {
  try {
    const signal = timeoutSignal(setting("pollTimeoutMs"));
    const response = await fetch(`/api/jobs/${batchId}/items/${itemId}/again`,
                                 { method: "POST", headers, cache: "no-store", signal });
    let body = null;
    try { body = await response.json(); } catch { /* not JSON: a proxy's page */ }
    return { status: response.status, body };
  } catch {
    return { status: 0, body: null };
  }
}
