// What the page's modules share and change, in one object: the uploads and restored
// batches shown, and what the summary line says of them. Anything else a module keeps
// is its own.
export const page = {
  sessions: [],       // each upload of this page view, and each batch restored from the address
  // Said in the summary line, e.g. a batch that could not be loaded: each a text, or a
  // function giving it as things stand (announce.js addNotice).
  notices: [],
  // What the last upload's folders held that was not sent (or that they are still being
  // read): replaced at each upload, or they would pile up across uploads.
  folderNotices: [],
  leaving: false,     // the page is being unloaded: its uploads are cut off, not refused
  openStreams: 0,     // event streams open, MAX_STREAMS at most (session.js follow)
  // How far the upload requests under way have got, by request: the bytes of its files
  // sent so far (its share of the form's). On a slow link the page would say "0 of 24
  // classified" for 75 s, no sign of progress.
  sendProgress: new Map(),
  // Of those, the requests sent whole whose answer has not come: the server is storing
  // their files (a chunk of 1,000 takes it ~30 s), which "sending 0.1 of 0.1 MB" hid.
  awaitingAnswer: new Set(),
  // The uploads counted in the MB sent (summary.js sendingText).
  sendingNow: new Set(),
  // The first row failed since the latest upload began (rows.js showFailure), which
  // screen readers hear named (announce.js). The last failed row in the page's order
  // was named: after a "send again", whose rows keep their places, an old failure.
  firstFailure: null,
};

// The uploads of this page view still sending (not stopped by the user).
export function sendingSessions() {
  return page.sessions.filter((session) => session.uploading && !session.stopped);
}
