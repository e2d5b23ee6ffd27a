"""Werkzeug's multipart parser, with one more limit: the text of a whole form.

Werkzeug bounds each text field and each part's headers (MAX_FORM_MEMORY_SIZE) and
the number of parts (MAX_FORM_PARTS), not their product: a form of 2,100 text parts
just under the field limit is kept whole in memory, and decoded with "replace" a byte
of 0xFF becomes a 3-byte U+FFFD in a 2-byte-per-character string, so ~275 MB sent
held ~550 MB until the request ended (measured: 200 such fields, 26 MB sent, held
52 MB). File parts' headers are kept too, their file names twice (400 empty files
named with 60 KB each, 25 MB sent, held 50 MB). The form's own text is a batch id,
"create" and a token a file, 64 characters each at most, and a file name is 255
bytes at most on every common file system. The loop below is Werkzeug's
`MultiPartParser.parse` (3.1: requirements-web.txt keeps Werkzeug below 3.2), which
gives no hook between its decoder's events, with the running total of text added.

Its decoder reads part headers as UTF-8, which every browser sends; curl sends a
file's name as the bytes the file system holds, and Werkzeug dropped the whole form
at the first name that is not UTF-8 (an old archive's Latin-1 "café.jpg"): every
file of the request refused, none named. Such bytes read as U+FFFD instead
(LenientHeadersDecoder): the file is taken, under a name that says a character was lost.
"""

from __future__ import annotations

from typing import IO, Any

from flask import current_app
from werkzeug.datastructures import FileStorage, Headers, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser, _chunk_iter
from werkzeug.sansio.multipart import (
    HEADER_CONTINUATION_RE,
    Data,
    Epilogue,
    Field,
    File,
    MultipartDecoder,
    NeedData,
)


class FormTextTooLarge(RequestEntityTooLarge):
    """The form's text fields and part headers hold more than its budget in all
    (web_tier/errors.py says so)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget


class LenientHeadersDecoder(MultipartDecoder):
    """MultipartDecoder that reads a part's headers as UTF-8 with U+FFFD for bytes that
    are not (Werkzeug's own, but for "replace"), rather than raising, which lost the form."""

    def _parse_headers(self, data: bytes | bytearray) -> Headers:
        headers: list[tuple[str, str]] = []
        for line in HEADER_CONTINUATION_RE.sub(b" ", data).splitlines():
            line = line.strip(b" \t")
            if line != b"":
                name, _, value = line.decode("utf-8", "replace").partition(":")
                headers.append((name.strip(" \t"), value.strip(" \t")))
        return Headers(headers)


class TextCappedMultiPartParser(MultiPartParser):
    """MultiPartParser that refuses a form whose text fields and part headers add up to
    more than `max_text_bytes`, as it reads them rather than once they are all in memory."""

    def __init__(self, *args: Any, max_text_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_text_bytes = max_text_bytes

    def parse(self, stream: IO[bytes], boundary: bytes, content_length: int | None
              ) -> tuple[MultiDict[str, str], MultiDict[str, FileStorage]]:
        decoder = LenientHeadersDecoder(boundary, max_form_memory_size=self.max_form_memory_size,
                                   max_parts=self.max_form_parts)
        fields: list[tuple[str, str]] = []
        files: list[tuple[str, FileStorage]] = []
        text_bytes = 0
        part: Field | File | None = None
        text: list[bytes] = []
        stored: IO[bytes] | None = None
        for data in _chunk_iter(stream.read, self.buffer_size):
            decoder.receive_data(data)
            event = decoder.next_event()
            while not isinstance(event, (Epilogue, NeedData)):
                if isinstance(event, (Field, File)):
                    text_bytes += sum(len(name) + len(value) for name, value in event.headers.items())
                    if text_bytes > self.max_text_bytes:
                        raise FormTextTooLarge(self.max_text_bytes)
                if isinstance(event, Field):
                    part, text, field_bytes = event, [], 0
                elif isinstance(event, File):
                    part, stored = event, self.start_file_streaming(event, content_length)
                elif isinstance(event, Data):
                    if isinstance(part, Field):
                        field_bytes += len(event.data)
                        text_bytes += len(event.data)
                        if self.max_form_memory_size is not None and field_bytes > self.max_form_memory_size:
                            raise RequestEntityTooLarge()
                        if text_bytes > self.max_text_bytes:
                            raise FormTextTooLarge(self.max_text_bytes)
                        text.append(event.data)
                        if not event.more_data:
                            fields.append((part.name, b"".join(text).decode(
                                self.get_part_charset(part.headers), "replace")))
                    elif isinstance(part, File) and stored is not None:
                        stored.write(event.data)
                        if not event.more_data:
                            stored.seek(0)
                            files.append((part.name, FileStorage(stored, part.filename, part.name,
                                                                 headers=part.headers)))
                event = decoder.next_event()
        return self.cls(fields), self.cls(files)


class TextCappedFormDataParser(FormDataParser):
    """FormDataParser whose multipart forms are read by TextCappedMultiPartParser, with
    the app's MAX_FORM_TEXT_BYTES as their budget (as Werkzeug takes its other limits
    from the app's config)."""

    def _parse_multipart(self, stream: IO[bytes], mimetype: str, content_length: int | None,
                         options: dict[str, str]) -> tuple[IO[bytes], MultiDict, MultiDict]:
        parser = TextCappedMultiPartParser(
            stream_factory=self.stream_factory, max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts, cls=self.cls,
            max_text_bytes=current_app.config["MAX_FORM_TEXT_BYTES"])
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files
