// The API key box: the key kept in this browser (localStorage), sent with each upload.
import { $, keyBox, keyInput } from "./dom.js";
import { updateSummary } from "./refresh.js";

const KEY_STORE = "imgclass.apiKey";

export function storedKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}
export function authHeaders() {
  const key = storedKey();
  return key ? { "X-API-Key": key } : {};
}
// An HTTP header carries printable ASCII only (fetch refuses anything else before
// sending, which would read as "no server"): a key pasted with a curly quote is said to be wrong.
const HEADER_SAFE = /^[\x20-\x7e]*$/;
export function keyProblem() {
  return HEADER_SAFE.test(storedKey()) ? "" :
    "the API key holds a character an HTTP header cannot carry: enter it again above";
}
// Why the key did not do, beside the box (and read with it), not only in the rows.
export function sayKeyProblem(text) {
  keyBox.hidden = false;
  $("api-key-problem").textContent = text;
  $("api-key-problem").hidden = !text;
  if (text) keyInput.setAttribute("aria-invalid", "true");
  else keyInput.removeAttribute("aria-invalid");
}
// The box shows the key kept; edited, it keeps the new one, as typed, not only on leaving
// the box: files dropped straight after typing would be sent without it.
export function wireKeyBox() {
  keyInput.value = storedKey();
  for (const type of ["input", "change"]) {
    keyInput.addEventListener(type, () => {
      sayKeyProblem("");
      try { localStorage.setItem(KEY_STORE, keyInput.value.trim()); } catch { /* private mode */ }
      updateSummary();  // files refused for the old key may now be sent again (notWorthAgain)
    });
  }
  // Enter in the box would submit its form, reloading the page and cutting off uploads.
  keyBox.addEventListener("submit", (event) => event.preventDefault());
}
