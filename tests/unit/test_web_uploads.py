"""Bad uploads are refused with a reason naming the file; hostile names are harmless."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import mimetypes
import os
import re
import subprocess
import tempfile
import unicodedata
import zlib
from pathlib import Path

import pytest

from tests.conftest import PAGE_SCRIPTS, make_image, page_script_source
from tests.unit.conftest import services_of, upload
from web_tier.services import EXTENSION

pytestmark = pytest.mark.timeout(120)

SAFE_KEY = re.compile(r"[0-9a-f]{32}/[0-9a-f]{32}/[A-Za-z0-9._-]{1,100}")


def test_good_files_pass_while_bad_ones_are_listed(web_client):
    response = upload(web_client, [(make_image(3), "good.jpg"), (b"nope", "bad.gif"),
                                   (make_image(4, fmt="WEBP"), "good.webp")])
    assert response.status_code == 202
    body = response.get_json()
    assert [(i["index"], i["filename"]) for i in body["items"]] == [(0, "good.jpg"), (2, "good.webp")]
    assert [(r["index"], r["filename"], r["status"]) for r in body["rejected"]] == [(1, "bad.gif", 415)]


def test_type_is_decided_by_content_not_name(web_client, web_aws):
    response = upload(web_client, [(make_image(6, fmt="PNG"), "actually-a-png.jpg")])
    assert response.status_code == 202
    body = response.get_json()
    key = f"{body['batch_id']}/{body['items'][0]['id']}/actually-a-png.jpg"
    head = web_aws.s3.head_object(Bucket=web_aws.settings.input_bucket, Key=key)
    assert head["ContentType"] == "image/png"


def test_too_many_files(web_client, web_settings):
    small = make_image(7, size=(48, 48))
    files = [(small, f"f{n}.jpg") for n in range(web_settings.max_files_per_request + 1)]
    response = upload(web_client, files)
    assert response.status_code == 413
    assert "too many files" in response.get_json()["error"]
    assert "filename" in response.get_json()
    assert upload(web_client, files[:2]).status_code == 202


def test_past_the_form_parts_limit_the_answer_says_too_many_parts(web_client, web_settings):
    """Werkzeug stops reading at 2 * max_files_per_request + 100 parts (a file and its
    token each), before the count check."""
    files = [(b"x", f"f{n}.jpg") for n in range(2 * web_settings.max_files_per_request + 101)]
    response = upload(web_client, files)
    assert response.status_code == 413
    assert response.get_json()["error"].startswith(
        f"the form has too many parts (at most {web_settings.max_files_per_request} files")


def test_a_file_name_of_megabytes_is_said_to_be_one(web_client):
    """Werkzeug refuses a part's headers over the text field limit as it does a field:
    the answer must say so, not speak only of parts and text fields."""
    from web_tier.form import MAX_TEXT_FIELD_BYTES

    response = upload(web_client, [(make_image(3), "a" * (MAX_TEXT_FIELD_BYTES + 10) + ".jpg")])
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert f"a part's headers (its file name) over {MAX_TEXT_FIELD_BYTES} bytes" in error


@pytest.mark.parametrize("chunked", [False, True])
def test_a_file_name_that_is_not_utf8_is_taken_with_the_others(web_client, web_aws, chunked):
    """curl sends a name as the file system's bytes: Werkzeug dropped the whole form at
    one that is not UTF-8 (an old archive's Latin-1 names), every file refused and none
    named. Each byte that is not reads as U+FFFD, and every file is taken."""
    part = (b'--XX\r\nContent-Disposition: form-data; name="files"; filename="%s"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    body = (part % b"caf\xe9.jpg" + make_image(3) + b"\r\n" + part % b"ok.jpg" + make_image(4)
            + b"\r\n--XX--\r\n")
    if chunked:
        response = web_client.post("/api/jobs", input_stream=io.BytesIO(body),
                                   headers={"Transfer-Encoding": "chunked"},
                                   content_type="multipart/form-data; boundary=XX",
                                   environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
    else:
        response = web_client.post("/api/jobs", data=body, content_type="multipart/form-data; boundary=XX")
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert [i["filename"] for i in body["items"]] == ["caf\ufffd.jpg", "ok.jpg"] and body["rejected"] == []
    stored = web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket, Prefix=body["batch_id"])
    assert len(stored["Contents"]) == 2
    for key in (o["Key"] for o in stored["Contents"]):
        assert SAFE_KEY.fullmatch(key), key


@pytest.mark.parametrize("path", ["/", "/api/jobs"])
def test_a_form_whose_boundary_is_missing_or_not_in_the_body_is_said_so(web_client, path):
    """A Content-Type set by hand (curl -H ... --data-binary) must not be asked whether
    every file name is UTF-8."""
    missing = web_client.post(path, data=make_image(3), content_type="multipart/form-data")
    assert missing.status_code == 400
    assert "the multipart form has no boundary in its Content-Type" in missing.get_data(as_text=True)
    elsewhere = web_client.post(path, data=make_image(3), content_type="multipart/form-data; boundary=abc")
    assert elsewhere.status_code == 400
    assert "does the body hold the boundary its Content-Type names" in elsewhere.get_data(as_text=True)


@pytest.mark.parametrize(("path", "field"), [("/", b"inputFile"), ("/api/jobs", b"files")])
def test_a_form_without_length_or_in_a_content_coding_is_refused_as_such(web_app, web_client, path, field):
    """Werkzeug reads no body without a Content-Length (HTTP/1.0, not chunked), and does
    not undo a Content-Encoding: both were answered "no file" or "not well formed"."""
    body = (b'--XX\r\nContent-Disposition: form-data; name="' + field + b'"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + make_image(3) + b"\r\n--XX--\r\n")
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    environ = EnvironBuilder(path=path, method="POST", input_stream=io.BytesIO(body),
                             content_type="multipart/form-data; boundary=XX").get_environ()
    del environ["CONTENT_LENGTH"]  # as gunicorn passes such a request on (the test client adds one)
    answer, status, _ = run_wsgi_app(web_app, environ)
    assert status.startswith("411")
    assert "Content-Length" in b"".join(answer).decode()
    packed = web_client.post(path, data=zlib.compress(body), headers={"Content-Encoding": "gzip"},
                             content_type="multipart/form-data; boundary=XX")
    assert packed.status_code == 415
    assert "Content-Encoding 'gzip'" in packed.get_data(as_text=True)
    # gunicorn undoes chunked alone: a body in another transfer coding reached the form
    # parser as it came, and "deflate, chunked" with a plain body was classified.
    for coding in ("deflate, chunked", "gzip"):
        environ = EnvironBuilder(path=path, method="POST", input_stream=io.BytesIO(body),
                                 content_type="multipart/form-data; boundary=XX",
                                 headers={"Transfer-Encoding": coding}).get_environ()
        answer, status, _ = run_wsgi_app(web_app, environ)
        assert status.startswith("501"), (coding, status)
        assert f"Transfer-Encoding {coding.split(',')[0]!r}" in b"".join(answer).decode()


def test_a_bulk_request_is_read_and_stored_a_few_files_at_a_time(web_app, web_settings, monkeypatch):
    """A thousand 10 MB files must not sit in memory together: at most one chunk does."""
    from web_tier.api import FILES_PER_CHUNK

    submitter = services_of(web_app).submitter
    submit, chunks = submitter.submit, []
    monkeypatch.setattr(submitter, "submit", lambda batch, uploads, *rest: chunks.append(len(uploads))
                        or submit(batch, uploads, *rest))
    count = web_settings.max_files_per_request
    files = [(make_image(400 + n, size=(48, 48)), f"f{n}.jpg") for n in range(count)]
    files[3] = (b"not an image", "f3.jpg")
    body = upload(web_app.test_client(), files).get_json()
    assert count > FILES_PER_CHUNK and max(chunks) <= FILES_PER_CHUNK and sum(chunks) == count - 1
    assert [i["index"] for i in body["items"]] == [n for n in range(count) if n != 3]
    assert [r["index"] for r in body["rejected"]] == [3]


def test_request_over_the_body_limit_is_json_413(web_app):
    client = web_app.test_client()
    limit = web_app.config["MAX_CONTENT_LENGTH"]
    response = upload(client, [(b"\0" * (limit + 1), "enormous.jpg")])
    assert response.status_code == 413
    assert response.is_json
    assert "larger" in response.get_json()["error"]
    assert upload(client, [(make_image(8), "next.jpg")]).status_code == 202


def test_no_files_or_a_wrong_field_is_refused_naming_the_field(web_client):
    response = web_client.post("/api/jobs", data={}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"]
    # A form of text fields alone: no file in it.
    response = web_client.post("/api/jobs", data={"note": "x"}, content_type="multipart/form-data")
    assert response.status_code == 400 and response.get_json()["code"] == "no_file"
    response = web_client.post("/api/jobs", data={"file": (io.BytesIO(make_image(1)), "a.jpg")},
                               content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json() == {"items": [], "rejected": [],
                                   "error": "sent in form field 'file': send it in 'files' "
                                            "(curl -F files=@cat.jpg)", "code": "bad_request",
                                   "filename": "a.jpg"}


@pytest.mark.parametrize(("path", "with_named"), [("/api/jobs", False), ("/api/jobs", True), ("/", True)])
def test_a_file_in_a_form_part_with_no_name_is_refused_saying_so(web_client, web_aws, path, with_named):
    """Werkzeug files such a part under None: not a 500 and a traceback."""
    boundary = "b0undary"
    named = {"/api/jobs": "files", "/": "inputFile"}[path]
    parts = ['Content-Disposition: form-data; filename="b.jpg"\r\nContent-Type: image/jpeg\r\n\r\n']
    if with_named:
        parts.append(f'Content-Disposition: form-data; name="{named}"; filename="a.jpg"\r\n'
                     'Content-Type: image/jpeg\r\n\r\n')
    body = b"".join(f"--{boundary}\r\n{part}".encode() + make_image(323) + b"\r\n" for part in parts)
    response = web_client.post(path, data=body + f"--{boundary}--\r\n".encode(),
                               content_type=f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 400
    error = response.get_json()["error"] if response.is_json else response.get_data(as_text=True)
    assert error.startswith("files in a form part with no name too" if with_named
                            else "sent in a form part with no name"), error
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


def test_hostile_names_are_stored_safely_and_returned_intact(web_client, web_aws):
    names = [
        "../../etc/passwd.jpg",
        "<script>alert(1)</script>.png",
        ("ünï-漢字-" * 40)[:296] + ".jpg",
        "same.jpg",
        "same.jpg",
        "..",
        "spaces & ampersands; semicolons.jpg",
    ]
    files = [(make_image(200 + n, size=(64, 48)), name) for n, name in enumerate(names)]
    response = upload(web_client, files)
    assert response.status_code == 202
    body = response.get_json()
    assert [i["filename"] for i in body["items"]] == names
    assert len({i["id"] for i in body["items"]}) == len(names)
    listed = web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket)["Contents"]
    keys = [o["Key"] for o in listed]
    assert len(keys) == len(names)
    assert all(SAFE_KEY.fullmatch(k) for k in keys), keys
    got = {i["filename"] for i in web_client.get(f"/api/jobs/{body['batch_id']}").get_json()["items"]}
    assert got == set(names)


def test_names_with_control_characters_and_quotes_are_accepted(web_client, web_aws):
    """Such names made the request message too big (a 503 that no retry could fix);
    quotes, which JSON also escapes, are covered in test_common."""
    names = ["\x01" * 200 + ".jpg", "tab\there.jpg", "bell\x07" * 150 + ".jpg", "line\u2028para\u2029.jpg"]
    files = [(make_image(300 + n, size=(64, 48)), name) for n, name in enumerate(names)]
    response = upload(web_client, files)
    assert response.status_code == 202, response.get_json()
    shown = [i["filename"] for i in response.get_json()["items"]]
    # U+2028 and U+2029 too: POST /'s one-line answer would split in two at them.
    assert shown == [".jpg", "tab here.jpg", "bell " * 150 + ".jpg", "line para .jpg"]


def test_files_in_another_field_beside_the_right_one_are_not_dropped_without_a_word(web_client, web_aws):
    """/api/jobs took the one file in 'files' and said nothing of the two in 'inputFile'."""
    data = {"files": [(io.BytesIO(make_image(320)), "a.jpg")],
            "inputFile": [(io.BytesIO(make_image(321)), "b.jpg"), (io.BytesIO(make_image(322)), "c.jpg")]}
    response = web_client.post("/api/jobs", data=data, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"] == "files in form field 'inputFile' too: send them all in 'files'"
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


def test_a_name_too_long_is_cut_before_its_extension():
    """Cut at 1,024 characters with its extension, POST / answered with the whole
    '.jpg'-less name's first 1,024 characters, where it drops the extension."""
    from common.names import stem
    from web_tier.filenames import MAX_FILENAME_CHARS, clean_name

    shown = clean_name("A" * 3000 + ".jpg")
    assert len(shown) == MAX_FILENAME_CHARS and shown.endswith("A.jpg")
    assert stem(shown) == "A" * (MAX_FILENAME_CHARS - 4)
    assert clean_name("B" * 3000) == "B" * MAX_FILENAME_CHARS  # no extension to keep
    # Up to 16 characters is an extension, kept; more is part of the name.
    assert clean_name("C" * 3000 + "." + "e" * 16).endswith("C." + "e" * 16)
    assert clean_name("D" * 3000 + "." + "e" * 17) == "D" * MAX_FILENAME_CHARS


def test_a_name_of_nothing_to_show_is_called_upload():
    from web_tier.filenames import clean_name

    for sent in ("", "   ", "\u202e\u2066", "\n\t"):
        assert clean_name(sent) == "upload", repr(sent)


@pytest.mark.parametrize("name", ["\u00e9" * 1100 + ".jpg", "\U0001f600" * 500 + ".jpg",
                                  "\u732b" * 300 + ".png", "%" * 1000 + ".gif"])
def test_a_name_is_cut_to_what_the_output_object_can_name(name):
    """300 CJK characters: the API would show them all, the output object 203 (the worker
    reads the name from the input object's metadata, 1,800 characters percent-encoded).
    Every name kept fits there whole."""
    from common.names import MAX_META_FILENAME, decode_filename, encode_filename
    from web_tier.filenames import clean_name

    kept = clean_name(name)
    assert decode_filename(encode_filename(kept)) == kept  # the worker reads it back whole
    assert len(encode_filename(kept)) <= MAX_META_FILENAME
    assert kept.endswith(name[-5:]) and name.startswith(kept[:-4]) and len(kept) < len(name)


def test_a_name_cannot_use_bidirectional_controls_to_read_as_another(web_client):
    """'invoice\u202egpj.exe' shows as 'invoiceexe.jpg' wherever the name is shown."""
    response = upload(web_client, [(make_image(310), "invoice\u202egpj.exe.jpg"),
                                   (make_image(311), "\u2067a\u2069\u200f.jpg")])
    assert response.status_code == 202, response.get_json()
    assert [i["filename"] for i in response.get_json()["items"]] == ["invoicegpj.exe.jpg", "a.jpg"]


def test_characters_that_show_nothing_are_dropped_from_names_here_and_on_the_page(web_client):
    """A byte-order mark or a zero-width space kept would make two names that look alike
    differ, and put a BOM in the middle of results.csv. The joiners emoji are written
    with stay. The page drops the same characters before the server has a name."""
    from web_tier.filenames import DROPPED_CHARACTERS

    response = upload(web_client, [(make_image(312), "\ufeffbom\u200b.jpg"),
                                   (make_image(313), "soft\u00adhy\u2060phen.jpg"),
                                   (make_image(314), "family\U0001F468\u200d\U0001F469.jpg"),
                                   # ASCII in tag characters, unseen: shown as "cat.jpg" whatever it said
                                   (make_image(315), "cat\U000e0001\U000e0041\U000e0042\U000e007f.jpg"),
                                   (make_image(316), "fill\u3164er\u115f.jpg")])
    assert response.status_code == 202, response.get_json()
    assert [i["filename"] for i in response.get_json()["items"]] == [
        "bom.jpg", "softhyphen.jpg", "family\U0001F468\u200d\U0001F469.jpg", "cat.jpg", "filler.jpg"]
    # Every format character (Unicode's Cf) is dropped but the joiners and those that
    # show: number signs spanning the digits that follow (Arabic, Syriac, Kaithi), and
    # the controls that lay out Egyptian hieroglyphs.
    kept = {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"} - set(DROPPED_CHARACTERS)
    showing = {*map(chr, range(0x600, 0x606)), "\u06dd", "\u070f", "\u0890", "\u0891", "\u08e2",
               "\U000110bd", "\U000110cd", *map(chr, range(0x13430, 0x13460))}
    assert {"\u200c", "\u200d"} <= kept <= {"\u200c", "\u200d", *showing}, sorted(map(hex, map(ord, kept)))
    found = re.search(r"const DROPPED = /\[(.*?)\]/gu;", page_script_source())
    assert found, "the page's scripts have no DROPPED"
    ranges = re.findall(r"\\u\{?([0-9a-f]{4,5})\}?(?:-\\u\{?([0-9a-f]{4,5})\}?)?", found[1])
    on_the_page = {chr(c) for first, last in ranges
                   for c in range(int(first, 16), int(last or first, 16) + 1)}
    assert on_the_page == set(DROPPED_CHARACTERS)


def test_a_file_past_the_limit_is_spooled_only_to_the_limit_and_refused_alone(web_client, web_settings,
                                                                                monkeypatch):
    """Werkzeug spools each file whole before the size check: one 2 GB file would go to
    disk before its 413. No more than the limit is kept of any file."""
    from web_tier.spool import CappedSpool

    spools = []
    real_init = CappedSpool.__init__

    def recording_init(self, limit, spool):
        real_init(self, limit, spool)
        spools.append(self)

    monkeypatch.setattr(CappedSpool, "__init__", recording_init)
    huge = os.urandom(3 * web_settings.max_upload_bytes)
    response = upload(web_client, [(make_image(3), "good.jpg"), (huge, "huge.jpg")])
    assert response.status_code == 202
    body = response.get_json()
    assert [i["filename"] for i in body["items"]] == ["good.jpg"]
    assert [(r["filename"], r["status"]) for r in body["rejected"]] == [("huge.jpg", 413)]
    assert "larger than the limit" in body["rejected"][0]["error"]
    kept = sorted(web_settings.max_upload_bytes + 1 - s._room for s in spools)
    assert kept == [len(make_image(3)), web_settings.max_upload_bytes + 1]


def test_a_file_of_exactly_the_size_limit_is_taken_and_one_byte_more_is_not(make_web_app):
    """MAX_UPLOAD_BYTES: "413 beyond" it (README), not at it."""
    data = make_image(4)
    for limit, status in ((len(data), 202), (len(data) - 1, 413)):
        client = make_web_app(start_background=False, max_upload_bytes=limit).test_client()
        response = upload(client, [(data, "edge.jpg")])
        assert response.status_code == status, (limit, response.get_json())


@pytest.mark.parametrize("path", ["/api/jobs", "/"])
def test_a_form_that_is_not_multipart_is_not_read(web_client, monkeypatch, path):
    """Werkzeug reads a urlencoded body whole into memory to parse it, up to the 2 GB
    request limit; no file can be in one anyway."""
    from werkzeug.formparser import FormDataParser

    def never(*_args, **_kwargs):
        raise AssertionError("a urlencoded body was parsed")

    monkeypatch.setattr(FormDataParser, "_parse_urlencoded", never)
    response = web_client.post(path, data="files=" + "x" * 100_000,
                               content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    assert "multipart/form-data" in response.get_data(as_text=True)


@pytest.mark.parametrize("memory", [100, 0])  # held in memory; in the request's file
def test_a_capped_spool_is_a_stream_in_every_way_filestorage_uses_one(tmp_path, memory):
    from werkzeug.datastructures import FileStorage

    from web_tier.spool import CappedSpool, RequestSpool, SharedBytes

    request = RequestSpool(SharedBytes(1000), SharedBytes(1000), memory)
    spool = CappedSpool(limit=10, spool=request)
    assert spool.write(b"line one\nline two\n") == 18  # taken whole, kept to the limit
    assert request.memory_left == (89 if memory else 0)
    spool.seek(0)
    storage = FileStorage(spool, "a.txt")
    assert list(storage) == [b"line one\n", b"li"]
    spool.seek(0)
    storage.save(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == b"line one\nli"
    with spool as stream:
        assert stream is spool
    assert spool.closed
    assert request.memory_left == memory  # given back


@pytest.mark.parametrize("budget", [5, 500])
def test_a_capped_spool_moves_to_disk_past_its_share_of_memory_keeping_every_byte(budget):
    from web_tier.spool import CappedSpool, RequestSpool, SharedBytes

    disk = SharedBytes(1000)
    request = RequestSpool(SharedBytes(1000), disk, budget)
    spool = CappedSpool(limit=1000, spool=request)
    data = os.urandom(300)
    for start in range(0, 300, 7):
        spool.write(data[start:start + 7])
    assert (spool.in_memory, request.memory_left) == ((300, 200) if budget == 500 else (0, 5))
    assert disk.held == (0 if budget == 500 else 300)
    spool.seek(0)
    assert spool.read() == data
    spool.close()
    assert request.memory_left == budget
    assert disk.held == 0  # given back with the request's file


def test_the_requests_temporary_files_hold_no_more_disk_together_than_their_budget():
    """Each request is held to 2 GiB, but nothing held them together: whoever may
    upload could fill the web host's disk, the journal's with it."""
    from web_tier.spool import CappedSpool, RequestSpool, SharedBytes, SpoolFull

    disk = SharedBytes(1000)
    first, second = RequestSpool(SharedBytes(0), disk), RequestSpool(SharedBytes(0), disk)
    held = CappedSpool(limit=2000, spool=first)
    held.write(os.urandom(700))
    refused = CappedSpool(limit=2000, spool=second)
    refused.write(os.urandom(300))  # fits beside the first's 700
    with pytest.raises(SpoolFull, match=r"uploads hold 1000 bytes on disk of the 1000 .*WEB_SPOOL_BYTES"):
        refused.write(b"x")
    assert disk.held == 1000
    held.close()  # the first request ends: its file's bytes are free again
    assert disk.held == 300
    refused.write(os.urandom(500))
    refused.close()
    assert disk.held == 0


def test_the_requests_forms_hold_no_more_memory_together_than_their_budget():
    """Each request may hold 8 MB of its files in memory as its form is read: 30 requests
    waiting for UploadMemory's room held 225 MiB beside its 256 MiB, 1,024 threads ~9 GiB.
    Past the shared budget a file goes to disk, as past its request's."""
    from web_tier.spool import CappedSpool, RequestSpool, SharedBytes

    memory, disk = SharedBytes(1000), SharedBytes(10_000)
    first, second = RequestSpool(memory, disk, 800), RequestSpool(memory, disk, 800)
    held = CappedSpool(limit=2000, spool=first)
    held.write(os.urandom(700))
    assert (held.in_memory, memory.held, disk.held) == (700, 700, 0)
    data = os.urandom(400)
    moved = CappedSpool(limit=2000, spool=second)
    moved.write(data)  # its own request's budget has room; the shared one has 300 left
    assert (moved.in_memory, memory.held, disk.held) == (0, 700, 400)
    moved.seek(0)
    assert moved.read() == data
    held.close()
    assert memory.held == 0  # given back: the next file is held in memory again
    again = CappedSpool(limit=2000, spool=second)
    again.write(data)
    assert (again.in_memory, memory.held) == (400, 400)
    for spool in (moved, again):
        spool.close()
    assert (memory.held, disk.held) == (0, 0)


def test_a_bulk_requests_stored_chunks_give_their_memory_back_before_the_next_is_stored(
        make_web_app, monkeypatch):
    """A chunk's files, once stored, were held until the whole request ended: the
    form's memory of 1,000 files read in, while the last chunks stored."""
    from web_tier.api import FILES_PER_CHUNK

    web_app = make_web_app(start_background=False, max_files_per_request=3 * FILES_PER_CHUNK)
    svc = services_of(web_app)
    submit, held_at_submit = svc.submitter.submit, []
    monkeypatch.setattr(svc.submitter, "submit", lambda batch, uploads, *rest: held_at_submit.append(
        svc.spool_memory.held) or submit(batch, uploads, *rest))
    files = [(make_image(500 + n, size=(48, 48)), f"f{n}.jpg") for n in range(3 * FILES_PER_CHUNK)]
    response = upload(web_app.test_client(), files)
    assert response.status_code == 202 and len(response.get_json()["items"]) == len(files)
    each = len(files[0][0])
    assert held_at_submit[0] >= 3 * FILES_PER_CHUNK * each * 0.9  # all read in, in memory
    # Each chunk's files closed once stored: the last chunk's alone are held by its turn.
    assert held_at_submit[-1] <= FILES_PER_CHUNK * each * 1.2, (held_at_submit, each)
    assert svc.spool_memory.held == 0


def test_uploads_past_the_disk_budget_are_a_503_to_send_again_and_store_nothing(
        make_web_app, web_aws, monkeypatch):
    from web_tier import spool
    from web_tier.spool import IN_MEMORY_FILE_BYTES

    spool_files, temporary_file = [], tempfile.TemporaryFile

    def recorded(*args, **kwargs):
        spool_files.append(temporary_file(*args, **kwargs))
        return spool_files[-1]

    monkeypatch.setattr(spool.tempfile, "TemporaryFile", recorded)

    app = make_web_app(start_background=False, max_upload_bytes=2_000_000, web_spool_bytes=1_000_000)
    client = app.test_client()
    # Past a file's share of memory: spooled to disk.
    png = make_image(1, size=(460, 460), fmt="PNG")
    assert IN_MEMORY_FILE_BYTES < len(png) < 1_000_000 < 2 * len(png)  # one fits, two do not
    one = [(io.BytesIO(png), "one.png")]
    two = [(io.BytesIO(png), f"{name}.png") for name in ("two", "three")]
    response = client.post("/api/jobs", data={"files": two}, content_type="multipart/form-data")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "no room to hold this upload now; nothing was stored" in response.get_json()["error"]
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount") == 0
    # Given back with the refused request, whose form Werkzeug never finished: its file
    # closed with the request, not left to the garbage collector.
    assert services_of(app).spool_disk.held == 0
    assert len(spool_files) == 1 and spool_files[0].closed
    # One such file fits: taken, and its bytes given back once it is answered.
    response = client.post("/api/jobs", data={"files": one}, content_type="multipart/form-data")
    assert response.status_code == 202 and response.get_json()["items"][0]["filename"] == "one.png"
    assert services_of(app).spool_disk.held == 0


def open_temporary_files() -> set[tuple[str, str]]:
    """Descriptors open on files in the temporary folder, where the spool keeps what is
    past its budget, as (descriptor, target) pairs. A set, not a count: a thread an earlier
    test left may open others meanwhile, and the garbage collector may close an earlier
    test's spool file in the middle of this one (a count was off by one either way)."""
    if not os.path.isdir("/proc/self/fd"):
        return set()
    folder = os.path.join(tempfile.gettempdir(), "")
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since listed
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(folder):
                found.add((fd, target))
    return found


def parsed(
    make_web_app, files: list[bytes], max_file: int = 450 * 1024,
) -> tuple[object, list, int, set[tuple[str, str]]]:
    """The app's request for a POST /api/jobs of `files`, its files parsed, the peak of
    Python's allocations while they were, and the temporary files it opened."""
    import tracemalloc

    from werkzeug.test import EnvironBuilder

    from web_tier.upload_request import UploadRequest

    environ = EnvironBuilder(path="/api/jobs", method="POST", data={
        "files": [(io.BytesIO(data), f"{i}.jpg") for i, data in enumerate(files)]}).get_environ()
    # No listeners: their connections to the embedded AWS open and close descriptors too.
    app = make_web_app(start_background=False, max_upload_bytes=max_file, max_files_per_request=len(files))
    with app.app_context():
        request = UploadRequest(environ)
        # An earlier test's spool file, unreachable but not yet collected, closed in the
        # middle of this parse would free its descriptor and (O_TMPFILE on a tmpfs) its
        # inode, for this parse's own file to take both: the same pair, not counted.
        gc.collect()
        before = open_temporary_files()
        tracemalloc.start()
        try:
            parsed_files = request.files.getlist("files")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return request, parsed_files, peak, open_temporary_files() - before


def test_the_files_of_one_request_hold_no_more_than_their_budget_in_memory(make_web_app):
    """Werkzeug keeps each file under 500 KB in memory: parsing 40 files of 400 KB peaked
    at 18 MB, and a request of 1,000 such files would hold ~400 MB until it ended."""
    from web_tier.spool import IN_MEMORY_REQUEST_BYTES

    payload = os.urandom(400 * 1024)
    request, files, peak, _ = parsed(make_web_app, [payload] * 40)
    assert len(files) == 40 and all(f.stream.read() == payload for f in files)
    # The budget (8 MB) and the parser's buffers: 9.8 MB. tracemalloc counts every thread's
    # allocations, an earlier test's leftovers too: room for them, short of the old 18 MB.
    assert peak < 16 * 1024 * 1024, peak
    held = sum(f.stream.in_memory for f in files)
    assert 0 < held <= IN_MEMORY_REQUEST_BYTES
    request.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_the_files_past_the_budget_share_one_temporary_file_read_from_any_thread(make_web_app):
    """A descriptor held for each: 1,000 files of 16 KB past the budget would hold 1,000,
    and a few such requests leave the web tier none to accept connections."""
    from concurrent.futures import ThreadPoolExecutor

    payloads = [os.urandom(16 * 1024 + i) for i in range(700)]  # 11 MB: past the 8 MB budget
    request, files, _, opened = parsed(make_web_app, payloads, max_file=64 * 1024)
    assert len(opened) == 1, opened
    assert sum(1 for f in files if not f.stream.in_memory) > 100  # on disk, in the one file

    def read(index: int) -> bool:  # read in two steps, while other threads read theirs
        stream = files[index].stream
        stream.seek(0)
        head = stream.read(1000)
        return head + stream.read() == payloads[index]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, range(len(files))))
    request.close()
    assert not opened & open_temporary_files()  # closed with the last of its files


@pytest.mark.parametrize("path", ["/api/jobs", "/"])
def test_an_upload_with_no_room_to_spool_it_is_a_503_to_send_again(make_web_app, web_aws, monkeypatch, path):
    """A full temporary folder (the web unit's /tmp is a tmpfs of half the RAM on Amazon
    Linux 2023) must not give a bare 500 that says neither that nothing was stored nor to
    retry."""
    import errno

    from web_tier import spool

    def disk_full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.os, "pwrite", disk_full)
    client = make_web_app(start_background=False, max_upload_bytes=2_000_000).test_client()
    field = "files" if path == "/api/jobs" else "inputFile"
    response = client.post(path, data={field: (io.BytesIO(os.urandom(600_000)), "big.jpg")},
                           content_type="multipart/form-data")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "no room to hold this upload now; nothing was stored" in response.get_data(as_text=True)
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount") == 0


@pytest.mark.parametrize("method, path", [("GET", "/api/nothing"), ("PUT", "/api/jobs")])
def test_api_refusals_no_route_makes_are_not_cached_either(web_client, method, path):
    response = web_client.open(path, method=method)
    assert response.status_code in (404, 405)
    assert response.headers["Cache-Control"] == "no-store"


def test_tokens_without_a_named_batch_are_refused(web_client, web_aws):
    """A client whose first answer was lost never learns the new batch's id: its resend
    must not make a second batch, the image stored and classified twice."""
    response = upload(web_client, [(make_image(3), "a.jpg")], tokens="a")
    assert response.status_code == 400
    assert "batch_id=<32 hex digits>&create=1" in response.get_json()["error"]
    assert "Contents" not in web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket)


