"""The servers under test, each a child process of the runner: broker, baselines, Nchan.

Every server binds 127.0.0.1 on a free port and is stopped by `stop()` (the runner calls it in
a finally block). Each exposes how many long polls it holds right now (`waiting()`), read from
the server itself: broker /metrics, the in-memory baseline's /metrics, Nchan's stub status.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NCHAN_MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_nchan_module.so",)
APT_PACKAGES = ("nginx", "libnginx-mod-nchan", "wrk")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The CPUs a server under test runs on (pin_servers), or None: wherever the kernel puts it.
_server_cpus: set[int] | None = None


def plan_cpus(pin: bool) -> tuple[set[int], set[int]] | None:
    """(the servers' CPUs, everyone else's) when pinning is asked for and possible, else None.

    Why pin: on a 2-core machine the server, Redis and the load generator's processes share
    both cores, and whenever the scheduler puts the server beside a busy load-generator
    process it waits its turn for milliseconds. That showed as wake-up latency: one run's p99
    went from 28 ms to 8 ms with the broker on one core and the rest on the other, the load
    unchanged. A server in production has its cores to itself and its clients elsewhere, so
    the kit measures that: the server under test on the first CPU, everything else (Redis,
    the load generator, wrk, the runner) on the others. Every target gets the same placement.
    """
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def pin_servers(cpus: set[int] | None) -> None:
    """Servers started from now on run on these CPUs (None: anywhere)."""
    global _server_cpus
    _server_cpus = cpus


def _in_child() -> None:  # runs in the child before exec: placement, fd limit
    if _server_cpus is not None:
        with contextlib.suppress(OSError):  # a CPU set refused: the server runs unplaced
            os.sched_setaffinity(0, _server_cpus)  # inherited by its workers and threads
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    with contextlib.suppress(ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    name = "server"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / f"{self.name}-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready_path(self) -> str:
        return "/healthz"

    def start(self, timeout_s: float = 20.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            self.command(),
            cwd=getattr(self, "src", None) or REPO,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the runner, which stops us in order
            preexec_fn=_in_child,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.port, self.ready_path(), timeout=1)
                if status < 500:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    stop_signal = signal.SIGINT

    def waiting(self) -> int | None:
        return None


class Broker(Server):
    name = "broker"

    def __init__(
        self,
        work: Path,
        redis_url: str,
        data_dir: Path,
        env: dict[str, str] | None = None,
        src: Path | None = None,
    ) -> None:
        super().__init__(work)
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.extra_env = env or {}
        self.src = src  # a snapshot of broker/ + config/ (--broker-ref), else the work tree

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--config",
            str((self.src or REPO) / "config" / "broker.toml"),
            "--port",
            str(self.port),
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(
            BROKER_REDIS_URL=self.redis_url,
            BROKER_REDIS_DATA_DIR=str(self.data_dir),
            BROKER_SERVER_ACCESS_LOG="false",
            BROKER_SERVER_WORKERS="1",
        )
        env.update(self.extra_env)
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src)
        return env

    def ready_path(self) -> str:
        return "/readyz"

    def metrics(self) -> dict[str, float]:
        _status, body = http_get(self.port, "/metrics")
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = float(v)
        return out

    def waiting(self) -> int | None:
        return int(self.metrics().get("broker_waiting_polls", 0))

    def process_info(self) -> dict[str, str]:
        """The labels of broker_process_info (allocator, event loop); {} on older brokers."""
        for key in self.metrics():
            if key.startswith("broker_process_info{"):
                inner = key.partition("{")[2].rpartition("}")[0]
                pairs = (kv.split("=", 1) for kv in inner.split(",") if "=" in kv)
                return {k: v.strip('"') for k, v in pairs}
        return {}

    def has_route(self, method: str, path: str) -> bool:
        """True unless the broker answers 404/405 for an unknown route (OB not built yet)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=b"{}", method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=2):
                return True
        except urllib.error.HTTPError as e:
            return e.code not in (404, 405)


class Baseline(Server):
    def __init__(self, work: Path, kind: str, *args: str) -> None:
        self.name = kind
        super().__init__(work)
        self.kind = kind
        self.args = list(args)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.baselines",
            self.kind,
            "--port",
            str(self.port),
            *self.args,
        ]

    def waiting(self) -> int | None:
        if self.kind != "memlp":
            return None
        _, body = http_get(self.port, "/metrics")
        m = re.search(rb"memlp_waiting_polls (\d+)", body)
        return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Nchan


