"""A unix-socket proxy in front of the Docker engine, for fault tests.

Give a controller `DOCKER_HOST=<proxy.url>` and the test decides what that controller sees of the
engine: `cut()` makes the engine vanish for it (live connections are closed, new ones refused)
while the real engine, shared with every other test, keeps running; `delay(pattern, s)` holds
requests containing a pattern (e.g. b"/start") so a crash can be timed inside that window.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

UPSTREAM = "/var/run/docker.sock"
CHUNK = 65536


class DockerProxy:
    """Forwards connections from its own socket to the engine's, unless told otherwise."""

    def __init__(self, socket_path: Path | None = None, upstream: str = UPSTREAM) -> None:
        self._own_dir: Path | None = None
        if socket_path is None:  # unix socket paths are limited to ~107 bytes: keep it short
            self._own_dir = Path(tempfile.mkdtemp(prefix="dproxy-"))
            socket_path = self._own_dir / "docker.sock"
        self.socket_path = socket_path
        self._upstream = upstream
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        self._delays: list[tuple[bytes, float]] = []
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.connections = 0  # accepted while not cut, for tests that want to see traffic
        self.refused = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> DockerProxy:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True, name="dproxy-accept").start()
        return self

    # ------------------------------------------------------------------ test controls
    def cut(self) -> None:
        """The engine is gone: close every live connection and refuse new ones."""
        with self._lock:
            self._cut = True
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _close(sock)

    def restore(self) -> None:
        """The engine is back."""
        with self._lock:
            self._cut = False

    def delay(self, pattern: bytes, seconds: float) -> None:
        """Hold each request whose bytes contain pattern for `seconds` before forwarding it."""
        with self._lock:
            self._delays.append((pattern, seconds))

    def clear_delays(self) -> None:
        with self._lock:
            self._delays.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        if self._listener is not None:
            _close(self._listener)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    # ------------------------------------------------------------------ plumbing
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self._upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, to_engine: bool) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                if to_engine:
                    self._maybe_delay(data)
                    with self._lock:
                        if self._cut:
                            break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with self._lock:
                    self._sockets.discard(sock)
                _close(sock)

    def _maybe_delay(self, data: bytes) -> None:
        with self._lock:
            delays = [seconds for pattern, seconds in self._delays if pattern in data]
        if delays:
            time.sleep(max(delays))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
