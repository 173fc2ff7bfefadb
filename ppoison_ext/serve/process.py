"""``ppoison serve`` as a child process on a free loopback port (tests, ``tools/loadtest.py``).

Example:
    >>> with ServerProcess([victim_dir, "--defense", "none", "--log-dir", logs]) as srv:
    ...     bb = RemoteBlackbox(srv.url)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["ServerProcess", "free_port"]

_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts ``python -m ppoison_ext.serve.main ARGS --host 127.0.0.1 --port P`` (``port``
    default: a free one) and waits until ``/v1/health`` answers (``start_timeout`` seconds at
    most). It runs in the caller's working directory, so relative paths in ``args`` mean what they
    would in a shell. The server's output goes to ``log_path`` (default: discarded).
    """

    def __init__(self, args: Sequence[str], *, port: Optional[int] = None, log_path=None,
                 start_timeout: float = 60.0, env: Optional[dict] = None):
        self.args = [str(a) for a in args]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.env = env
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ServerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "ppoison_ext.serve.main", *self.args, "--host", "127.0.0.1", "--port",
               str(self.port)]
        log = open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL)
        with log as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before answering "
                                   f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"the server did not answer within {self.start_timeout} s (log: {self.log_path})")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (a graceful shutdown: query logs closed), then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL (``kill -9``): no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
