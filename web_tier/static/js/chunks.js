// An upload's files in chunks, one POST /api/jobs each.
import { setting } from "./settings.js";

// The bytes of files `entries` ({size}, read as they were chosen) hold; a restored row
// has no file, nor size.
export const bytesOf = (entries) => entries.reduce((bytes, { size }) => bytes + (size || 0), 0);

// Files per POST /api/jobs: filesPerRequest, 20 at most.
function chunkFiles() {
  return Math.max(1, Math.min(20, setting("filesPerRequest")));
}

// And 8 MB at most whatever the limit (maxChunkBytes): a request carrying 100 MB of
// photos holds its files back from classification until the last byte is in, and is
// all sent again if the link drops near its end.
const CHUNK_BYTES = 8 * 1024 * 1024;
function maxChunkBytes() {
  return Math.min(CHUNK_BYTES, setting("maxChunkBytes"));
}

// `entries` in chunks of at most chunkFiles() files and maxChunkBytes() bytes (a file
// alone may be larger: the server then says why).
// (The limits read once: each a read of the body's dataset, twice a file.)
export function chunked(entries) {
  const chunks = [];
  const files = chunkFiles();
  const most = maxChunkBytes();
  let bytes = 0;
  for (const entry of entries) {
    const last = chunks[chunks.length - 1];
    if (last && last.length < files && bytes + entry.size <= most) {
      last.push(entry);
      bytes += entry.size;
    } else {
      chunks.push([entry]);
      bytes = entry.size;
    }
  }
  return chunks;
}
