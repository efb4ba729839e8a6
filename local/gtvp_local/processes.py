"""Start, find and stop the local control plane's background processes.

Each process is started in its own session, its pid recorded in `<state>/pids/<name>.pid`
together with the binary it runs, so that `gtvp local down` (or a later `up` cleaning a
half-started run) stops exactly what gtvp started and nothing else. Each also carries its
state directory in its environment (`GTVP_LOCAL_OWNER`), so that a process whose pid file
was lost or overwritten (a stray) is still found and stopped: by that mark, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


OWNER_ENV = "GTVP_LOCAL_OWNER"
"""Set in the environment of every process a ProcessTable starts: its state directory."""


def owned_by(state: Path, environ: bytes) -> bool:
    """True when a process environment (`/proc/PID/environ`) carries the mark of `state` or
    of a directory under it."""
    root = str(state.resolve())
    for entry in environ.split(b"\0"):
        key, _, value = entry.decode(errors="replace").partition("=")
        if key == OWNER_ENV:
            return value == root or value.startswith(root + "/")
    return False


def strays(state: Path, known: set[int]) -> list[int]:
    """Pids of live processes marked as started under `state` that no pid file names."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in known or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue  # gone, or another user's
        if owned_by(state, environ) and _start_time(int(proc.name)) is not None:
            found.append(int(proc.name))
    return sorted(found)


def stop_pid(pid: int, *, timeout: float = 10.0) -> None:
    """Stop one process that no pid file tracks (TERM, then KILL after `timeout`)."""
    started = _start_time(pid)
    if started is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _start_time(pid) == started and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if _start_time(pid) == started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(pid)


@dataclass(frozen=True)
class Tracked:
    """A process gtvp started: its name, pid, start time and command."""

    name: str
    pid: int
    binary: str
    started: int = 0

    def alive(self) -> bool:
        """True while that very process runs (a reused pid has another start time)."""
        if self.started:
            return _start_time(self.pid) == self.started
        # a pid file written before start times were recorded: match the command line
        try:
            argv0 = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return False
        return _start_time(self.pid) is not None and os.path.realpath(argv0) == self.binary


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


_FREE_RANGE = (20000, 32000)
"""Below Linux's ephemeral range (32768-60999), so outgoing connections never take a port
between choosing it and a server binding it."""


_HANDED_OUT: set[int] = set()
"""Ports this process handed out: a pool picks a port long before its server binds it (the
webhook port is written into the webhook configuration first), so another pick in between
must not take it (CI: an operator died on 'address already in use' for its webhook port)."""


def reserve_port(port: int) -> bool:
    """Mark `port` handed out (a server will bind it later); False if it was already."""
    if port in _HANDED_OUT:
        return False
    _HANDED_OUT.add(port)
    return True


def free_port() -> int:
    """A port nothing listens on right now and this process has not handed out before (for
    tests that run beside `gtvp local up`)."""
    rng = random.SystemRandom()
    if len(_HANDED_OUT) > (_FREE_RANGE[1] - _FREE_RANGE[0]) // 2:
        _HANDED_OUT.clear()  # a long session: the oldest picks are long bound or gone
    for _ in range(200):
        port = rng.randrange(*_FREE_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not port_in_use(port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {_FREE_RANGE}")


class ProcessTable:
    """The pid files under one state directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.dir = state / "pids"
        self.logs = state / "logs"

    def _file(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def get(self, name: str) -> Tracked | None:
        path = self._file(name)
        try:
            data = json.loads(path.read_text())
            return Tracked(name, int(data["pid"]), str(data["binary"]), int(data.get("started", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def all(self) -> list[Tracked]:
        if not self.dir.is_dir():
            return []
        found = (self.get(p.stem) for p in sorted(self.dir.glob("*.pid")))
        return [t for t in found if t is not None]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Tracked:
        """Start `argv` detached, logging to `<state>/logs/<name>.log`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(
                    os.environ if env is None else env, **{OWNER_ENV: str(self.state.resolve())}
                ),
                cwd=cwd,
            )
        finally:
            log.close()
        binary = os.path.realpath(argv[0])
        tracked = Tracked(name, proc.pid, binary, _start_time(proc.pid) or 0)
        self._file(name).write_text(
            json.dumps({"pid": proc.pid, "binary": binary, "started": tracked.started})
        )
        return tracked

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, name: str, *, timeout: float = 10.0) -> bool:
        """Stop one tracked process (TERM, then KILL); True if one was running."""
        tracked = self.get(name)
        was_running = False
        if tracked is not None and tracked.alive():
            was_running = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(tracked.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while tracked.alive() and time.monotonic() < deadline:
                _reap(tracked.pid)
                time.sleep(0.05)
            if tracked.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(tracked.pid, signal.SIGKILL)
                while tracked.alive():
                    _reap(tracked.pid)
                    time.sleep(0.05)
            _reap(tracked.pid)
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()
        return was_running


def _reap(pid: int) -> None:
    """Collect a child's exit status if we are its parent (tests start processes directly)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
