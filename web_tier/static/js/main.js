// The upload page: send images in chunks, then follow their results live. This module
// wires the others to the page, in the order the page needs them; each of them does
// nothing when imported.
// User data (file names, labels, errors) is only ever set with textContent.
import { wireSendAgain } from "./again.js";
import { tidyAddress } from "./batches.js";
import { wireCatchUp } from "./catchup.js";
import { wireCsvDownload } from "./csv.js";
import { wireKeyBox } from "./key.js";
import { wirePicker } from "./picker.js";
import { setSummaryRefresh } from "./refresh.js";
import { restoreFromAddress } from "./restore.js";
import { page } from "./state.js";
import { startStatus } from "./status.js";
import { refreshSummary, wireTools } from "./summary.js";
import { wireTabs } from "./tabs.js";

setSummaryRefresh(refreshSummary);

window.addEventListener("pagehide", () => {
  page.leaving = true;
  // A row classified just now is saved a moment later (Session.saveSoon): a reload then
  // would miss it.
  for (const session of page.sessions) session.savePending();
});
// Back in view from the back/forward cache: live again, its uploads go on (they
// were left "uploading" for good, none sent again).
window.addEventListener("pageshow", () => { page.leaving = false; });

wireKeyBox();
wireCsvDownload();
wireTools();
wireSendAgain();
wireTabs();
wireCatchUp();

// Leaving while files are still being sent would lose those not yet sent: ask first.
window.addEventListener("beforeunload", (event) => {
  if (page.sessions.some((session) => session.uploading)) {
    event.preventDefault();
    event.returnValue = "";  // what older browsers look for
  }
});

tidyAddress();
restoreFromAddress();
// The address edited by hand (or a link to other batches followed in this tab):
// show what it names now. The page's own changes (replaceState) fire no event.
window.addEventListener("hashchange", () => location.reload());

wirePicker();
startStatus();
