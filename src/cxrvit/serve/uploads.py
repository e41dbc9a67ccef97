"""Uploads, held in memory only: a capped body reader, an in-memory multipart parser, a memory file.

Starlette's own form parser spools file parts over 1 MB into temporary files on disk; an upload of
a patient's radiograph must not land on disk, so the body is read here under a size cap and the
multipart parts are collected into ``bytes`` with python-multipart's streaming parser.

The decoders (PNG/JPEG via Pillow, DICOM via pydicom) and the QC code take *paths*. Rather than
fork them, :func:`memory_path` hands them an anonymous in-memory file (Linux ``memfd``) under its
``/proc/self/fd`` path: the bytes never reach a file system that outlives the request.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator, Iterator


class UploadError(Exception):
    """A refused upload: ``status`` is the HTTP code, the message is shown to the user as is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_capped(chunks: AsyncIterator[bytes], declared: int | None, cap: int) -> bytes:
    """The whole body, or UploadError(413) as soon as it is (or says it will be) over ``cap`` bytes."""
    too_big = UploadError(413, f"upload too large: the limit is {cap / 2**20:g} MB "
                               "(server option --max-upload-mb)")
    if declared is not None and declared > cap:
        raise too_big  # refused before reading a byte of it
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > cap:  # Content-Length can be absent (chunked) or lie
            raise too_big
    return bytes(buf)


def parse_multipart(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The content of the form field ``field`` (or of the only file part), parsed in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart body without a boundary")
    parts: list[dict] = []
    header: dict = {"field": b"", "value": b""}

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                                        "on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own types for malformed bodies
        raise UploadError(400, f"malformed multipart body: {exc}") from exc
    files = []
    for part in parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disp.get(b"name", b"").decode(errors="replace") == field:
            return bytes(part["data"])
        if b"filename" in disp:
            files.append(part)
    if len(files) == 1:
        return bytes(files[0]["data"])
    raise UploadError(400, f"no file in the upload (send it as the multipart field '{field}')")


@contextlib.contextmanager
def memory_path(data: bytes) -> Iterator[Path]:
    """A path whose content is ``data``, backed by memory; gone when the block exits."""
    if hasattr(os, "memfd_create") and sys.platform.startswith("linux"):
        fd = os.memfd_create("cxrvit-upload", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:
        # No memfd (macOS, Windows): a temporary file that is deleted when closed. Documented in docs/serve.md.
        with tempfile.NamedTemporaryFile(prefix="cxrvit-upload-") as fh:
            fh.write(data)
            fh.flush()
            yield Path(fh.name)
