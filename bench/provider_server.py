"""A local stand-in for Twilio's Messages API, fast enough never to be the limit.

`python -m bench.provider_server --port P` answers, on one asyncio (uvloop) process with
httptools parsing HTTP/1.1 keep-alive connections:

- `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` → `201` with a Message resource
  as Twilio answers a send (`sid` "SM" + 32 hex digits, `status` "queued", ...). The form
  body is read but not parsed: the answer does not echo it.
- `GET /2010-04-01/Accounts/{AccountSid}/Messages.json` (a reconciliation's status query)
  → `200` with an empty page (`messages: []`).
- `GET /stats` → `{"posts": n}`, the sends answered so far (the bench checks the count).
- anything else → `404` with Twilio's error shape.

It authenticates nothing and keeps nothing but the counter.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
from email.utils import formatdate
from typing import Any

import httptools
import orjson
import uvloop

MESSAGES = re.compile(rb"^/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})/Messages\.json(?:\?.*)?$")
REASONS = {200: b"OK", 201: b"Created", 404: b"Not Found"}


class Counter:
    posts = 0


class _Date:
    """RFC 2822 date of the current second, formatted once per second."""

    second = -1
    text = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.text = second, formatdate(second, usegmt=True)
        return cls.text


def _answer(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
        status,
        REASONS[status],
        len(body),
        b"" if keep_alive else b"Connection: close\r\n",
    )
    return head + body


def _message(account: str, n: int) -> bytes:
    sid = f"SM{n:032x}"
    date = _Date.now()
    return orjson.dumps(
        {
            "sid": sid,
            "account_sid": account,
            "status": "queued",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "num_segments": "1",
            "date_created": date,
            "date_updated": date,
            "date_sent": None,
            "error_code": None,
            "error_message": None,
            "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
        }
    )


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        match = MESSAGES.match(self.url)
        if match and method == b"POST":
            Counter.posts += 1
            raw = _answer(201, _message(match[1].decode(), Counter.posts), keep_alive)
        elif match and method == b"GET":
            page: dict[str, object] = {
                "messages": [],
                "next_page_uri": None,
                "page": 0,
                "page_size": 1000,
            }
            raw = _answer(200, orjson.dumps(page), keep_alive)
        elif self.url == b"/stats":
            raw = _answer(200, orjson.dumps({"posts": Counter.posts}), keep_alive)
        else:
            error = {
                "code": 20404,
                "message": "The requested resource was not found",
                "status": 404,
            }
            raw = _answer(404, orjson.dumps(error), keep_alive)
        self.transport.write(raw)
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await loop.create_server(Connection, host, port, backlog=1024)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
