"""What the benchmarks share: free ports, child processes that are always stopped, waiting for a server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """The median time of ``repeats`` calls of ``run`` after one untimed warm-up call, in ms."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, its threads included (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, headers: dict[str, str] | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Processes:
    """Child processes logging into a temporary directory; all stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{len(self.children)}.log", "wb") as log:  # the child keeps its own descriptor
            environment = {**os.environ, **(env or {})}
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=self.tmp)
        self.children.append(child)
        return child

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.children:
            p.send_signal(signal.SIGTERM)
        for p in self.children:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
