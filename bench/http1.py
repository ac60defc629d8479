"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load that must stay cheap.

The end-to-end load sends 1,000 signed webhooks a second and polls the API from one
process on a 2-core machine that also runs Huitou; a general-purpose client would spend
more of that CPU than the server. This one writes prepared requests and reads
`Content-Length` bodies, nothing else (no chunked encoding, no redirects, no TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping


class Pool:
    """Up to `size` connections to one host; requests wait for a free one."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host = host
        self.port = port
        self.size = size
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._open = 0

    @classmethod
    def for_url(cls, url: str, size: int) -> Pool:
        host_port = url.split("://", 1)[1].rstrip("/")
        host, port = host_port.rsplit(":", 1)
        return cls(host, int(port), size)

    def build(self, method: str, path: str, headers: Mapping[str, str], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def _acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._idle.empty() and self._open < self.size:
            self._open += 1
            try:
                return await asyncio.open_connection(self.host, self.port)
            except BaseException:
                self._open -= 1
                raise
        return await self._idle.get()

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prepared request; returns (status, body)."""
        reader, writer = await self._acquire()
        try:
            writer.write(raw)
            status_line = await reader.readline()
            status = int(status_line.split(b" ", 2)[1])
            length = 0
            keep = True
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                lowered = name.strip().lower()
                if lowered == b"content-length":
                    length = int(value.strip())
                elif lowered == b"connection" and value.strip().lower() == b"close":
                    keep = False
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            self._open -= 1
            writer.close()
            raise
        if keep:
            self._idle.put_nowait((reader, writer))
        else:
            self._open -= 1
            writer.close()
        return status, body

    async def close(self) -> None:
        while not self._idle.empty():
            _, writer = self._idle.get_nowait()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
