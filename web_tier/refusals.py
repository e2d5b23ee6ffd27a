"""A refused request: its HTTP status, the reason, and the file it concerns."""

from __future__ import annotations


class UploadError(Exception):
    """A refused upload: HTTP status, the reason, and the file it concerns."""

    def __init__(self, status: int, reason: str, filename: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.filename = filename

    def to_json(self) -> dict[str, object]:
        return {"error": self.reason, "filename": self.filename}

    def to_text(self) -> str:
        return about(self.filename, self.reason)


def about(filename: str | None, text: str) -> str:
    """`<file name>: <text>`, or the text alone for no file: how POST / says a refusal."""
    return f"{filename}: {text}" if filename else text


def readable_size(n: int) -> str:
    """10485760 -> '10 MB', 20000 -> '19.5 KB' (binary units, as MAX_UPLOAD_BYTES' default)."""
    for unit, size in (("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} bytes"


def too_large(limit: int) -> str:
    """Why a file over the size limit is refused, in the page's units and exactly."""
    return f"file is larger than the limit of {readable_size(limit)} ({limit} bytes)"