def test_an_idempotency_key_on_the_jobs_api_is_refused_not_ignored(web_client, web_aws):
    """POST /'s header, not ignored here: the same key twice would store the image twice."""
    response = upload(web_client, [(make_image(3), "a.jpg")], headers={"Idempotency-Key": "k1"})
    assert response.status_code == 400
    assert response.get_json()["error"].startswith("Idempotency-Key is for POST /")
    assert "Contents" not in web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket)


def test_a_text_field_past_its_limit_is_refused(web_client):
    """Werkzeug keeps text fields of up to 500 KB each in memory, up to the parts limit:
    two requests of 2,090 such fields take a web worker to 2.1 GB."""
    from web_tier.form import MAX_TEXT_FIELD_BYTES

    assert MAX_TEXT_FIELD_BYTES < 500_000 // 3
    response = upload(web_client, [(make_image(3), "good.jpg")], padding="x" * (MAX_TEXT_FIELD_BYTES + 1))
    assert response.status_code == 413
    assert f"or a text field or a part's headers (its file name) over {MAX_TEXT_FIELD_BYTES} bytes" in (
        response.get_json()["error"])
    # The form's own fields fit with room to spare.
    assert upload(web_client, [(make_image(3), "good.jpg")], tokens="t" * 64, batch_id="b" * 32,
                  create="1").status_code == 202


