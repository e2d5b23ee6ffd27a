// Choosing files: the file and folder buttons, and drops (files or folders) anywhere
// on the page. Files from folders are sorted by name, and those not worth sending
// (hidden, not images) skipped and counted in the summary (page.folderNotices).
import { sayOnce } from "./announce.js";
import { $ } from "./dom.js";
import { updateSummary } from "./refresh.js";
import { upload } from "./session.js";
import { page } from "./state.js";

const asChosen = (files) => Array.from(files || [], (file) => ({ file }));

// By type or, where the browser knows none (a .webp on a system without its codec,
// say), by extension. Only files from folders are sorted so: a file chosen by name is
// sent, and the server says why it refuses it.
const IMAGE_EXTENSION = /\.(jpe?g|jpe|jfif|mpo|png|gif|bmp|webp|tiff?|avif|heic|heif)$/i;
function looksLikeImage(file) {
  return file.type.startsWith("image/") || IMAGE_EXTENSION.test(file.name);
}

// A few names of `paths`, for the summary line.
function someOf(paths) {
  return paths.slice(0, 3).join(", ") + (paths.length > 3 ? ", …" : "");
}

// Hidden files and folders of a folder (names starting with "."): thumbnail caches,
// and the "._name.jpg" twin macOS writes beside each file on a USB stick, which
// would fail "not an image", one failed row per photo. The path of the first
// such part of `path` below the folder chosen or dropped ("Photos/.thumbnails/"), or "".
function hiddenPart(path) {
  const parts = path.split("/");
  const at = parts.findIndex((part, i) => i > 0 && part.startsWith("."));
  if (at < 0) return "";
  return parts.slice(0, at + 1).join("/") + (at < parts.length - 1 ? "/" : "");
}

// `found` ({file, path, inFolder}): files chosen or dropped, some from folders. Those of
// folders that are hidden or not images are skipped, the summary saying how many and
// naming a few, rather than each shown failed: a folder of photos holds files nobody
// meant to classify (.xmp sidecars, .DS_Store, Thumbs.db, videos), whose failed rows
// would bury the results and count as failures. `unreadable`: paths in them that could
// not be read; `hidden`: paths of hidden files and folders already left out (a folder's end in "/").
function uploadFound(found, unreadable = [], hidden = []) {
  // A Set: a stick's 10,000 "._" twins are 10,000 hidden paths, each looked up here.
  const hiddenPaths = new Set(hidden);
  const notImages = [];
  const kept = found.filter(({ file, path, inFolder }) => {
    if (!inFolder) return true;
    const part = hiddenPart(path);
    if (part) hiddenPaths.add(part);
    else if (!looksLikeImage(file)) notImages.push(path);
    else return true;
    return false;
  });
  hidden = [...hiddenPaths];
  const folderNotices = [];
  page.folderNotices = folderNotices;
  if (!found.length && !unreadable.length && !hidden.length) folderNotices.push("the folder holds no files");
  const paths = [...hidden, ...notImages];
  if (paths.length) {
    const folders = hidden.filter((path) => path.endsWith("/")).length;
    const what = !folders ? (paths.length === 1 ? "file" : "files")
      : folders === paths.length ? (folders === 1 ? "folder" : "folders") : "files and folders";
    const why = hidden.length && notImages.length ? "hidden or not images" : hidden.length ? "hidden" : "not images";
    folderNotices.push(`${paths.length} ${what} in the folder skipped, ${why}: ${someOf(paths)}`);
  }
  if (unreadable.length) {
    folderNotices.push(`${unreadable.length} in the folder could not be read: ${someOf(unreadable)}`);
  }
  // Together, in one text: said one by one in the same moment, each would replace the
  // one before it in the live region, and a screen reader hear only the last.
  if (folderNotices.length) sayOnce(folderNotices.join(". "));
  updateSummary();
  upload(kept);
}

// Names in a folder's order ("img_2" before "img_10"), by one collator: localeCompare
// with options builds one at each comparison, 0.85 s to sort 10,000 paths.
const byName = new Intl.Collator(undefined, { numeric: true }).compare;

