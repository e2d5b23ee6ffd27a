"""Stop signals, handled where a handler cannot deadlock.

Python runs a signal handler on the main thread between any two bytecodes, even
while the main thread holds a lock: threading.Event's own, say, inside wait().
A handler that takes that lock again (Event.set() does) waits for ever, and so
does a second signal arriving while the first handler is inside set(): seen
with `timeout make run`, which signals make and its whole group at once. So the
handler only writes the signal's number to a pipe, which is safe anywhere, and a
thread of its own reads it and calls back.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_signals(callback: Callable[[int], None], signals: Iterable[int] = STOP_SIGNALS, *,
               then_previous: bool = False) -> None:
    """From now on, call `callback(signal number)` on a thread of its own for each of
    these signals. Call from the main thread, as signal.signal requires.

    With `then_previous`, the handler each signal had before still runs too, on the
    main thread as before (gunicorn's own graceful stop, say), if it was a function:
    the default action (SIG_DFL) or ignoring (SIG_IGN) is not replayed."""
    signals = tuple(signals)
    previous = {signum: signal.getsignal(signum) for signum in signals} if then_previous else {}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def relay() -> None:
        while True:
            received = os.read(read_fd, 64)
            for signum in received:
                callback(signum)

    threading.Thread(target=relay, name="signals", daemon=True).start()

    def handler(signum: int, _frame: FrameType | None) -> None:
        try:
            os.write(write_fd, bytes([signum]))
        except BlockingIOError:
            pass  # 64 KiB of signals not yet read: this one changes nothing
        before = previous.get(signum)
        if callable(before):
            before(signum, _frame)

    for signum in signals:
        signal.signal(signum, handler)