class CountedBody(io.BytesIO):
    """A request body that counts how much of it the server read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.read_bytes += len(chunk)
        return chunk


def test_a_form_of_many_text_fields_each_within_its_limit_is_refused_as_it_is_read(web_client):
    """Werkzeug bounds each text field and the number of parts, not both together: 2,100
    fields just under the field limit, kept whole, held ~550 MB of one request. The
    form's text is refused past its budget as it comes, not once it is all in memory."""
    from web_tier.form import MAX_TEXT_FIELD_BYTES, form_text_budget

    budget = web_client.application.config["MAX_FORM_TEXT_BYTES"]
    assert budget == form_text_budget(web_client.application.extensions[EXTENSION].settings)
    boundary = "b0undary"
    field = "\xff" * (MAX_TEXT_FIELD_BYTES - 1024)  # each within the field limit
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="pad{i}"\r\n\r\n'.encode()
             + field.encode("latin-1") + b"\r\n" for i in range(40)]
    body = CountedBody(b"".join(parts) + f"--{boundary}--\r\n".encode())
    response = web_client.post("/api/jobs", input_stream=body, content_length=len(body.getvalue()),
                               content_type=f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error.startswith(f"the form's text fields and part headers (file names) hold more than {budget} "
                            "bytes in all"), error
    # Read up to the budget, and a read of Werkzeug's (64 KB) more at most.
    assert body.read_bytes <= budget + MAX_TEXT_FIELD_BYTES < len(body.getvalue()) // 2


def test_a_form_of_many_files_with_long_names_is_refused_as_it_is_read(web_client):
    """A part's headers are kept with its file, its name twice: 2,100 empty files named
    with 60 KB each held ~265 MB of one request."""
    budget = web_client.application.config["MAX_FORM_TEXT_BYTES"]
    boundary = "b0undary"
    name = "a" * 60_000
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i:03d}{name}.jpg"'
             f"\r\nContent-Type: image/jpeg\r\n\r\n\r\n".encode() for i in range(100)]
    body = CountedBody(b"".join(parts) + f"--{boundary}--\r\n".encode())
    response = web_client.post("/api/jobs", input_stream=body, content_length=len(body.getvalue()),
                               content_type=f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 413
    assert "part headers (file names) hold more than" in response.get_json()["error"]
    assert body.read_bytes <= budget + 2 * 65_536 < len(body.getvalue()) // 2  # reads of 64 KB


def test_the_forms_own_text_fits_its_budget_for_a_request_of_the_most_files(web_client):
    """A token of 64 characters for each file the request may carry, a batch id and
    "create": well within the budget."""
    settings = web_client.application.extensions[EXTENSION].settings
    tokens = [f"{i:064d}" for i in range(settings.max_files_per_request)]
    response = upload(web_client, [(make_image(3), "good.jpg")], tokens=tokens, batch_id="b" * 32, create="1")
    # Past the form's text: a token for each file, and one file sent.
    assert response.status_code == 400, response.get_json()
    assert "token" in response.get_json()["error"]


def test_page_inserts_user_text_only_as_text(web_client):
    page = web_client.get("/")
    assert page.status_code == 200
    assert 'id="results"' in page.text
    assert '<script type="module" src="/static/js/main.js"></script>' in page.text
    script = page_script_source()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "textContent" in script
    assert web_client.get("/static/js/main.js").status_code == 200
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]  # no framing
    assert "base-uri 'none'" in page.headers["Content-Security-Policy"]  # not in default-src
    # Not no-referrer, under which Chromium's form POSTs say "Origin: null", taken for
    # cross-site over plain HTTP: the no-JavaScript form would be refused there.
    assert page.headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
