"""One stored event as the gateway delivers it: decoded once per process, framed once per
transport, and the same bytes written to every socket or stream that follows the job."""

from __future__ import annotations

import struct
from typing import Any

import orjson

from metrics.realtime import event_time
from orchestrator.states import FINAL


def ws_text_frame(payload: bytes) -> bytes:
    """A complete, unmasked WebSocket text frame (RFC 6455 §5.2): what a server writes."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Message:
    """A stored event: its dict, JSON bytes and store time, with its WebSocket and SSE frames
    built on first use and then shared by every subscriber in this process."""

    __slots__ = ("_sse", "_ws", "event", "final", "raw", "seq", "stored_at")

    def __init__(self, event: dict[str, Any], raw: bytes = b"") -> None:
        self.event = event
        self.raw = raw or orjson.dumps(event)
        self.seq = int(event["seq"])
        self.final = event.get("type") == "status" and event.get("status") in FINAL
        self.stored_at = event_time(event)
        self._ws: bytes | None = None
        self._sse: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Message:
        return cls(orjson.loads(raw), raw)

    @property
    def ws_frame(self) -> bytes:
        if self._ws is None:
            self._ws = ws_text_frame(self.raw)
        return self._ws

    @property
    def sse_frame(self) -> bytes:
        if self._sse is None:
            kind = str(self.event["type"]).encode()
            self._sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.seq, kind, self.raw)
        return self._sse
