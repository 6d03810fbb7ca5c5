"""A ZIP archive written to a stream as it is built, in constant memory."""

from __future__ import annotations

import io
import time
import zipfile


class _Sink(io.RawIOBase):
    """Collects what zipfile writes until the caller takes it; cannot seek, so zipfile
    writes data descriptors after each member instead of going back."""

    def __init__(self):
        self._chunks: list[bytes] = []
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks = []
        return out


class ZipStream:
    """zipfile on a sink: write a member's chunks, and take() the bytes to send after each."""

    def __init__(self):
        self._sink = _Sink()
        self._zip = zipfile.ZipFile(self._sink, mode="w", allowZip64=True)

    def open(self, name: str, compress: bool):
        info = zipfile.ZipInfo(name, date_time=time.gmtime()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        return self._zip.open(info, mode="w", force_zip64=True)

    def take(self) -> bytes:
        return self._sink.take()

    def close(self) -> bytes:
        self._zip.close()
        return self._sink.take()

    def abandon(self) -> None:
        """Drop the archive unfinished: no directory is ever written."""
        self._zip.fp = None
