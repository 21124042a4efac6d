"""The files a message template attaches: resolved against the template's directory, cached.

A template's ``Attachment`` lines name files relative to the template file's directory. A path
that comes from a CSV cell (a templated ``Attachment`` value) must stay inside that directory, so
a cell cannot attach arbitrary files. Files are read once and kept in a bounded cache, since a
campaign attaches the same few files to every message.
"""

from __future__ import annotations

import mimetypes
import os
from collections import OrderedDict
from dataclasses import dataclass

from twistmail.errors import RowError

__all__ = ["Attachment", "AttachmentFiles"]

_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Attachment:
    """One file to attach, read, with the MIME type guessed from its name."""

    data: bytes
    maintype: str
    subtype: str
    filename: str


class AttachmentFiles:
    """The attachments of one template: files under ``base_dir``, read through a cache."""

    def __init__(self, base_dir: str | os.PathLike[str], cache_bytes: int = _CACHE_BYTES) -> None:
        self._base = os.path.normpath(os.path.abspath(base_dir))
        self._limit = cache_bytes
        self._cache: OrderedDict[str, Attachment] = OrderedDict()
        self._cache_bytes = 0

    def get(self, path: str, *, templated: bool) -> Attachment:
        """The file at ``path`` (relative to the base directory).

        Raises :class:`RowError` when it cannot be read, or when a ``templated`` path (one a
        CSV cell may have chosen) leads outside the base directory.
        """
        base = self._base
        full = os.path.normpath(os.path.join(base, path))
        if templated and os.path.commonpath([base, full]) != base:
            raise RowError(
                "Attachment", f"attachment path {path!r} leads outside the template's directory"
            )
        cached = self._cache.get(full)
        if cached is not None:
            self._cache.move_to_end(full)
            return cached
        try:
            with open(full, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            raise RowError("Attachment", f"attachment file not found: {full}") from None
        except OSError as exc:
            raise RowError("Attachment", f"cannot read attachment {full}: {exc.strerror}") from None
        mime, encoding = mimetypes.guess_type(full, strict=False)
        if mime is None or encoding is not None:
            mime = "application/octet-stream"
        maintype, subtype = mime.split("/", 1)
        attachment = Attachment(data, maintype, subtype, os.path.basename(full))
        if len(data) <= self._limit:
            self._cache[full] = attachment
            self._cache_bytes += len(data)
            while self._cache_bytes > self._limit:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= len(evicted.data)
        return attachment
