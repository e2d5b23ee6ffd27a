// Other tabs of this page, over a BroadcastChannel.
import { page } from "./state.js";

// A duplicated tab (or one opened from this one) starts with a copy of this tab's
// sessionStorage, and restores the batches this tab is still sending: their files not
// yet stored would be shown failed "not stored... choose it again", and the batch no
// longer followed, while this tab goes on sending them. So tabs say here
// which batches they are sending: asked {ask: id}, a tab sending it answers {sending:
// id}; it says {done: id} once its sends end. Without BroadcastChannel, a tab knows
// only of its own sends (a restored batch's unstored files are then said lost).
const channel = window.BroadcastChannel ? new BroadcastChannel("imgclass.uploads") : null;
const ASK_MS = 250;  // how long a restore may wait for an answer (tabs answer in milliseconds)
// ...where another tab can answer at all.
export const ASK_WAIT_MS = channel ? ASK_MS : 0;
export const SILENT_ASKS = 3;  // asks, one a poll, a sending tab leaves unanswered before it is taken for gone
export function tell(message) {
  if (channel) channel.postMessage(message);
}
// Answers the asks of other tabs, and tells restored batches what their senders say.
export function wireTabs() {
  if (!channel) return;
  channel.onmessage = ({ data }) => {
    if (!data) return;
    if (data.ask && page.sessions.some((s) => s.uploading && !s.restored && s.batchId === data.ask)) {
      tell({ sending: data.ask });
    }
    for (const session of page.sessions) {
      if (!session.restored) continue;
      if (session.batchId === data.sending) session.senderAnswered();
      if (session.batchId === data.done) session.senderDone();
    }
  };
}