def test_a_browsers_upload_sent_from_another_sites_page_is_refused(web_client, web_aws, site):
    """Without an API key, any page a user visits could upload through their browser, to
    a `make run` on their own machine too. Programs send no Sec-Fetch-Site."""
    image = make_image(41)
    refused = upload(web_client, [(image, "a.jpg")], headers={"Sec-Fetch-Site": site})
    assert refused.status_code == 403 and "from another site" in refused.json["error"]
    text = web_client.post("/", data={"inputFile": (io.BytesIO(image), "a.jpg")},
                           content_type="multipart/form-data", headers={"Sec-Fetch-Site": site})
    assert text.status_code == 403 and "from another site" in text.text
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount") == 0
    for own in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        assert upload(web_client, [(image, "a.jpg")], headers=own).status_code == 202


@pytest.mark.parametrize("origin", ["http://attacker.test:8000", "null", "https://localhost:8443",
                                    "http://localhost:8001", "ftp://localhost", "http://localhost:port",
                                    "http://localhost:99999", "http://[::1", "http://[zz]:80"])
def test_a_browsers_upload_without_fetch_metadata_is_judged_by_its_origin(web_client, web_aws, origin):
    """Browsers send Sec-Fetch-Site only to origins they trust: a page on another site
    could upload through a visitor's browser to a web tier reached over plain HTTP by a
    name or a LAN address. Its Origin names the other site."""
    image = make_image(42)
    refused = upload(web_client, [(image, "a.jpg")], headers={"Origin": origin})
    assert refused.status_code == 403 and "from another site (cross-site)" in refused.json["error"]
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount") == 0


