"""The files a message template attaches: resolved against the template's directory, cached.

A template's ``Attachment`` lines name files relative to the template file's directory. A path
that comes from a CSV cell (a templated ``Attachment`` value) must stay inside that directory, so
a cell cannot attach arbitrary files. Files are read once and kept in a bounded cache, since a
campaign attaches the same few files to every message.

A template stored in a queue (a campaign any worker renders) reads no file at all: its
``Attachment`` lines name files uploaded with the campaign (:class:`StoredAttachments`); a name
not uploaded is refused. :class:`UploadingAttachments` reads the files a local template names,
as usual, and keeps each one read to be uploaded under the name the template gave it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

from twistmail.errors import RowError
from twistmail.mime import Attachment, dot_stuffed, encode_part

__all__ = [
    "Attachment",
    "AttachmentFiles",
    "AttachmentSource",
    "StoredAttachments",
    "UploadingAttachments",
    "attachment_name",
    "dot_stuffed",
    "encode_part",
]

_CACHE_BYTES = 64 * 1024 * 1024


class AttachmentFiles:
    """The attachments of one template: files under ``base_dir``, read through a cache."""

    def __init__(self, base_dir: str | os.PathLike[str], cache_bytes: int = _CACHE_BYTES) -> None:
        self._base = os.path.normpath(os.path.abspath(base_dir))
        self._limit = cache_bytes
        self._cache: OrderedDict[str, Attachment] = OrderedDict()
        self._cache_bytes = 0
        # Each cached file's MIME part, encoded once, and dot-stuffed for the wire (the
        # Attachment kept beside them keeps its id unique).
        self._parts: dict[int, tuple[Attachment, bytes, bytes]] = {}

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
        attachment = Attachment.named(full, data)
        if len(data) <= self._limit:
            self._cache[full] = attachment
            self._cache_bytes += len(data)
            while self._cache_bytes > self._limit:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= len(evicted.data)
                self._parts.pop(id(evicted), None)
        return attachment

    def part(self, attachment: Attachment) -> tuple[bytes, bytes]:
        """``attachment`` as a MIME part, the bytes the email package writes for it inside a
        multipart message (its headers, a blank line, base64 lines, CRLF line ends), and the
        same dot-stuffed for SMTP DATA (a line starting with "." gets another). Both are ASCII:
        policy.SMTP encodes a non-ASCII file name.

        Encoded once per cached file, so a campaign attaching one file encodes it once.
        """
        cached = self._parts.get(id(attachment))
        if cached is not None and cached[0] is attachment:
            return cached[1], cached[2]
        encoded = encode_part(attachment)
        if not encoded.isascii():  # the direct renderer counts on it, to scan no part per row
            raise RowError("Attachment", f"{attachment.filename!r} cannot be encoded in ASCII")
        stuffed = dot_stuffed(encoded)
        # Kept while its file is cached (evicted with it), so at most 4/3 of the cache's size.
        if any(cached is attachment for cached in self._cache.values()):
            self._parts[id(attachment)] = (attachment, encoded, stuffed)
        return encoded, stuffed


class AttachmentSource(Protocol):
    """Where a template's ``Attachment`` lines find their files."""

    def get(self, path: str, *, templated: bool) -> Attachment:
        """The attachment ``path`` names (``templated``: a CSV cell chose it); RowError if
        there is none or it may not be used."""

    def part(self, attachment: Attachment) -> tuple[bytes, bytes]:
        """``attachment`` as a MIME part, and the same dot-stuffed (see
        :meth:`AttachmentFiles.part`)."""


def attachment_name(path: str) -> str:
    """The name a file of an ``Attachment`` line is uploaded and looked up under."""
    return os.path.normpath(path.strip())


class _Parts:
    """Each attachment's MIME part, encoded once."""

    def __init__(self) -> None:
        self._parts: dict[int, tuple[Attachment, bytes, bytes]] = {}

    def part(self, attachment: Attachment) -> tuple[bytes, bytes]:
        cached = self._parts.get(id(attachment))
        if cached is not None and cached[0] is attachment:
            return cached[1], cached[2]
        encoded = encode_part(attachment)
        if not encoded.isascii():
            raise RowError("Attachment", f"{attachment.filename!r} cannot be encoded in ASCII")
        stuffed = dot_stuffed(encoded)
        self._parts[id(attachment)] = (attachment, encoded, stuffed)
        return encoded, stuffed


class StoredAttachments(_Parts):
    """The files uploaded with a stored campaign, by the name its template gives them; no
    file of the machine rendering it is ever read."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        super().__init__()
        self._attachments = {name: Attachment.named(name, data) for name, data in files.items()}

    def get(self, path: str, *, templated: bool) -> Attachment:
        """The uploaded file named ``path``; RowError if none was uploaded under that name."""
        found = self._attachments.get(attachment_name(path))
        if found is None:
            raise RowError(
                "Attachment",
                f"attachment {path!r} was not uploaded with the campaign (a stored campaign's "
                "template reads no file path)",
            )
        return found


class UploadingAttachments:
    """The files under ``base_dir`` (as :class:`AttachmentFiles` reads them), each one read
    kept in :attr:`new` under its :func:`attachment_name` until taken."""

    def __init__(self, base_dir: str | os.PathLike[str]) -> None:
        self._files = AttachmentFiles(base_dir)
        self._seen: set[str] = set()
        self.new: dict[str, bytes] = {}
        """Files read since the last :meth:`take`, by name."""

    def get(self, path: str, *, templated: bool) -> Attachment:
        """The file at ``path``, as :meth:`AttachmentFiles.get` gives it."""
        attachment = self._files.get(path, templated=templated)
        name = attachment_name(path)
        if name not in self._seen:
            self._seen.add(name)
            self.new[name] = attachment.data
        return attachment

    def part(self, attachment: Attachment) -> tuple[bytes, bytes]:
        """As :meth:`AttachmentFiles.part`."""
        return self._files.part(attachment)

    def take(self) -> dict[str, bytes]:
        """The files read since the last call, by name."""
        new, self.new = self.new, {}
        return new
