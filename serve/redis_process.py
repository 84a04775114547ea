"""A throwaway redis-server on a free 127.0.0.1 port, for the tests and the benchmarks (no config, no disk)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time


def redis_server_binary() -> str | None:
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """`with RedisProcess() as r: ... r.url`; `kill()` and `start()` again keep the port (a store that comes back)."""

    def __init__(self, port: int | None = None, io_threads: int | None = None):
        self.binary = redis_server_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found: install it (apt-get install redis-server) or set "
                                    "REDIS_SERVER=/path/to/redis-server")
        self.port = port or free_port()
        # threads that write replies to sockets (Redis >= 6): a fetch of many large pages over several connections is
        # otherwise bound by the one main thread's copies; default: half the cores, at most 4, 1 on a small machine
        self.io_threads = io_threads or max(1, min(4, (os.cpu_count() or 1) // 2))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--loglevel", "warning", "--io-threads", str(self.io_threads)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}") from None
                time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