def test_a_browsers_upload_from_its_own_origin_is_taken_without_fetch_metadata(make_web_app):
    app = make_web_app(start_background=False, web_host="0.0.0.0")
    client = app.test_client()
    image = make_image(43)
    for host, origin, forwarded in (("10.0.0.5:8000", "http://10.0.0.5:8000", None),
                                    ("Shop.Example", "http://shop.example", None),
                                    ("shop.example:443", "https://shop.example", None),
                                    ("[fd00::5]:8000", "http://[fd00::5]:8000", None),
                                    # behind a proxy that rewrote Host, and said which it was
                                    ("10.0.0.5:8000", "https://shop.example", "shop.example")):
        headers = {"Origin": origin, **({"X-Forwarded-Host": forwarded} if forwarded else {})}
        taken = upload(client, [(image, "a.jpg")], headers=headers, base_url=f"http://{host}")
        assert taken.status_code == 202, (host, origin, taken.json)
    refused = upload(client, [(image, "a.jpg")], headers={"Origin": "http://10.0.0.6:8000"},
                     base_url="http://10.0.0.5:8000")
    assert refused.status_code == 403


@pytest.mark.parametrize("host", ["attacker.test:8000", "10.0.0.5", "localhost.attacker.test",
                                  "127.attacker.test:8000", "127.0.0.1.nip.io"])
