"""The body of a template push, checked against its bounds.

Wire format (``POST /api/v2/templates``, JSON)::

    {"name": "<template name>", "files": {"<file name>": "<base64 content>", ...}}

A file name is a plain name (no directory, not hidden, no control characters, at most
``MAX_NAME_LENGTH`` characters); at most ``MAX_FILES`` files whose decoded contents add up to at
most ``MAX_TOTAL_BYTES``. Breaking a bound is :class:`PushRejected` with status 413 naming the
bound; any other malformed body is a 400.

:func:`parse_push` is CPU work over up to a few megabytes (JSON, base64), so the API runs it on
a thread, not on the reactor.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

#: Far more than any real template (a handful of .tf files and scripts).
MAX_FILES = 500
#: Decoded bytes of all files together.
MAX_TOTAL_BYTES = 4 * 1024 * 1024
MAX_NAME_LENGTH = 255


class PushRejected(Exception):
    """The push breaks a bound (413) or is malformed (400)."""

    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail


def _bad_name(name: str) -> str | None:
    if not name or len(name) > MAX_NAME_LENGTH:
        return f"1-{MAX_NAME_LENGTH} characters"
    if "/" in name or "\\" in name or name.startswith("."):
        return "a plain file name: no directories, not hidden"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "no control characters (NUL, newline, ...)"
    try:
        name.encode()
    except UnicodeEncodeError:
        return "UTF-8 text"
    return None


def parse_files(raw: Any) -> dict[str, bytes]:
    """``{"file name": base64}`` decoded, or :class:`PushRejected`."""
    if not isinstance(raw, dict) or not raw:
        raise PushRejected(400, "Field 'files' must be an object of file name -> base64 content.")
    if len(raw) > MAX_FILES:
        raise PushRejected(
            413, f"A template may have at most {MAX_FILES} files.", f"this push has {len(raw)}"
        )
    files: dict[str, bytes] = {}
    total = 0
    for name, content in raw.items():
        problem = _bad_name(name)
        if problem is not None:
            raise PushRejected(400, f"Invalid file name {name[:60]!r}.", problem)
        if not isinstance(content, str):
            raise PushRejected(400, f"File {name!r} must be base64 text.")
        # base64 is 4 characters per 3 bytes: refuse before decoding what cannot fit.
        if total + len(content) // 4 * 3 > MAX_TOTAL_BYTES + 3:
            raise PushRejected(
                413, f"A template's files may add up to at most {MAX_TOTAL_BYTES} bytes.",
                f"reached at file {name!r}",
            )
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise PushRejected(400, f"File {name!r} is not valid base64.") from None
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise PushRejected(
                413, f"A template's files may add up to at most {MAX_TOTAL_BYTES} bytes.",
                f"reached at file {name!r}",
            )
        files[name] = data
    return files
