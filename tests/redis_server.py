"""Start, stop, pause and restart throwaway ``redis-server`` processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port that a test can stop,
    kill, pause (SIGSTOP), resume (SIGCONT) and start again on the same port.

    It stores nothing on disk by itself (``--save ""``, no AOF); :meth:`snapshot`
    writes ``dump.rdb`` into its own directory on demand, and a server started
    again after that loads the snapshot, as a restart from an RDB file would.
    """

    def __init__(self, *args: str) -> None:
        self.args = args
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="tagcache-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (on the same port and directory as before) and wait until it answers."""
        for _attempt in range(5):
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.workdir,
                    *self.args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None and not _ping(self.port):
                time.sleep(0.02)
            if self.proc.poll() is None and _ping(self.port):
                return
            self.kill()
            if not os.path.exists(os.path.join(self.workdir, "dump.rdb")):
                self.port = free_port()  # the port was taken meanwhile: try another
        raise RuntimeError("could not start redis-server on a free port")

    def snapshot(self) -> None:
        """Write the dataset to ``dump.rdb`` now (``SAVE``); a later :meth:`start` loads it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"SAVE\r\n")
            assert sock.recv(64).startswith(b"+OK")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it keeps accepting connections but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """Unfreeze a paused server (SIGCONT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): nothing is saved."""
        if self.proc is not None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM)."""
        if self.proc is not None:
            if self.paused:
                self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[int]:
    """Run a ``redis-server`` that stores nothing on disk; yield its port."""
    with RedisProcess(*args) as server:
        yield server.port
