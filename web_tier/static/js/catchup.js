// The batches a tab had stopped following (all their files done) are looked at again,
// for what changed since (session.js catchUp): a failed file queued again by another
// tab or a script, a late answer replacing a failure.
import { page } from "./state.js";
import { setting } from "./settings.js";

function catchUp(sessions = page.sessions) {
  for (const session of sessions) session.catchUp();
}

// Only a failed file the server holds can still change once its batch is done: one
// refused here, unsent, never will.
function showsAFailure(session) {
  return session.entries.some((entry) => entry.id && entry.el.dataset.state === "failed");
}

// The batches that can have changed, if the tab is shown: nothing while hidden.
function catchUpOnFailures() {
  if (document.visibilityState === "visible") catchUp(page.sessions.filter(showsAFailure));
}

// A tab kept in front hears no visibilitychange, and a script run from a terminal
// gives its window no focus back: while it shows such a failure it looks again now and
// then. Nothing while hidden (a background tab opens no stream, and polls only the
// batches it was following: session.js hide), and nothing for batches without a
// failure, which is almost all of them.
// Checked each second, so that a change of catchUpMs (the browser tests') is taken at once.
let lookedAt = Date.now();
function lookAgainNowAndThen() {
  if (Date.now() - lookedAt < setting("catchUpMs")) return;
  lookedAt = Date.now();
  catchUpOnFailures();
}

export function wireCatchUp() {
  // A tab hidden closes its event streams and polls instead (session.js hide); shown
  // again it opens them again, and asks once for each batch it no longer follows.
  document.addEventListener("visibilitychange", () => {
    const shown = document.visibilityState === "visible";
    for (const session of page.sessions) {
      if (shown) session.show();
      else session.hide();
    }
    if (shown) catchUp();
  });
  // Focus comes back often (each return from a file picker, say): only the batches
  // that can have changed. A tab brought to the front may get it before it is shown,
  // which then catches up on all (above): nothing while hidden.
  window.addEventListener("focus", catchUpOnFailures);
  // Back from the back/forward cache, where a browser may show it without a
  // visibilitychange; a session following again by then is left be.
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) catchUp();
  });
  setInterval(lookAgainNowAndThen, 1000);
}
