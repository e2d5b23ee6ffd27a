"""Talking to the web tier over HTTP: one image sent per Client.send, and its answer
awaited (from POST /, or from /api/jobs polled or followed as events), within the
request's deadline; sent again while nothing was stored; and what each failed
connection or answer means."""

from __future__ import annotations

import json
import mimetypes
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import DecodeError, NewConnectionError, ProtocolError, ReadTimeoutError

from loadtest.config import Config, LoadTestError
from loadtest.names import name_stem, sendable_name
from loadtest.outcomes import Outcome

CONNECT_TIMEOUT_S = 10.0
# A fresh web tier's first /api/status waits up to 10 s on AWS (web_tier/status.py
# FIRST_READ_WAIT_S): given 2 s, the key check took that silence for "no key needed",
# and every upload was then refused with 401.
STATUS_CHECK_TIMEOUT_S = 12.0
FINAL_STATES = ("done", "failed")


# What a web tier starting or stopping (or a proxy in front of it) answers meanwhile.
RESTARTING_STATUSES = (502, 503, 504)
# A web tier restarting refuses connections for a moment, and one stopping answers
# an upload it did not store with 503 and Retry-After: nothing was stored either way,
# so the upload is sent again (with --api jobs, or --idempotency-keys, also one cut
# off mid-request: its batch id and token, or its key, keep it from being stored
# twice), for up to this long (`make run` restarts a web tier within about a second,
# systemd after its RestartSec).
RESEND_WINDOW_S = 30.0
FIRST_RESEND_DELAY_S = 0.25


class RequestFailed(Exception):
    """One request did not get a usable answer; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def new_session(api_key: str = "") -> requests.Session:
    """A Session that talks straight to the URL it is given.

    No proxy from the environment (the run would measure the proxy) and no
    ~/.netrc credentials: `trust_env` off. It also spares requests reading the
    whole environment on every call, measured at 0.35 ms of the load test's
    ~1.45 ms CPU per upload (300 uploads at concurrency 100, 2 cores).
    """
    session = requests.Session()
    session.trust_env = False
    if api_key:
        session.headers["X-API-Key"] = api_key
    return session


def connection_error(exc: requests.ConnectionError, url: str) -> str:
    """What went wrong with the connection, in one line: whether it could not be made
    (nothing listening, a wrong address) or was closed before the answer came (the
    web tier stopped or crashed mid-request, the image perhaps already queued)."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"cannot connect to {url}: no connection within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, requests.exceptions.SSLError):
        # Said to be closed, with "the image may be stored", it sent nothing (reviewer).
        return (f"cannot connect to {url}: the TLS handshake failed (https:// to a plain HTTP port, "
                "or a certificate not trusted)")
    text = str(exc)
    # urllib3's message nests three exceptions; the errno text is the useful part.
    errno_text = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if any(sign in text for sign in ("NewConnectionError", "Failed to establish", "Failed to resolve")):
        return f"cannot connect to {url}" + (f": {errno_text[0]}" if errno_text else "")
    why = errno_text[0] if errno_text else "closed without a response"
    return f"the connection to {url} closed before the answer came: {why}"


