// The page's elements that several modules use, found once (modules run after the
// page is parsed).
export const $ = (id) => document.getElementById(id);
export const resultsEl = $("results");
export const template = $("result-template");
export const banner = $("untrained-banner");
export const keyBox = $("api-key-box");
export const keyInput = $("api-key");