def test_an_upload_naming_another_host_is_refused_where_the_web_tier_listens_on_loopback(
        web_client, web_aws, host):
    """A page of another site whose name was made to point at 127.0.0.1 (DNS rebinding)
    is same-origin with it: only the Host header it sends gives it away."""
    refused = upload(web_client, [(make_image(44), "a.jpg")], base_url=f"http://{host}",
                     headers={"Origin": f"http://{host}"})
    assert refused.status_code == 403 and "listens on 127.0.0.1 only" in refused.json["error"]
    # The page can send a proxy's headers too, once its name points here.
    forged = upload(web_client, [(make_image(44), "a.jpg")], base_url=f"http://{host}",
                    headers={"Origin": f"http://{host}", "X-Forwarded-Host": "localhost",
                             "X-Forwarded-For": "127.0.0.1"})
    assert forged.status_code == 403
    for own in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost", "127.0.0.2:8000"):
        assert upload(web_client, [(make_image(44), "a.jpg")], base_url=f"http://{own}",
                      headers={"Origin": f"http://{own}"}).status_code == 202
    # A proxy on this machine passing the browser's Host: over HTTPS browsers say
    # where a request comes from (a page cannot forge that header); a program sends
    # no Origin.
    for proxied in ({"Origin": f"https://{host}", "Sec-Fetch-Site": "same-origin"}, {}):
        taken = upload(web_client, [(make_image(44), "a.jpg")], base_url=f"http://{host}", headers=proxied)
        assert taken.status_code == 202, (proxied, taken.json)
    # Over plain HTTP it keeps its own Host (nginx's default) and says the browser's.
    behind = upload(web_client, [(make_image(44), "a.jpg")], base_url="http://127.0.0.1:8000",
                    headers={"Origin": f"http://{host}", "X-Forwarded-Host": host})
    assert behind.status_code == 202, behind.json


@pytest.mark.parametrize("web_host", ["::1", "[::1]"])
def test_a_web_tier_on_ipv6_loopback_refuses_a_rebinding_page_however_its_address_is_written(
        make_web_app, web_host):
    """WEB_HOST may bracket an IPv6 address (README): "[::1]" not taken for loopback
    would turn the check off."""
    client = make_web_app(start_background=False, web_host=web_host).test_client()
    refused = upload(client, [(make_image(45), "a.jpg")], base_url="http://evil.example:8000",
                     headers={"Origin": "http://evil.example:8000"})
    assert refused.status_code == 403 and "listens on" in refused.json["error"]


def test_page_names_its_results_for_screen_readers_and_keeps_its_password_field_in_a_form(web_client):
    """The list needs an accessible name, and Chromium warns at every load of a password
    field outside a form. The form is never submitted: see js/key.js."""
    page = web_client.get("/").text
    # Named by a heading, which screen reader users move by.
    assert '<ol id="results" class="results" aria-labelledby="results-heading">' in page
    assert re.search(r'<h2 id="results-heading"[^>]*>Results</h2>', page)
    assert re.search(r'<form id="api-key-box"[^>]*>\s*<label for="api-key">', page)


def test_page_tells_its_script_and_its_user_the_server_limits(web_client):
    """The script sends at most this many files a request (a page sending 20 to a server
    taking 5 fails them); the hint must not read "up to 0.0190735 MB each" for 20,000 bytes."""
    page = web_client.get("/").text
    assert 'data-files-per-request="25"' in page
    assert "up to 293 KB each" in page  # web_settings: 300,000 bytes


@pytest.mark.parametrize(("size", "shown"), [(10 * 1024**2, "10 MB"), (20_000, "19.5 KB"),
                                             (500, "500 bytes"), (1536 * 1024**2, "1536 MB")])
def test_readable_size(size, shown):
    from common.image_limits import readable_size

    assert readable_size(size) == shown


# --- API key ---------------------------------------------------------------------------

@pytest.fixture
def keyed_client(make_web_app):
    return make_web_app(start_background=False, api_key="s3cret-key").test_client()


def test_api_key_is_required_when_set(keyed_client):
    image = [(make_image(9), "a.jpg")]
    assert upload(keyed_client, image).status_code == 401
    assert upload(keyed_client, image, headers={"X-API-Key": "wrong"}).status_code == 401
    assert upload(keyed_client, image, headers={"Authorization": "Bearer wrong"}).status_code == 401
    refused = upload(keyed_client, image)
    assert refused.is_json and "API key" in refused.get_json()["error"]
    assert upload(keyed_client, image, headers={"X-API-Key": "s3cret-key"}).status_code == 202
    assert upload(keyed_client, image, headers={"Authorization": "Bearer s3cret-key"}).status_code == 202


def test_api_key_guards_post_root_too(keyed_client):
    response = keyed_client.post("/", data={"inputFile": (io.BytesIO(make_image(10)), "a.jpg")},
                                 content_type="multipart/form-data")
    assert response.status_code == 401
    assert response.mimetype == "text/plain"


def test_a_401_names_the_scheme_that_would_do(keyed_client):
    """RFC 9110: a 401 carries WWW-Authenticate."""
    for response in (upload(keyed_client, [(make_image(9), "a.jpg")]),
                     keyed_client.post("/", data={"inputFile": (io.BytesIO(make_image(10)), "a.jpg")},
                                       content_type="multipart/form-data")):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="imgclass"'
        # ... and the body both headers a key may come in.
        assert "X-API-Key" in response.get_data(as_text=True)
        assert "Authorization: Bearer" in response.get_data(as_text=True)


@pytest.mark.parametrize("url, field", [("/api/jobs", "files"), ("/", "inputFile")])
def test_an_image_sent_as_text_in_a_file_field_is_refused_not_dropped(web_client, url, field):
    """curl -F 'files=<b.png' sends b.png's bytes as a text field: /api/jobs answered 202
    with the other file and said nothing of this one."""
    files = [(io.BytesIO(make_image(11)), "a.jpg")] if url == "/api/jobs" else []
    response = web_client.post(url, data={field: [*files, "\x89PNG..."]}, content_type="multipart/form-data")
    assert response.status_code == 400
    text = response.get_json()["error"] if response.is_json else response.get_data(as_text=True)
    assert f"form field '{field}' holds text, not a file" in text


def post_parts(client, path: str, parts: list[tuple[str, bytes]]):
    """POST a multipart body of these parts (headers, bytes) as it is: the test client's
    own encoding cannot send a part without a filename but with a Content-Type."""
    boundary = "b0undary"
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return client.post(path, data=body + f"--{boundary}--\r\n".encode(),
                       content_type=f"multipart/form-data; boundary={boundary}")


def error_of(response) -> str:
    return response.get_json()["error"] if response.is_json else response.get_data(as_text=True)


# POST / and /api/jobs each with the field it takes its files from.
PATHS_AND_FIELDS = [("/", "inputFile"), ("/api/jobs", "files")]


@pytest.mark.parametrize("path, field", PATHS_AND_FIELDS)
@pytest.mark.parametrize("padding", [0, 200_000], ids=["small", "past-the-text-limit"])
@pytest.mark.parametrize("sent_as", ["text", "a file without its name", "files nested in one part"])
def test_images_sent_as_text_are_told_how_to_send_them_naming_the_paths_own_field(web_client, web_aws, path,
                                                                                 field, padding, sent_as):
    """curl -F 'inputFile=<photo.png' (`<`, not `@`), curl's comma list (-F 'files=@a.png,b.png',
    nested in one multipart/mixed part), Python requests' (None, data, "image/jpeg"): Werkzeug
    keeps each as text. Past 128 KB the 413 must not advise `-F files=@cat.jpg`, a field
    POST / refuses, and say nothing of `<`."""
    image = make_image(5) + b"\0" * padding
    headers = f'Content-Disposition: form-data; name="{field}"'
    if sent_as == "a file without its name":
        headers += "\r\nContent-Type: image/jpeg"
    elif sent_as == "files nested in one part":
        headers += "\r\nContent-Type: multipart/mixed; boundary=inner"
        image = b"".join(b'--inner\r\nContent-Disposition: attachment; filename="%s"\r\n'
                         b"Content-Type: image/jpeg\r\n\r\n%s\r\n" % (name, image)
                         for name in (b"a.jpg", b"b.jpg")) + b"--inner--"
    response = post_parts(web_client, path, [(headers, image)])
    assert response.status_code == (413 if padding else 400)
    error = error_of(response)
    assert f"curl -F {field}=@cat.jpg: @, not <; several files: one -F each, not a comma list" in error
    assert path == "/api/jobs" or "files=@" not in error, error
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


