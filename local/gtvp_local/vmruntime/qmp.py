"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket).

The wire format: one JSON object per line. The server greets with `{"QMP": …}`; a command
`{"execute": …, "arguments": …, "id": …}` is answered by `{"return": …, "id": …}` or
`{"error": {"class": …, "desc": …}, "id": …}`; `{"event": …}` objects may arrive at any
time. The framing and classification below are pure (tested without qemu).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """A command answered with an error (its class and description)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


def encode(command: str, arguments: Mapping[str, Any] | None = None, ident: int = 0) -> bytes:
    msg: dict[str, Any] = {"execute": command, "id": ident}
    if arguments:
        msg["arguments"] = dict(arguments)
    return json.dumps(msg, separators=(",", ":")).encode() + b"\r\n"


class Decoder:
    """Split a byte stream into JSON messages (one per line; partial lines kept)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError(f"QMP message is not an object: {line[:80]!r}")
            out.append(msg)
        return out


def kind(msg: Mapping[str, Any]) -> str:
    """ "greeting", "return", "error" or "event" ("unknown" otherwise)."""
    for key, name in (("QMP", "greeting"), ("return", "return"), ("error", "error")):
        if key in msg:
            return name
    return "event" if "event" in msg else "unknown"


def result(command: str, msg: Mapping[str, Any]) -> Any:
    """The value of a reply, or QmpError for an error reply."""
    if kind(msg) == "error":
        err = msg["error"]
        raise QmpError(command, str(err.get("class", "?")), str(err.get("desc", "")))
    return msg["return"]


class Qmp:
    """One connection to a qemu's QMP socket, capabilities negotiated."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._dec = Decoder()
        self._pending: list[dict[str, Any]] = []
        self._next = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            greeting = self._read()
            if kind(greeting) != "greeting":
                raise ConnectionError(f"QMP at {path}: no greeting, got {greeting!r}")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    @classmethod
    def connect(cls, path: Path, *, timeout: float = 20.0, alive: Any = None) -> Qmp:
        """Connect once the socket accepts (qemu creates it early in its start-up);
        `alive()` returning False stops the wait (the process died)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline or (alive is not None and not alive()):
                    raise ConnectionError(f"no QMP at {path}: {exc}") from exc
                time.sleep(0.05)

    def _read(self) -> dict[str, Any]:
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"QMP at {self.path} closed")
            self._pending.extend(self._dec.feed(data))
        return self._pending.pop(0)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        self._next += 1
        ident = self._next
        self.sock.sendall(encode(command, arguments, ident))
        while True:
            msg = self._read()
            k = kind(msg)
            if k == "event":
                self.events.append(msg)
            elif k in ("return", "error") and msg.get("id") == ident:
                return result(command, msg)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
