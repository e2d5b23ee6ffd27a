// Whether the server answers: a page-level notice in the summary line, said once to
// screen readers, while the page's requests (the status line's, uploads, reads of a
// batch) get no answer. The status line alone said so, in the header, unheard: with
// the server stopped mid-batch, rows stayed "uploading" for 76 s under "0 of 5
// classified", then all failed, and files waiting to be sent again were resent in silence.
import { sayOnce } from "./announce.js";
import { updateSummary } from "./refresh.js";
import { page, sendingSessions } from "./state.js";

// The outage under way, or null: {kind, since, failed, readsAnswered}. `failed`: the
// sources of the requests that got no answer in it, "upload" or "read" (the status line's
// and a batch's reads), those whose answer ends it; `readsAnswered`: reads were answered
// in it, none failing (only the uploads fail: a proxy's 502 for them). `kind`:
// "unreachable" (the browser could not reach the server: a refused or cut
// connection), "timeout" (no answer within this
// page's time: the server busy or hung, or the request still waiting in this browser
// for one of its six connections to the server, which other tabs may hold), "busy" (the
// web tier refused an upload whole with a 503: stopping, or AWS failing it).
let outage = null;
let noticed = false;  // the notice is in page.notices (once for the page view)

const HEADS = {
  unreachable: "The server cannot be reached",
  // Where it answers the reads: "cannot be reached" is false, and would send a user to
  // look for a server down rather than at what stands between the uploads and it.
  uploadsUnreachable: "Uploads cannot reach the server, though it answers this page's other requests",
  timeout: "No answer from the server in time",
  busy: "The server is refusing uploads for now (HTTP 503: stopping, or AWS failing)",
};
// What a timeout may be, said honestly: not "the server has not answered", which a
// request held in this browser for a free connection has not even been sent to.
const TIMEOUT_WHY = "it may be busy, or this browser's connections to it all taken (by other tabs of this page?)";
const UPLOADS_WHY = "a proxy in front of it, or the network, may be failing them";

// A request got no answer: `error` as a fetch throws it (an abort of this page's own
// timer is a timeout, anything else the server unreachable), or `kind` as above;
// `source` as above.
export function serverSilent(kindOrError, source = "read") {
  const kind = typeof kindOrError === "string" ? kindOrError : errorKind(kindOrError);
  const starting = !outage;
  if (starting) outage = { kind, since: new Date(), failed: new Set() };
  else outage.kind = kind;
  outage.failed.add(source);
  if (!noticed) {
    noticed = true;
    page.notices.push(outageText);
  }
  if (starting) sayOnce(outageText());  // once an outage: the summary line keeps it
  else updateSummary();
}

// A request that got no answer (as serverSilent), unless the page is being left: its
// requests are cut off then, and shown again from the back/forward cache it would say
// the server silent.
export function requestUnanswered(kindOrError, source = "read") {
  if (!page.leaving) serverSilent(kindOrError, source);
}

// A request of `source` was answered: the outage, if any, is over (said once too), if
// requests of that source had failed in it. Uploads refused 503 while S3 fails, timing
// out on a slow link, or answered 502 by a proxy, beside a status line answered every
// 2 s, had the notice come and go, heard at each change (25 times in 26 s). Once no
// upload goes on, none will answer: an upload's outage is then ended by the reads'
// answers too, or it stayed for good beside the status line's live figures.
export function serverAnswered(source = "read") {
  if (!outage) return;
  if (!outage.failed.has(source) && sendingSessions().length) {
    if (source === "read" && !outage.readsAnswered) {
      outage.readsAnswered = true;
      updateSummary();
    }
    return;
  }
  outage = null;
  sayOnce("The server answers again");
}

export function errorKind(error) {
  return error && (error.name === "TimeoutError" || error.name === "AbortError") ? "timeout" : "unreachable";
}

// The summary line's notice, as things stand ("" with no outage): what is safe, and
// what the page does meanwhile.
function outageText() {
  if (!outage) return "";
  const since = outage.since.toLocaleTimeString();
  const uploadsOnly = outage.readsAnswered && !outage.failed.has("read");
  const kind = outage.kind === "unreachable" && uploadsOnly ? "uploadsUnreachable" : outage.kind;
  const head = kind === "timeout" ? `${HEADS.timeout} (since ${since}: ${TIMEOUT_WHY})`
    : kind === "uploadsUnreachable" ? `${HEADS[kind]} (since ${since}: ${UPLOADS_WHY})`
      : `${HEADS[kind]} (since ${since})`;
  const sending = sendingSessions();
  const parts = [];
  if (sending.some((session) => session.created)) parts.push("the files it has stored are safe");
  const next = Math.min(...sending.map((session) => session.nextResendAt()));
  if (Number.isFinite(next)) {
    parts.push(`the others are tried again (next try at ${new Date(next).toLocaleTimeString()})`);
  } else if (sending.some((session) => session.queue.length || session.inHand.size)) {
    parts.push("the others are still being sent");
  } else if (page.sessions.some((session) => session.unfinished())) {
    parts.push("results show here once it answers again");
  }
  return parts.length ? `${head}: ${parts.join("; ")}` : head;
}
