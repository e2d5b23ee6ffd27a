// The page's settings, in one table: each a <body data-*> attribute (camelCased here),
// with the value used where the attribute is absent. The server sets the limits it
// enforces (index.html); the browser tests set the others to shorten a wait.
// Read at each use, not once at load: the browser tests change some of them while the
// page runs (a chunk size, a timeout), and the page has always taken the change.
const FROM_BODY = {
  // Files per POST /api/jobs: 20, or fewer if the server takes fewer (MAX_FILES_PER_REQUEST).
  filesPerRequest: 20,
  // The server refuses a file over MAX_UPLOAD_BYTES, and a request over its body limit
  // whole: such files are refused here, unsent, and chunks kept under the limit.
  maxFileBytes: Infinity,
  maxChunkBytes: Infinity,
  // The latest batches kept in the address, which a reload shows again (fewer in tests).
  maxBatchesInUrl: 20,
  // The answers of classified files the tab keeps for a reload that finds their batch
  // lost (batches.js saveResults): ~2 MB of the ~5 MB of sessionStorage (fewer in tests).
  savedResults: 10000,
  // A poll given up on, so that the next one is asked (a batch rebuilt from S3 after a
  // restart answers in seconds: 17 s for 1,500 items).
  pollTimeoutMs: 60000,
  // How long a restored batch with files not heard stored is still watched for them: a
  // chunk the server had received whole may join the batch after the reload.
  unsentWatchMs: 30000,
  // How long a batch opened from its link (not sent from this tab, nor one it copied)
  // is followed after it last showed a file new here: another browser may still be
  // sending it, and all it held may finish before its next chunk comes (the link
  // would stop showing files once those it knew of were done). Longer than the sender's
  // resends of a refused chunk take (RESEND_DELAYS_MS: 75 s in all), with a chunk's own
  // upload time besides.
  followIdleMs: 120000,
  // Multiplies RESEND_DELAYS_MS: "0.05" in the browser tests, whose failures are faked
  // and need no time to pass.
  resendDelayScale: 1,
  // A send that has stopped (a connection stalled or left half open, a web machine lost)
  // must not hold an upload for ever: it is given up on, and the chunk sent again (its
  // tokens make that safe), once its upload has made no progress for stallTimeoutMs,
  // or no answer has come answerTimeoutMs after its last byte went. Not on total time:
  // 30 s plus the bytes at 50 KB/s would cut off every chunk but the first at 100 KB/s
  // (three sharing the link), and send each four times more: 60 files in 100 failed.
  stallTimeoutMs: 30000,
  answerTimeoutMs: 30000,
  // Until its first byte goes, a request may be held by the browser for a connection
  // to the server (six per host, shared with event streams, polls and other tabs):
  // no stall, yet cut off after 30 s and sent again, a chunk could use all its resends
  // so. It is given far longer to start.
  firstProgressTimeoutMs: 120000,
  // How often a tab in front, showing a failed file of a batch it no longer follows,
  // looks at that batch again (catchup.js).
  catchUpMs: 60000,
  // How often the count is said to screen readers while it changes (announce.js).
  announceEveryMs: 15000,
  // How often a batch not followed by its event stream is polled, counted from the last
  // poll's answer (session.js), and a second read asked for to confirm files left out of
  // one (loseUnlisted).
  pollEveryMs: 2000,
  // How often a batch is polled in place of its event stream while the tab is hidden
  // (session.js hide): a hidden tab holds none of the browser's connections to the server.
  hiddenPollEveryMs: 5000,
  // How long an event stream that brings nothing is kept open: then its batch is polled
  // until done (session.js follow), its connection given back.
  streamIdleMs: 30000,
  // How often the status line asks GET /api/status (status.js).
  statusEveryMs: 2000,
  // Beyond the 10 s a web tier's first read of AWS may take.
  statusTimeoutMs: 12000,
};

// The setting `name` (a key of FROM_BODY), a number.
export function setting(name) {
  if (!(name in FROM_BODY)) throw new Error(`no such page setting: ${name}`);
  return Number(document.body.dataset[name]) || FROM_BODY[name];
}

// Why a file over maxFileBytes is refused unsent: the server's own words (data-too-large).
export function tooLargeText() {
  return document.body.dataset.tooLarge || "file is too large";
}

// Upload requests in flight at once, across all the page's uploads.
export const PARALLEL_CHUNKS = 3;
// A file refused with 503 was not stored (a web tier stopping, S3 or SQS failing):
// sent again after 5, 10, 20 and 40 s, the web tier back by then.
export const RESEND_DELAYS_MS = [5000, 10000, 20000, 40000];

// The delay before the given resend.
export function resendDelayMs(attempt) {
  return RESEND_DELAYS_MS[attempt] * setting("resendDelayScale");
}
