// The page's elements that several modules use, found once (modules run after the
// page is parsed).
export const $ = (id) => document.getElementById(id);
export const resultsEl = $("results");
// The rows that failed, but not those the user stopped ("Stop sending", rows.js
// isStopped): the summary counts those apart, and the filter and screen readers leave them out.
export const FAILED_ROWS = '.result[data-state="failed"]:not([data-stopped])';
export const template = $("result-template");
export const banner = $("untrained-banner");
export const keyBox = $("api-key-box");
export const keyInput = $("api-key");