def ensure_tools(install: bool = True) -> dict[str, str]:
    """nginx + the nchan module + wrk: found, else installed with apt-get when possible.

    Returns {"nginx": note, "wrk": note}; a note is "" when the tool is usable.
    """
    notes = {"nginx": "", "wrk": ""}
    missing = []
    if not (shutil.which("nginx") and nchan_module()):
        missing += ["nginx", "libnginx-mod-nchan"]
    if not shutil.which("wrk"):
        missing.append("wrk")
    if missing and install:
        apt = shutil.which("apt-get")
        if apt is None:
            why = "apt-get is not available on this machine"
        elif os.geteuid() != 0:
            why = "apt-get needs root (run `sudo apt-get install " + " ".join(missing) + "`)"
        else:
            why = ""
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            print(f"bench: installing {' '.join(missing)} with apt-get ...", flush=True)
            try:
                subprocess.run(
                    [apt, "update", "-qq"], env=env, check=True, timeout=300, capture_output=True
                )
                subprocess.run(
                    [apt, "install", "-y", "-qq", "--no-install-recommends", *missing],
                    env=env,
                    check=True,
                    timeout=600,
                    capture_output=True,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                why = f"apt-get install failed: {e}"
        if why:
            if "nginx" in missing:
                notes["nginx"] = why
            if "wrk" in missing:
                notes["wrk"] = why
    if not notes["nginx"] and not (shutil.which("nginx") and nchan_module()):
        notes["nginx"] = "nginx with the nchan module was not found"
    if not notes["wrk"] and not shutil.which("wrk"):
        notes["wrk"] = "wrk was not found"
    return notes


def nchan_module() -> str | None:
    """Path of a loadable nchan module, or "builtin" when nginx was compiled with it."""
    for p in NCHAN_MODULE_PATHS:
        if Path(p).is_file():
            return p
    nginx = shutil.which("nginx")
    if nginx:
        out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
        if "nchan" in out:
            return "builtin"
    return None


def nginx_version() -> str:
    nginx = shutil.which("nginx")
    if not nginx:
        return ""
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10).stderr
    return out.strip().split("/")[-1]


def nchan_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return out.strip()
    return ""


class Nchan(Server):
    """nginx (1 worker) + nchan, channels stored in the shared Redis via nchan_redis_pass."""

    name = "nchan"
    stop_signal = signal.SIGTERM

    def __init__(self, work: Path, redis_port: int, hold_s: int) -> None:
        super().__init__(work)
        self.redis_port = redis_port
        self.hold_s = max(1, int(hold_s))
        self.dir = work / f"nchan-{self.port}"

    def config(self) -> str:
        module = nchan_module()
        load = f"load_module {module};\n" if module and module != "builtin" else ""
        d = self.dir
        user = "user root;\n" if os.geteuid() == 0 else ""
        channel = (
            "nchan_channel_id $1; nchan_redis_pass bench_redis;"
            " nchan_message_buffer_length 200; nchan_message_timeout 10m;"
        )
        return f"""{load}{user}worker_processes 1;
worker_rlimit_nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[1]};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 60000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  upstream bench_redis {{ nchan_redis_server redis://127.0.0.1:{self.redis_port}; }}
  server {{
    listen 127.0.0.1:{self.port};
    location ~ ^/sub/(\\w+)$ {{
      nchan_subscriber longpoll; {channel}
      nchan_subscriber_timeout {self.hold_s}s;
      nchan_subscriber_first_message oldest;
    }}
    location ~ ^/poll/(\\w+)$ {{
      nchan_subscriber intervalpoll; {channel}
      nchan_subscriber_first_message oldest;
    }}
    location ~ ^/pub/(\\w+)$ {{ nchan_publisher; {channel} }}
    location = /nchan_status {{ nchan_stub_status; }}
    location = /healthz {{ return 204; }}
  }}
}}
"""

    def command(self) -> list[str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        # A fresh log: an earlier Nchan on the same port would append to it, and its crashes
        # would be reported again as this run's (crashes()).
        (self.dir / "error.log").unlink(missing_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        return [shutil.which("nginx") or "nginx", "-p", str(self.dir), "-c", str(conf)]

    def status(self) -> dict[str, int]:
        _, body = http_get(self.port, "/nchan_status")
        out = {}
        for line in body.decode().splitlines():
            k, _, v = line.partition(":")
            with contextlib.suppress(ValueError):
                out[k.strip()] = int(v.strip().rstrip("K"))
        return out

    def waiting(self) -> int | None:
        return self.status().get("subscribers")

    def crashes(self) -> list[str]:
        """nginx worker processes that died during the run, with the assertion that killed them.

        nginx restarts a dead worker on its own, so a crash shows only as errors and lost
        subscribers in the figures; the results must say why.
        """
        try:
            lines = (self.dir / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        since = 0  # an assertion belongs to the first death after it, not to later ones
        for i, line in enumerate(lines):
            if "exited on signal" in line:
                cause = next((c for c in reversed(lines[since:i]) if "Assertion" in c), "")
                since = i + 1
                # the worker's stderr line is cut at the front; keep it from the source file
                cause = cause[cause.find("src/") :] if "src/" in cause else cause.strip()
                out.append(_after_pid(line) + (f" ({cause})" if cause else ""))
        return out


def _after_pid(line: str) -> str:
    """An nginx log line without its timestamp and pid prefix."""
    head, sep, tail = line.partition(": ")
    return tail.strip() if sep and "#" in head else line.strip()