def test_an_empty_text_part_beside_the_files_is_no_reason_to_refuse_them(web_client):
    response = web_client.post("/api/jobs", data={"files": [(io.BytesIO(make_image(12)), "a.jpg"), ""]},
                               content_type="multipart/form-data")
    assert response.status_code == 202 and len(response.get_json()["items"]) == 1


def test_every_error_answer_of_post_api_jobs_has_items_and_rejected(make_web_app, web_settings):
    """A refusal of a file is listed in `rejected`, and so is a refusal of the whole
    request: with only `error` and `filename`, a client reading body["rejected"] fails
    with a KeyError."""
    client = make_web_app(start_background=False).test_client()
    keyed = make_web_app(start_background=False, api_key="s3cret-key").test_client()
    image = [(make_image(13), "a.jpg")]
    # Each with its code, which a program reads rather than the prose.
    too_many = image * (web_settings.max_files_per_request + 1)
    answers = {
        "too many files": ("too_many_files", upload(client, too_many)),
        "an empty form": ("bad_request", client.post("/api/jobs", data={},
                                                     content_type="multipart/form-data")),
        "no file": ("no_file", client.post("/api/jobs", data={"note": "x"},
                                           content_type="multipart/form-data")),
        "a wrong field": ("bad_request", client.post(
            "/api/jobs", data={"file": (io.BytesIO(make_image(13)), "a.jpg")},
            content_type="multipart/form-data")),
        "a bad batch id": ("bad_request", upload(client, image, batch_id="nope")),
        "no such batch": ("unknown_batch", upload(client, image, batch_id="ab" * 16)),
        "no key": ("unauthorized", upload(keyed, image)),
        "another site": ("forbidden", upload(client, image, headers={"Sec-Fetch-Site": "cross-site"})),
        "another method": ("method_not_allowed", client.get("/api/jobs")),
        "a form past its limits": ("request_too_large", post_parts(client, "/api/jobs", [
            ('Content-Disposition: form-data; name="files"', b"x" * 200_000)])),
    }
    for why, (code, response) in answers.items():
        assert response.status_code >= 400 and response.is_json, why
        body = response.get_json()
        assert body["items"] == [] and body["rejected"] == [], (why, body)
        assert body["error"] and "filename" in body, (why, body)
        assert body["code"] == code, (why, body)
    # Other endpoints keep their shape.
    assert client.get(f"/api/jobs/{'ab' * 16}").get_json() == {"error": f"no such batch: {'ab' * 16}",
                                                              "code": "unknown_batch", "filename": None}