def refused(exc: BaseException) -> bool:
    """Whether a connection error is a refused connection (nothing listening), which
    sent nothing; urllib3 keeps the OS's error a few causes down."""
    return _in_chain(exc, ConnectionRefusedError)


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc`, or an error it was raised from or wraps, is a `kind`."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, kind):
            return True
        links = (error.__cause__, error.__context__, getattr(error, "reason", None), *error.args)
        pending += [link for link in links if isinstance(link, BaseException)]
    return False


def never_connected(exc: BaseException) -> bool:
    """Whether a connection error came before any connection was made, so nothing was
    sent: refused, not made within CONNECT_TIMEOUT_S (a ConnectTimeout, which is a
    Timeout too, was reported as the whole --timeout and never sent again), or a name
    that did not resolve (counted sent: reviewer)."""
    return isinstance(exc, requests.ConnectTimeout) or refused(exc) or _in_chain(exc, NewConnectionError)


def not_stored(resp: requests.Response) -> bool:
    """A 503 with Retry-After: the web tier stored nothing and says to send again
    (without it, a 503 may mean the image is queued: sent again, it would be classified twice)."""
    return resp.status_code == 503 and "Retry-After" in resp.headers


def retry_after_s(resp: requests.Response, default: float) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:  # an HTTP date: not what the web tier sends
        return default


def check_reachable(url: str) -> None:
    """Fail at once when nothing listens at `url` (a typo, a stack not started), rather
    than send every request into the resend window."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise LoadTestError(f"cannot connect to {url}: {why} (is the web tier running?)") from exc


def api_key_required(url: str) -> bool:
    """Whether the web tier at `url` says (in its /api/status) that uploads need an API
    key. Unknown (no such page, no answer in time, another server) counts as no:
    the run's failures then say why."""
    with new_session() as session:
        try:
            resp = session.get(f"{url}/api/status", timeout=STATUS_CHECK_TIMEOUT_S, allow_redirects=False)
            status = resp.json() if resp.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return False
    return isinstance(status, dict) and status.get("api_key_required") is True


# Failures among which web_tier_restarting picks the ones that are no answer yet.
MAYBE_RESTARTING = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, RequestFailed)


def web_tier_restarting(exc: Exception) -> bool:
    """Whether a failed GET of an accepted item means only that the web tier is
    restarting (refused, cut off, 502-504): the item is kept, and the next one answers."""
    if isinstance(exc, RequestFailed):
        return exc.status in RESTARTING_STATUSES
    return isinstance(exc, MAYBE_RESTARTING)


def _error_text(resp: requests.Response) -> str:
    """The reason a JSON error answer gives (its "error", after the "filename" it names,
    as POST / words its errors), else its text, shortened."""
    try:
        answer = resp.json()
        reason, filename = answer.get("error"), answer.get("filename")
    except (ValueError, AttributeError):
        reason = filename = None
    if not (isinstance(reason, str) and reason):
        return _short(resp.text)
    if isinstance(filename, str) and filename and not reason.startswith(f"{filename}: "):
        # POST / names the file in its errors; --jobs failures did not, and said
        # nothing of which images failed (reviewer).
        reason = f"{filename}: {reason}"
    return _short(reason)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# No answer of the web tier's is near this: POST / answers one line, GET /api/jobs/<id>
# a batch of at most MAX_FILES_PER_REQUEST items (1,000, ~500 KB), an event one item.
MAX_ANSWER_BYTES = 16 * 1024**2
MAX_EVENT_LINE_BYTES = 1024**2
_READ_BYTES = 64 * 1024


def _chunks_within(resp: requests.Response, deadline: float) -> Iterator[bytes]:
    """A streamed answer's bytes as they come, raising requests.Timeout once `deadline`
    passes. requests' read timeout bounds each read, not the answer: a server sending a
    byte a second held a request for ever, past --timeout (reviewer). urllib3's errors
    are raised as requests' (as requests itself does)."""
    while True:
        if time.monotonic() >= deadline:
            raise requests.Timeout()
        try:
            chunk = resp.raw.read1(_READ_BYTES, decode_content=True)
        except ReadTimeoutError as exc:
            raise requests.ReadTimeout(exc) from exc
        except DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        except (ProtocolError, OSError) as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        if not chunk:
            return
        yield chunk


def read_within(resp: requests.Response, deadline: float) -> requests.Response:
    """`resp` (sent with stream=True), its body read whole by `deadline` (else
    requests.Timeout, and the connection dropped), as requests would have read it."""
    body = bytearray()
    try:
        for chunk in _chunks_within(resp, deadline):
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise RequestFailed(f"an answer of more than {MAX_ANSWER_BYTES} bytes: not the web tier's",
                                    resp.status_code)
    except BaseException:
        resp.close()
        raise
    resp._content = bytes(body)  # what .content, .text and .json() read
    return resp


def lines_within(resp: requests.Response, deadline: float) -> Iterator[str]:
    """An event stream's lines as they come, by `deadline` (see _chunks_within). A line
    past MAX_EVENT_LINE_BYTES is no event of the web tier's: a line that never ended kept
    a whole core busy re-splitting it (reviewer)."""
    pending = b""
    for chunk in _chunks_within(resp, deadline):
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) > MAX_EVENT_LINE_BYTES:
            raise RequestFailed(f"an event line of more than {MAX_EVENT_LINE_BYTES} bytes: "
                                "not the web tier's")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", errors="replace")


class Client:
    """Sends one image per call; each worker thread keeps its own Session.

    A Session per thread reuses that thread's keep-alive connection for every
    request it sends, and Sessions are not documented as thread-safe.
    """

    def __init__(self, config: Config, stop: threading.Event, abandon: threading.Event | None = None) -> None:
        self.config = config
        self.stop = stop  # set: send nothing new (the first Ctrl-C); requests in flight go on
        # Set: stop waiting for the requests in flight (the second Ctrl-C, or the run over).
        self.abandon = abandon or threading.Event()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        # Since when every connection has been refused, or not made in time (None: the
        # last was made, or the web tier answered something since): a
        # refused request is sent again until RESEND_WINDOW_S from then, not for a
        # window of its own (a dead server took 50 minutes to report at -c 10).
        self._refused_since: float | None = None

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = new_session(self.config.api_key)
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def send(self, index: int, path: Path, t0: float) -> Outcome:
        """Send `path` once and wait for its answer; never raises for a failed request."""
        start = time.monotonic()
        outcome = Outcome(index=index, file=sendable_name(path), started_s=start - t0)
        deadline = start + self.config.timeout
        try:
            if self.config.api == "jobs":
                self._via_jobs(path, deadline, outcome)
            else:
                self._via_form(path, deadline, outcome)
        except RequestFailed as exc:
            outcome.error, outcome.status = str(exc), exc.status or outcome.status
        except requests.ConnectionError as exc:  # before Timeout: a ConnectTimeout is both
            outcome.error = connection_error(exc, self.config.url)
            if outcome.resent:
                outcome.error += f" (sent {outcome.resent} times more, for up to {RESEND_WINDOW_S:g} s)"
            elif (self.config.api == "form" and not self.config.idempotency_keys
                  and not outcome.error.startswith("cannot connect")):
                outcome.error += " (the image may be stored; --idempotency-keys sends such uploads again)"
        except requests.Timeout:
            outcome.error = f"timeout after {self.config.timeout:g} s"
            if outcome.reached and outcome.status is None:
                # Given up on while the upload waited for its answer: the web tier may have
                # stored it and may still classify it, as with a connection cut at that point
                # (a paused web tier stored and answered all 8 said only "timeout": reviewer).
                # Not "--idempotency-keys sends it again": no upload is sent again past --timeout.
                outcome.error += " (the image may be stored)"
        except requests.RequestException as exc:
            outcome.error = f"{type(exc).__name__}: {_short(str(exc))}"
        except OSError as exc:  # the image could not be read
            outcome.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a failed request, whatever it was: never the whole run
            outcome.error = f"{type(exc).__name__}: {_short(str(exc))}"
        outcome.latency_s = time.monotonic() - start
        return outcome

    def _timeout(self, deadline: float) -> tuple[float, float]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise requests.Timeout()
        return (min(CONNECT_TIMEOUT_S, remaining), remaining)

    def _upload(self, path: Path) -> tuple[str, bytes, str]:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return (sendable_name(path), path.read_bytes(), mime)

    def server_answered(self) -> None:
        """The web tier answered something (any HTTP response, to any request, the status
        poller's too): it is up, so a refusal from now on starts a new window. Only POST
        answers counted, and a POST / waits minutes for one under a backlog: a second
        brief outage 30 s after a first failed its uploads at once, none sent again."""
        self._refused_for(False)

    def _refused_for(self, refused_now: bool) -> float:
        """Note whether the server refused this connection; how long it has refused
        every one since (0 once one was not refused)."""
        now = time.monotonic()
        with self._lock:
            if not refused_now:
                self._refused_since = None
                return 0.0
            if self._refused_since is None:
                self._refused_since = now
            return now - self._refused_since

    def _post(self, endpoint: str, files: dict, deadline: float, outcome: Outcome,
              form: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> requests.Response:
        """POST an upload; sent again while nothing was stored, or, with a `form` naming a
        batch and a token or an Idempotency-Key in `headers`, after any connection
        failure (see RESEND_WINDOW_S)."""
        stored_once = form is not None or headers is not None
        # The window runs from the first failed attempt, not from the first send: a POST /
        # waits for its classification, which under a backlog takes longer than the
        # window, and one cut off after that was never sent again (explorer).
        give_up: float | None = None
        delay = FIRST_RESEND_DELAY_S
        while True:
            failure: requests.ConnectionError | None = None
            refused_since: float | None = None  # since when every connection has been refused
            # Outside the try: its Timeout, the deadline past before sending, sent nothing, and was
            # counted as reached by `except Exception` below (--timeout 0.001: reviewer).
            timeout = self._timeout(deadline)
            try:
                # Only ever talk to the URL we were given: no redirects.
                resp = read_within(self._session().post(
                    f"{self.config.url}{endpoint}", files=files, data=form, headers=headers,
                    timeout=timeout, allow_redirects=False, stream=True), deadline)
            except requests.ConnectionError as exc:
                was_refused = never_connected(exc)
                if not was_refused and not isinstance(exc, requests.exceptions.SSLError):
                    outcome.reached = True
                if not was_refused and not stored_once:
                    raise  # cut off mid-request: the image may be stored already
                failure, wait = exc, delay
                if was_refused:
                    refused_since = time.monotonic() - self._refused_for(True)
            except Exception:
                outcome.reached = True  # connected: its answer timed out, or was not the web tier's
                raise
            else:
                outcome.reached = True
                self.server_answered()
                if resp.status_code in RESTARTING_STATUSES:
                    # A web tier stopping closes each connection after its answer: kept for
                    # the next request, it could be closed under it, the request unanswered
                    # and, without a key, not sent again (explorer).
                    self._session().close()
                if not not_stored(resp):
                    return resp
                wait = retry_after_s(resp, delay)
            now = time.monotonic()
            if give_up is None:  # the first failed attempt
                give_up = min(deadline, now + RESEND_WINDOW_S)
            if refused_since is not None:
                # One window for all: since the server began refusing every connection.
                give_up = min(give_up, refused_since + RESEND_WINDOW_S)
            if self.stop.is_set() or now + wait >= give_up:
                if failure is not None:
                    raise failure
                return resp
            outcome.resent += 1
            self.stop.wait(wait)
            delay = min(2 * delay, 2.0)

    def _via_form(self, path: Path, deadline: float, outcome: Outcome) -> None:
        key = {"Idempotency-Key": str(uuid.uuid4())} if self.config.idempotency_keys else None
        resp = self._post("/", {"inputFile": self._upload(path)}, deadline, outcome, headers=key)
        outcome.status = resp.status_code
        body = resp.text.strip()
        outcome.untrained = resp.headers.get("X-Model-Untrained", "").strip().lower() == "true"
        batch_id, item_id = resp.headers.get("X-Batch-Id"), resp.headers.get("X-Item-Id")
        if resp.status_code in (503, 504) and batch_id and item_id:
            # Stored and queued, its answer not waited for (a web tier stopping, or past
            # RESULT_TIMEOUT): the answer says where its result will be, so follow it there.
            outcome.via = f"/api/jobs/{batch_id}, after HTTP {resp.status_code}"
            self._take_item(self._wait_poll(self._session(), batch_id, item_id, deadline), path, outcome)
            return
        if resp.status_code != 200:
            raise RequestFailed(f"HTTP {resp.status_code}: {_short(body)}", resp.status_code)
        # Labels never hold ':', file names might: split at the last one. The answer is
        # one line: a page, or another server's XML, that happens to hold a colon is not one.
        name, colon, label = body.rpartition(":")
        if not colon or not label or "\n" in body or "\r" in body:
            raise RequestFailed(f"not a classification answer: {_short(body)!r} "
                                "(expected one line, <name>:<label>)", 200)
        outcome.answer_name, outcome.label = name, label

    def _via_jobs(self, path: Path, deadline: float, outcome: Outcome) -> None:
        session = self._session()
        once = {"batch_id": uuid.uuid4().hex, "create": "1", "tokens": "0"}  # stored once, however often sent
        resp = self._post("/api/jobs", {"files": self._upload(path)}, deadline, outcome, once)
        outcome.status = resp.status_code
        if resp.status_code not in (200, 201, 202):
            raise RequestFailed(f"HTTP {resp.status_code}: {_error_text(resp)}", resp.status_code)
        try:
            batch = resp.json()
            batch_id, item_id = batch["batch_id"], batch["items"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestFailed(f"malformed job answer {_short(resp.text)!r}", resp.status_code) from exc

        if self.config.wait == "sse":
            item = self._wait_sse(session, batch_id, item_id, deadline)
        else:
            item = self._wait_poll(session, batch_id, item_id, deadline)
        self._take_item(item, path, outcome)

    @staticmethod
    def _take_item(item: dict, path: Path, outcome: Outcome) -> None:
        """The outcome of an item read from /api/jobs, once finished."""
        outcome.untrained = bool(item.get("untrained"))
        if item.get("state") != "done":
            # Named as POST / names the file of an image the worker could not classify.
            name = str(item.get("filename") or sendable_name(path))
            why = _short(f"{name}: {item.get('error')}")
            raise RequestFailed(f"item failed: {why}", outcome.status)
        # The web tier's own stem, as POST / answers: image_key would also cut at a
        # backslash, which is part of the name here.
        outcome.answer_name = name_stem(str(item.get("filename") or sendable_name(path)))
        outcome.label = str(item.get("label"))
        outcome.by_id = True

    def _fetch_item(self, session: requests.Session, batch_id: str, item_id: str, deadline: float) -> dict:
        resp = read_within(session.get(f"{self.config.url}/api/jobs/{batch_id}", stream=True,
                                       timeout=self._timeout(deadline), allow_redirects=False), deadline)
        self.server_answered()
        if resp.status_code != 200:
            # The server's reason too: a 404 "no such batch" after the stack was restarted.
            raise RequestFailed(f"GET /api/jobs/{batch_id}: HTTP {resp.status_code}: {_error_text(resp)}",
                                resp.status_code)
        try:
            items = resp.json()["items"]
            return next(i for i in items if i.get("id") == item_id)
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            raise RequestFailed(f"GET /api/jobs/{batch_id}: item {item_id} missing") from exc

    def _wait_poll(self, session: requests.Session, batch_id: str, item_id: str, deadline: float) -> dict:
        # Start quick (a warm fleet answers in well under a second), then back off
        # so a thousand waiting requests do not flood the web tier.
        delay = 0.05
        unanswered: Exception | None = None  # the last poll the web tier did not answer
        while True:
            try:
                item = self._fetch_item(session, batch_id, item_id, deadline)
                unanswered = None
            except MAYBE_RESTARTING as exc:
                if not web_tier_restarting(exc):
                    raise
                if (isinstance(exc, requests.ConnectionError) and never_connected(exc)
                        and self._refused_for(True) >= RESEND_WINDOW_S):
                    # A web tier gone for good, as an upload refused as long finds: each
                    # request in flight waited out its whole --timeout (330 s) to say so.
                    why = connection_error(exc, self.config.url)
                    raise RequestFailed(f"GET /api/jobs/{batch_id}: {why}; "
                                        f"every connection refused for {RESEND_WINDOW_S:g} s") from exc
                # The web tier restarting (refused, cut off, a 502, 503 or 504): the item was
                # accepted and is kept in S3, and a new web tier answers for it.
                item, delay, unanswered = {}, max(delay, 0.5), exc
            if item.get("state") in FINAL_STATES:
                return item
            if time.monotonic() + delay >= deadline:
                if unanswered is not None:
                    why = (connection_error(unanswered, self.config.url)
                           if isinstance(unanswered, requests.ConnectionError) else _short(str(unanswered)))
                    raise RequestFailed(f"no answer in time; the last poll: {why}")
                raise requests.Timeout()
            if self.abandon.wait(delay):
                raise RequestFailed("abandoned: the run stopped waiting for it")
            delay = min(delay * 1.5, 1.0)

    def _wait_sse(self, session: requests.Session, batch_id: str, item_id: str, deadline: float) -> dict:
        url = f"{self.config.url}/api/jobs/{batch_id}/events"
        try:
            return self._wait_stream(session, url, batch_id, item_id, deadline)
        except MAYBE_RESTARTING as exc:
            if not web_tier_restarting(exc):
                raise
            # The web tier restarting: polling waits for the next one (see _wait_poll).
            return self._wait_poll(session, batch_id, item_id, deadline)

    def _wait_stream(self, session: requests.Session, url: str, batch_id: str, item_id: str,
                     deadline: float) -> dict:
        with session.get(url, stream=True, timeout=self._timeout(deadline), allow_redirects=False) as resp:
            self.server_answered()
            if resp.status_code == 200:
                item = self._follow_events(resp, session, batch_id, item_id, deadline)
                if item is not None:
                    return item
            elif resp.status_code in RESTARTING_STATUSES:
                # The web tier caps the event streams open at once and answers the rest
                # 503 "poll GET /api/jobs/<id> instead" (and one restarting, 502 to 504):
                # the item itself is fine. The short body is read so the connection is
                # kept for the polls.
                read_within(resp, deadline)
            else:
                read_within(resp, deadline)  # an error's body too: by the deadline
                raise RequestFailed(f"GET /api/jobs/{batch_id}/events: HTTP {resp.status_code}: "
                                    f"{_error_text(resp)}", resp.status_code)
        # No stream to spare, or the server closed it early: poll instead.
        return self._wait_poll(session, batch_id, item_id, deadline)

    def _follow_events(
        self, resp: requests.Response, session: requests.Session, batch_id: str, item_id: str, deadline: float
    ) -> dict | None:
        """The item once an event says it finished; None if the stream ends first."""
        # The stream is open, so no event can be missed from here on; the item
        # may already have finished before it opened, though.
        item = self._fetch_item(session, batch_id, item_id, deadline)
        if item.get("state") in FINAL_STATES:
            return item
        for line in lines_within(resp, deadline):
            if self.abandon.is_set():
                raise RequestFailed("abandoned: the run stopped waiting for it")
            if time.monotonic() >= deadline:
                raise requests.Timeout()
            if not line or not line.startswith("data:"):
                continue
            event = _parse_event(line[5:])
            if event.get("id") == item_id and event.get("state") in FINAL_STATES:
                return event
            # An event we cannot read on its own is still a sign to look again.
            item = self._fetch_item(session, batch_id, item_id, deadline)
            if item.get("state") in FINAL_STATES:
                return item
        return None


def _parse_event(data: str) -> dict:
    try:
        event = json.loads(data)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}
