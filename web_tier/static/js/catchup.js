// A tab shown again: the batches it had stopped following (all their files done) are
// looked at again, for what changed while it was out of sight (session.js catchUp).
import { page } from "./state.js";

function catchUp() {
  for (const session of page.sessions) session.catchUp();
}

// Nothing while hidden: a tab left in the background opens no stream and sends no
// request; one brought back asks once for each batch it no longer follows.
export function wireCatchUp() {
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") catchUp();
  });
  // Back from the back/forward cache, where a browser may show it without a
  // visibilitychange; a session following again by then is left be.
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) catchUp();
  });
}
