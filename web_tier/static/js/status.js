// The status line at the top: the queue, the instances and this web tier's counts,
// from GET /api/status every statusEveryMs (settings.js).
import { $, banner, keyBox } from "./dom.js";
import { timeoutSignal } from "./http.js";
import { errorKind, requestUnanswered, serverAnswered, serverSilent } from "./reach.js";
import { setting } from "./settings.js";

// A hung server (stopped, restarting) never answers: the line keeps its old figures
// as if current, and a new request every 2 s would pile up behind the first.
let statusAsking = false;
let statusAnsweredAt = null;
async function refreshStatus() {
  if (statusAsking) return;
  statusAsking = true;
  const line = $("status-line");
  try {
    let response;
    try {
      response = await fetch("/api/status", { cache: "no-store", signal: timeoutSignal(setting("statusTimeoutMs")) });
    } catch (error) {
      noAnswer(line, error);
      return;
    }
    // A proxy's 502 or 504 in the server's place: the web tier behind it is not answering.
    if (response.status === 502 || response.status === 504) serverSilent("unreachable");
    else serverAnswered();
    const s = await response.json();
    statusAnsweredAt = new Date();
    if (s.api_key_required) keyBox.hidden = false;
    if (s.untrained) banner.hidden = false;
    const parts = [];
    const starting = startingWorkers(s);
    if (starting) parts.push(starting);
    if (s.queue) parts.push(`queue: ${s.queue.visible} waiting, ${s.queue.in_flight} in progress`);
    if (s.instances_total !== null && s.instances_total !== undefined) {
      const i = s.instances || {};
      // Running is not serving yet (a worker starting): a line saying "1 running, 0
      // starting" while nothing is answered looks stuck.
      const serving = typeof s.workers_serving === "number" && s.workers_serving < (i.running || 0)
        ? ` (${s.workers_serving} of them serving)` : "";
      parts.push(`instances: ${i.running || 0} running${serving}, ${i.pending || 0} starting, ` +
                 `${(i.stopping || 0) + (i["shutting-down"] || 0)} stopping` +
                 (s.workers_failed ? `, ${s.workers_failed} whose worker failed` : ""));
    }
    if (s.totals) {
      // This web tier process's counts: a restarted one starts again from zero.
      const since = s.totals_since ? ` since ${new Date(s.totals_since * 1000).toLocaleTimeString()}` : "";
      // Failed after upload (by a worker, or every attempt lost): refused uploads are
      // not counted, and a batch's own summary counts them too.
      parts.push(`answered here${since}: ${s.totals.answered}, failed after upload: ${s.totals.failed}`);
    }
    // What could not be read, or how old the figures are while AWS does not answer.
    if (Array.isArray(s.errors)) parts.push(...s.errors.map(String));
    line.textContent = parts.join(" · ") || "status unavailable";
  } catch (error) {
    // Its body stalled past the timeout; or answered, but not with figures (a proxy's
    // page, a body cut off).
    if (errorKind(error) === "timeout") noAnswer(line, error);
    else line.textContent = "status unavailable: the server's answer could not be read";
  } finally {
    statusAsking = false;
  }
}

// No answer came (`error`, as fetch threw it). Said as it is: a request this page gave up
// waiting for may never have reached the server, held in this browser for one of its six
// connections to it (event streams of other tabs take them: curl got its answer in 17 ms
// while three tabs' lines said "the server has not answered"); one the browser could not
// send at all found no server.
function noAnswer(line, error) {
  const kind = errorKind(error);
  requestUnanswered(kind);
  const last = statusAnsweredAt ? ` (last figures at ${statusAnsweredAt.toLocaleTimeString()})` : "";
  line.textContent = kind === "timeout"
    ? `status unavailable: no answer yet${last}; the server may be busy, or this browser's connections to it ` +
      "all taken (by other tabs of this page?)"
    : `status unavailable: the server could not be reached${last}`;
}

// What a person waiting on a cold start needs said plainly, before the figures: every
// row says "queued", and nothing else says whether a worker is there. Nothing
// when workers serve, or when the server cannot tell (an AMI whose workers say nothing).
// With no instance, only that none runs: whether one is on its way is the controller's
// to say, which may not run, or may be capped at none (--max-instances 0).
function startingWorkers(s) {
  const queued = s.queue ? s.queue.visible + s.queue.in_flight : 0;
  if (!queued || s.instances_total === null || s.instances_total === undefined) return "";
  const i = s.instances || {};
  if (!s.instances_total) return "waiting for a worker: none is running yet";
  const live = (i.running || 0) + (i.pending || 0);
  return live && s.workers_serving === 0 ? "workers are starting: queued images wait for the first" : "";
}

// Asked at once, then every statusEveryMs, whether the last asked has answered or not
// (refreshStatus asks once at a time). The period read at each ask: a test may change it.
export function startStatus() {
  const tick = () => {
    refreshStatus();
    setTimeout(tick, setting("statusEveryMs"));
  };
  tick();
}