@pytest.mark.needs_tools("node", why="it runs a function of the page's script")
def test_the_page_takes_an_error_answer_with_empty_lists_for_a_refusal_of_the_whole_request(web_client):
    """The page told a refusal of the whole request (to show its error, or send a 503's
    chunk again) by its having no `items`: with `items: []` it showed nothing, and the
    chunk's files stayed "uploading" for good."""
    found = re.search(r"\nexport (function refusedWhole\(body\) \{\n.*?\n\}\n)", page_script_source(), re.S)
    assert found, "the page's scripts have no refusedWhole(body)"
    image = [(make_image(14), "a.jpg")]
    answers = {
        "no file": web_client.post("/api/jobs", data={}, content_type="multipart/form-data"),
        "a bad batch id": upload(web_client, image, batch_id="nope"),
        "every file refused": upload(web_client, [(b"not an image", "a.jpg")]),
        "stored": upload(web_client, image),
    }
    bodies = {why: response.get_json() for why, response in answers.items()}
    run = subprocess.run(["node", "-e", found[1] + f"console.log(JSON.stringify(Object.values("
                          f"{json.dumps(bodies)}).concat([null]).map(refusedWhole)))"],
                         capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(run.stdout) == [True, True, False, False, True], (bodies, run.stderr)


@pytest.mark.needs_tools("node", why="it runs a function of the page's script")
def test_the_page_spaces_its_saves_by_how_long_they_take():
    """A save of 10,000 classified rows took 100-120 ms, and came every second while
    they were classified: a tenth of the main thread. Saves now take at most a twentieth
    of it; a small batch's still come a second after its last row is classified."""
    source = (PAGE_SCRIPTS / "session.js").read_text()
    found = [re.search(rf"\n(const {name} = \d[\d_]*;)\n", source)
             for name in ("SAVE_AFTER_MS", "SAVE_TIME_SHARE")]
    function = re.search(r"\nexport (function saveDelayMs\(lastSaveMs\) \{\n.*?\n\}\n)", source, re.S)
    assert all(found) and function, "session.js has no saveDelayMs(lastSaveMs) with its constants"
    script = ("\n".join(m[1] for m in found) + "\n" + function[1]
              + "console.log(JSON.stringify([0, 5, 120].map(saveDelayMs)))")
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(run.stdout) == [1000, 1000, 2400], run.stderr


# A module's imports, as the page's scripts write them: `import { a, b } from "./x.js";`.
IMPORT = re.compile(r'^import \{[^}]*\} from "\./([\w-]+\.js)";$', re.M)


def test_every_module_the_page_imports_is_served_as_javascript(web_client):
    """The page's script is an ES module importing others: one that 404s, or comes with a
    type other than JavaScript's, and the browser runs none of them (the page dead)."""
    page = web_client.get("/")
    first = re.search(r'<script type="module" src="(/static/js/[\w-]+\.js)"></script>', page.text)
    assert first, "the page loads no module"
    seen, to_fetch = set(), [first[1]]
    while to_fetch:
        path = to_fetch.pop()
        if path in seen:
            continue
        seen.add(path)
        response = web_client.get(path)
        assert response.status_code == 200, path
        assert response.mimetype == "text/javascript", (path, response.mimetype)
        folder = path.rsplit("/", 1)[0]
        to_fetch += [f"{folder}/{name}" for name in IMPORT.findall(response.text)]
    # Every module in the folder is one the page loads: none forgotten, none left over.
    assert {f"/static/js/{path.name}" for path in PAGE_SCRIPTS.glob("*.js")} == seen


def test_scripts_are_served_as_javascript_whatever_the_systems_table_says(web_client, monkeypatch):
    """Flask takes a file's type from the system's table: one that says text/plain for
    .js (Windows' registry may) would have browsers refuse the page's modules."""
    monkeypatch.setattr(mimetypes, "guess_type", lambda *args, **kwargs: ("text/plain", None))
    response = web_client.get("/static/js/main.js")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    assert web_client.get("/static/style.css").mimetype == "text/plain"  # others as the table says

def test_status_reports_whether_a_key_is_required(keyed_client, web_client):
    assert keyed_client.get("/api/status").get_json()["api_key_required"] is True
    assert web_client.get("/api/status").get_json()["api_key_required"] is False
    # Reading results and the page needs no key.
    assert keyed_client.get("/").status_code == 200
    # The page shows its box at once: shown after the first status answer, it would push
    # the page down as it loads.
    # Marked as needing JavaScript, which noscript.css hides: without it, a box that
    # nothing reads would show.
    assert '<form id="api-key-box" class="api-key needs-js">' in keyed_client.get("/").text
    assert '<form id="api-key-box" class="api-key needs-js" hidden>' in web_client.get("/").text
    assert ".needs-js { display: none !important; }" in keyed_client.get("/static/noscript.css").text


def test_the_page_knows_the_worker_failures_worth_sending_again_by_the_servers_words():
    """The page offers a dead letter again by its code, and an image gone from the input
    bucket by how its error begins: renamed or reworded on the server alone, the page
    would leave them out without a word."""
    from web_tier.refusals import Code

    root = Path(__file__).parents[2]
    source = page_script_source()
    dead_letter = re.search(r'export const DEAD_LETTER = "(.*?)";', source)
    missing = re.search(r'const INPUT_MISSING = "(.*?)";', source)
    assert dead_letter and missing, "the page's scripts have no DEAD_LETTER or INPUT_MISSING"
    assert dead_letter[1] == Code.DEAD_LETTER
    assert f'job.error = "{missing[1]}"' in (root / "app_tier" / "fetch.py").read_text()


def test_upload_memory_is_taken_whole_and_waited_for_until_given_back_or_the_wait_ends():
    import threading

    from tests.unit.conftest import wait_until
    from web_tier.upload_memory import UploadMemory

    memory = UploadMemory(budget=100, wait_s=30)
    holding, release = threading.Event(), threading.Event()
    got: list[tuple[bool, int]] = []

    def hold(nbytes: int) -> None:
        with memory.taken(nbytes) as room:
            got.append((room, memory.held))
            holding.set()
            release.wait(10)

    first = threading.Thread(target=hold, args=(80,))
    first.start()
    assert holding.wait(10) and memory.held == 80
    second = threading.Thread(target=hold, args=(30,))
    second.start()
    wait_until(lambda: memory.waiting == 1)  # the second waits for room
    release.set()  # the first gives its 80 back: the second, waiting, takes its 30
    first.join(10)
    second.join(10)
    assert got == [(True, 80), (True, 30)] and memory.held == 0  # never both at once
    # More than the whole budget is the whole budget: taken when nothing else is held.
    with memory.taken(10**9) as room:
        assert room and memory.held == 100
        shortened = UploadMemory(budget=100, wait_s=0.05)
        with shortened.taken(60) as a, shortened.taken(60) as b:  # no room, and no wait left
            assert (a, b, shortened.held) == (True, False, 60)
    assert memory.held == 0


def test_upload_memory_is_given_in_turn_and_not_once_closed():
    """A chunk of large files, waiting for most of the budget, must not be passed for ever
    by smaller uploads that each fit; a request waiting for room at a stop must not wait
    out its 30 s, past gunicorn's 5 s of grace, which kills it unanswered."""
    import threading

    from tests.unit.conftest import wait_until
    from web_tier.upload_memory import UploadMemory

    memory = UploadMemory(budget=100, wait_s=30)
    order: list[int] = []

    def take(nbytes: int) -> None:
        with memory.taken(nbytes) as room:
            order.append(nbytes if room else -nbytes)

    with memory.taken(60):
        large = threading.Thread(target=take, args=(50,))
        large.start()
        wait_until(lambda: memory.waiting == 1)
        small = threading.Thread(target=take, args=(30,))  # it fits beside the 60: it waits its turn
        small.start()
        wait_until(lambda: memory.waiting == 2)
        assert order == []
    large.join(10)
    small.join(10)
    assert order == [50, 30] and memory.held == 0

    with memory.taken(100):
        late = threading.Thread(target=take, args=(10,))
        late.start()
        wait_until(lambda: memory.waiting == 1)
        memory.close()
        late.join(5)  # at once, not after its 30 s
        assert not late.is_alive() and order[-1] == -10
    with memory.taken(1) as room:
        assert not room  # nothing is given once closed, even with room


def test_a_request_refused_room_refuses_its_later_chunks_at_once(make_web_app, web_aws, monkeypatch):
    """Each chunk waiting its own turn in vain, a 1,000-file request would hold a thread
    half an hour, to be refused whole."""
    from tests.unit.conftest import services_of
    from web_tier.api import FILES_PER_CHUNK
    from web_tier.upload_memory import UPLOAD_MEMORY_FULL, UploadMemory

    app = make_web_app(start_background=False, max_files_per_request=100)
    memory = services_of(app).upload_memory = UploadMemory(budget=100, wait_s=0.05)
    asked: list[int] = []
    taken = memory.taken
    monkeypatch.setattr(memory, "taken", lambda nbytes: (asked.append(nbytes), taken(nbytes))[1])
    files = [(io.BytesIO(make_image(n)), f"{n}.jpg") for n in range(3 * FILES_PER_CHUNK)]
    with taken(100):
        response = app.test_client().post("/api/jobs", data={"files": files},
                                          content_type="multipart/form-data")
    assert response.status_code == 503
    rejected = response.get_json()["rejected"]
    assert [r["index"] for r in rejected] == list(range(len(files)))
    assert {r["error"] for r in rejected} == {UPLOAD_MEMORY_FULL}
    assert len(asked) == 1


@pytest.mark.parametrize("path", ["/api/jobs", "/"])
def test_an_upload_waiting_for_memory_when_the_web_tier_stops_is_refused_at_once_unstored(
        make_web_app, web_aws, path):
    """Waiting out its 30 s past gunicorn's grace, it would be killed unanswered; and
    given room after the stop, /api/jobs would store it all the same."""
    import threading

    from tests.unit.conftest import services_of, wait_until
    from web_tier.refusals import STOPPING

    app = make_web_app(start_background=False)
    svc = services_of(app)
    field = "files" if path == "/api/jobs" else "inputFile"
    answers = []

    def post() -> None:
        answers.append(app.test_client().post(path, data={field: (io.BytesIO(make_image(6)), "late.jpg")},
                                              content_type="multipart/form-data"))

    with svc.upload_memory.taken(svc.upload_memory.budget):
        poster = threading.Thread(target=post)
        poster.start()
        wait_until(lambda: svc.upload_memory.waiting == 1)
        svc.close()
        poster.join(10)
    assert not poster.is_alive() and answers[0].status_code == 503
    assert STOPPING in answers[0].get_data(as_text=True)
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0


@pytest.mark.parametrize("path", ["/api/jobs", "/"])
def test_an_upload_the_process_has_no_memory_for_now_is_a_503_to_send_again(make_web_app, web_aws, path):
    """Bounded for each request, not for all of them together, 16 files of 9.7 MB would
    hold 156 MB while stored, 20 such requests over 3 GB."""
    from tests.unit.conftest import services_of
    from web_tier.upload_memory import UPLOAD_MEMORY_FULL, UploadMemory

    app = make_web_app(start_background=False)
    memory = services_of(app).upload_memory = UploadMemory(budget=1_000_000, wait_s=0.05)
    client = app.test_client()
    field = "files" if path == "/api/jobs" else "inputFile"
    image = make_image(5)
    with memory.taken(1_000_000 - len(image) + 1):
        response = client.post(path, data={field: (io.BytesIO(image), "cat.jpg")},
                               content_type="multipart/form-data")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert f"cat.jpg: {UPLOAD_MEMORY_FULL}" in response.get_data(as_text=True) or (
        response.get_json()["rejected"][0]["error"] == UPLOAD_MEMORY_FULL)
    assert web_aws.s3.list_objects_v2(Bucket=web_aws.settings.input_bucket).get("KeyCount", 0) == 0
    assert memory.held == 0
    with memory.taken(1_000_000 - len(image)):  # room for it exactly
        response = client.post("/api/jobs", data={"files": (io.BytesIO(image), "cat.jpg")},
                               content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    assert memory.held == 0


def test_a_chunk_takes_the_memory_of_all_its_files_at_once(make_web_app, web_aws, monkeypatch):
    """Some, then waiting for more while holding them, two requests could do to each other."""
    from tests.unit.conftest import services_of
    from web_tier.api import FILES_PER_CHUNK

    app = make_web_app(start_background=False, max_upload_bytes=200_000)
    memory = services_of(app).upload_memory
    taken = memory.taken
    asked: list[int] = []
    monkeypatch.setattr(memory, "taken", lambda nbytes: (asked.append(nbytes), taken(nbytes))[1])
    images = [make_image(n) for n in range(FILES_PER_CHUNK + 2)]
    too_big = os.urandom(300_000)
    files = [(io.BytesIO(data), f"{n}.jpg") for n, data in enumerate(images)]
    files.append((io.BytesIO(too_big), "big.jpg"))
    response = app.test_client().post("/api/jobs", data={"files": files}, content_type="multipart/form-data")
    assert response.status_code == 202
    assert len(response.get_json()["items"]) == len(images)
    # The one too large is counted as what is read of it to refuse it: the limit and a byte.
    chunks = images[:FILES_PER_CHUNK], images[FILES_PER_CHUNK:]
    assert asked == [sum(map(len, chunks[0])), sum(map(len, chunks[1])) + 200_001]
