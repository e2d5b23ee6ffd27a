"""The request class of the app: how an upload's form is read as it arrives."""

from __future__ import annotations

from flask import Request, current_app

from web_tier.multipart import TextCappedFormDataParser
from web_tier.services import services
from web_tier.spool import CappedSpool, RequestSpool


class UploadRequest(Request):
    """A request whose uploaded files are spooled only up to the size limit, in memory
    only up to a budget shared by all its files and one shared by every request's, on
    disk only up to one shared by every request's (web_tier/spool.py), and whose form's
    text is refused past a budget for all its fields (web_tier/multipart.py)."""

    _spool: RequestSpool | None = None
    form_data_parser_class = TextCappedFormDataParser

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None):
        if self._spool is None:
            svc = services()
            self._spool = RequestSpool(svc.spool_memory, svc.spool_disk)
        return CappedSpool(current_app.config["MAX_FILE_BYTES"], self._spool)

    def close(self) -> None:
        super().close()
        if self._spool is not None:
            self._spool.close()