// Every file under the dropped `entries` (FileSystemEntry): {found, unreadable, hidden},
// each found with its path from the drop ("Holiday/day 1/same.jpg"); in a folder's order
// by name. The files of each batch a folder gives are read together, and `onFound`
// told how many files were found so far: read one at a time, a folder of 10,000
// would show nothing for 20 s.
async function walk(entries, onFound) {
  const found = [], unreadable = [], hidden = [];
  let count = 0;
  const pathOf = (entry) => entry.fullPath.replace(/^\//, "");
  // Its File, or null if it cannot be read (moved or deleted since the drop).
  const read = (entry) => (entry.isFile ? new Promise((resolve, reject) => entry.file(resolve, reject))
    .catch(() => null) : Promise.resolve(null));
  const take = async (entry, file) => {
    const path = pathOf(entry);
    if (entry.isFile) {
      if (file) found.push({ file, path, inFolder: path.includes("/") });
      else unreadable.push(path);
    } else if (entry.isDirectory) {
      await visit(entry);
    }
  };
  const visit = async (folder) => {
    const children = [];  // [entry, its File or null]
    try {
      const reader = folder.createReader();
      // A batch at a time (100 in Chromium): called until it gives none.
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        const shown = [];
        for (const child of batch) {
          if (child.name.startsWith(".")) hidden.push(pathOf(child) + (child.isDirectory ? "/" : ""));
          else shown.push(child);
        }
        const files = await Promise.all(shown.map(read));
        shown.forEach((child, i) => children.push([child, files[i]]));
        count += files.filter(Boolean).length;
        onFound(count);
      }
    } catch {
      unreadable.push(pathOf(folder));  // moved or deleted since the drop, or not to be read
      return;
    }
    children.sort(([a], [b]) => byName(a.name, b.name));
    for (const [child, file] of children) await take(child, file);
  };
  const files = await Promise.all(entries.map(read));
  for (const [i, entry] of entries.entries()) await take(entry, files[i]);
  return { found, unreadable, hidden };
}

// A drop: its files uploaded, or, if it holds a folder, every file found under it.
function takeDrop(event) {
  event.preventDefault();
  $("drop-zone").classList.remove("over");
  const dropped = event.dataTransfer;
  if (!dropped) return;
  // A dropped folder is in `files` as one file that cannot be read (it would fail
  // "could not be read"); its entry can be walked. Taken now: the drop's items
  // are emptied once this handler returns.
  const entries = Array.from(dropped.items || [], (item) =>
    item.kind === "file" && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null);
  if (!entries.some((entry) => entry && entry.isDirectory)) {
    page.folderNotices = [];
    upload(asChosen(dropped.files));
    return;
  }
  const reading = (count) => {
    page.folderNotices = [`reading the folder… ${count} file${count === 1 ? "" : "s"} found`];
    updateSummary();
  };
  sayOnce("reading the folder…");  // once: its count, said at each batch of files read, was chatter
  reading(0);
  walk(entries.filter(Boolean), reading)
    .then(({ found, unreadable, hidden }) => uploadFound(found, unreadable, hidden));
}

export function wirePicker() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    page.folderNotices = [];
    upload(asChosen(input.files));
    input.value = "";
  });
  const folderInput = $("folder-input");
  folderInput.addEventListener("change", () => {
    const found = Array.from(folderInput.files, (file) =>
      ({ file, path: file.webkitRelativePath || file.name, inFolder: true }));
    // In the folder's order by name, as a dropped one (the browser's order is its own).
    uploadFound(found.sort((a, b) => byName(a.path, b.path)));
    folderInput.value = "";
  });
  // Files dropped anywhere on the page are uploaded: left to the browser, a drop
  // beside the zone would open the file in this tab, leaving the page.
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.toggle("over", zone.contains(event.target));
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("over");  // left the window
  });
  document.addEventListener("drop", takeDrop);
}
