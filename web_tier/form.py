"""Reading a request's multipart form: its files, their count, the client's tokens,
and each file's bytes up to the size limit."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence

from flask import Request
from werkzeug.datastructures import FileStorage

from common.config import Settings
from common.image_limits import too_large
from web_tier.filenames import display_name
from web_tier.refusals import Code, Refusal

_CHUNK = 1 << 20
# Room in a request body for the multipart framing and form fields around the files.
FORM_SLACK_BYTES = 1 << 20
# Cap on one request body, whatever the per-file limits multiply to.
MAX_REQUEST_BYTES = 2 * 1024**3
# The largest text field Werkzeug keeps (MAX_FORM_MEMORY_SIZE). At Werkzeug's default of
# 500 KB, two requests of 2,090 unknown fields each take a web worker to 2.1 GB.
# The form's own fields (a batch id, a token, "create") are 64 characters at most, but
# the limit bounds the parser's buffer too, which takes the body 64 KB at a time.
MAX_TEXT_FIELD_BYTES = 128 * 1024
# Text a form holds in all, beside its files' bytes (web_tier/multipart.py): one field
# at its limit, and for each file a token of 64 characters and its part's headers with
# a file name of 255 bytes (~350), each twice over.
TEXT_BYTES_PER_FILE = 1024
# The form fields each upload endpoint takes its files from.
CLASSIFY_FIELDS = ("inputFile", "myfile")
JOBS_FIELDS = ("files",)
# The form fields that place a request's files in a batch (api.create_job).
BATCH_FORM_FIELDS = ("batch_id", "create", "tokens")


def jobs_body_limit(settings: Settings) -> int:
    """The largest body POST /api/jobs takes (the app's MAX_CONTENT_LENGTH): as many files
    as a request may carry, each at its limit, with room for the form around them."""
    files_bytes = settings.max_upload_bytes * max(1, settings.max_files_per_request)
    return min(files_bytes + FORM_SLACK_BYTES, MAX_REQUEST_BYTES)


def form_text_budget(settings: Settings) -> int:
    """The most text, in bytes, a request's form may hold in all its fields and part
    headers together."""
    return MAX_TEXT_FIELD_BYTES + TEXT_BYTES_PER_FILE * max(1, settings.max_files_per_request)


def upload_limits(settings: Settings) -> dict[str, int]:
    """What a client must keep to for its uploads to be taken (GET /api/status `limits`):
    with the defaults a request of the most files, each at its limit, is larger than
    the largest request, which a client could not otherwise know before its 413."""
    return {"max_upload_bytes": settings.max_upload_bytes,
            "max_files_per_request": settings.max_files_per_request,
            "max_request_bytes": jobs_body_limit(settings)}


def form_files(request: Request, fields: Sequence[str]) -> list[FileStorage]:
    """The files sent in these form fields, or Refusal for a form that could not be read.

    A multipart body of which nothing could be read is said to be so: Werkzeug
    drops the whole form when it is not well formed, and "no file" would then
    mislead. So are files sent in other fields beside these, which
    would otherwise be dropped without a word.
    """
    fields = tuple(fields)
    chunked = _chunked_body_werkzeug_reads(request)
    if request.mimetype != "multipart/form-data":
        # No file can be in it, and Werkzeug would read a urlencoded body whole into
        # memory to parse it, up to the 2 GB request limit.
        return []
    if request.content_length is None and not chunked:
        # (HTTP/1.0 without a length): Werkzeug reads nothing, and "no file" would mislead.
        raise Refusal(411, "the request has no Content-Length (and is not chunked): its form "
                           "cannot be read", code=Code.LENGTH_REQUIRED)
    _refuse_text_in_file_fields(request, fields)
    files = _real_files(f for name in fields for f in request.files.getlist(name))
    if not files and (request.content_length or chunked) and not request.files and not request.form:
        if not request.mimetype_params.get("boundary"):
            # Most often a Content-Type set by hand: a question about file names would mislead.
            raise Refusal(400, "the multipart form has no boundary in its Content-Type: let the client "
                               "write that header (curl -F, a browser's FormData), not set it by hand",
                          code=Code.BAD_REQUEST)
        raise Refusal(400, "the multipart form could not be read: does the body hold the boundary its "
                           "Content-Type names, and is the body well formed?",
                      code=Code.BAD_REQUEST)
    _refuse_files_elsewhere(request, fields, bool(files))
    return files


def _chunked_body_werkzeug_reads(request: Request) -> bool:
    """Whether the body comes chunked; Refusal for a coding Werkzeug would not undo."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("", "identity"):  # Werkzeug reads a body as it comes
        raise Refusal(415, f"a body in Content-Encoding {coding[:32]!r} is not read: send the form "
                           "as it is (images are compressed already)", code=Code.UNSUPPORTED_ENCODING)
    transfer = request.headers.get("Transfer-Encoding", "")
    codings = [c.strip().lower() for c in transfer.split(",") if c.strip()]
    unread = [c for c in codings if c not in ("chunked", "identity")]
    if unread:  # gunicorn undoes only chunked: the rest would come through as garbled bytes
        raise Refusal(501, f"a body in Transfer-Encoding {unread[0][:32]!r} is not read: send it "
                           "chunked or with a Content-Length", code=Code.UNSUPPORTED_ENCODING)
    return "chunked" in codings


def _refuse_text_in_file_fields(request: Request, fields: tuple[str, ...]) -> None:
    """A part without a filename, which Werkzeug keeps apart from the files. (An empty
    one, as `curl -F files=` sends, carries nothing to lose.)"""
    texts = [name for name in fields if any(request.form.getlist(name))]
    if texts:
        raise Refusal(400, f"form field {texts[0][:64]!r} holds text, not a file: "
                           + send_as_files(fields[0]), code=Code.BAD_REQUEST)


def _refuse_files_elsewhere(request: Request, fields: tuple[str, ...], files_in_fields: bool) -> None:
    """Files in other form fields, beside or instead of these, which would otherwise be
    dropped without a word."""
    # Werkzeug files a part with no name= under None.
    elsewhere = sorted((name for name in request.files if name not in fields
                        and _real_files(request.files.getlist(name))), key=lambda name: name or "")
    if files_in_fields and elsewhere:
        raise Refusal(400, f"files in {_field(elsewhere[0])} too: send them all in "
                           + " or ".join(repr(f) for f in fields), code=Code.BAD_REQUEST)
    if elsewhere:  # only there: named, as every refusal of a file is
        stray = _real_files(request.files.getlist(elsewhere[0]))[0]
        raise Refusal(400, f"sent in {_field(elsewhere[0])}: send it in "
                           + " or ".join(repr(f) for f in fields)
                           + f" (curl -F {fields[0]}=@cat.jpg)", display_name(stray),
                      code=Code.BAD_REQUEST)


def send_as_files(field: str) -> str:
    """How to send images as files in `field`, against the mistakes that send them as
    text instead: curl's `<` (the file's bytes as a text field), curl's comma list
    (files nested in one multipart/mixed part), and a part without a filename= (Python
    requests' `(None, data, "image/jpeg")`): Werkzeug keeps each as text."""
    return (f"send each image as a file, with its name (curl -F {field}=@cat.jpg: @, not <; "
            "several files: one -F each, not a comma list)")


def _field(name: str | None) -> str:
    return f"form field {name[:64]!r}" if name else "a form part with no name"


def _real_files(files: Iterable[FileStorage]) -> list[FileStorage]:
    """Drop the empty part a browser sends for a file input left blank."""
    out = []
    for f in files:
        if not f.filename:
            empty = not f.stream.read(1)
            f.stream.seek(0)
            if empty:
                continue
        out.append(f)
    return out


def check_count(files: list[FileStorage], settings: Settings, field: str = "files") -> None:
    """Refuse a request with no file in `field`, or with more than one request may carry."""
    if not files:
        raise Refusal(400, f"no file in the request: send the images as multipart/form-data, "
                           f"in the field '{field}'", code=Code.NO_FILE)
    if len(files) > settings.max_files_per_request:
        raise Refusal(
            413,
            f"too many files in one request: {len(files)} "
            f"(the limit is {settings.max_files_per_request})",
            code=Code.TOO_MANY_FILES,
        )


# What a client's token (and POST /'s Idempotency-Key) is made of.
TOKEN_CHARACTER = r"[A-Za-z0-9._:-]"
_TOKEN = re.compile(TOKEN_CHARACTER + "{1,64}")


def form_tokens(request: Request, files: list[FileStorage], field: str = "tokens") -> list[str] | None:
    """The client's token for each of `files` (one per file, in their order), or None.

    A file sent again under a token its batch holds is not stored again, so a client
    that lost the answer to a request (a connection cut, a web tier restarted) can
    send it again without having anything classified twice.
    """
    tokens = request.form.getlist(field)
    if not tokens:
        return None
    count = len(files)
    if len(tokens) != count:
        # Named, as every refusal of a file is: the first file without a token of its own.
        first_without = display_name(files[len(tokens)]) if len(tokens) < count else None
        raise Refusal(400, f"{len(tokens)} token{'s' * (len(tokens) != 1)} for {count} "
                           f"file{'s' * (count != 1)}: send one token per file, "
                           "in the order of the files", first_without, code=Code.BAD_REQUEST)
    for token in tokens:
        if not _TOKEN.fullmatch(token):
            raise Refusal(400, f"a token is 1 to 64 letters, digits or '._:-', not {token[:70]!r}",
                          code=Code.BAD_REQUEST)
    if len(set(tokens)) != count:
        first = {}
        for token, storage in zip(tokens, files, strict=True):
            if token in first:  # named, as every refusal of a file is
                raise Refusal(400, f"two files have the same token ({first[token]} and this one): "
                                   "each file needs its own", display_name(storage),
                              code=Code.BAD_REQUEST)
            first[token] = display_name(storage)
    return tokens


def read_limited(storage: FileStorage, limit: int) -> bytes:
    """The file's bytes, refusing it as soon as it passes `limit`."""
    name = display_name(storage)
    buf = io.BytesIO()
    while True:
        chunk = storage.stream.read(_CHUNK)
        if not chunk:
            break
        buf.write(chunk)
        if buf.tell() > limit:
            raise Refusal(413, too_large(limit), name, code=Code.TOO_LARGE)
    return buf.getvalue()


def file_bytes(storage: FileStorage, limit: int) -> int:
    """What read_limited will hold of `storage`: its size as parsed, and no more than
    `limit` + 1 bytes (read to refuse it)."""
    stream = storage.stream
    at = stream.tell()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(at)
    return min(size - at, limit + 1)
