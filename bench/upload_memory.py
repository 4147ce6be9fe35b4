"""The memory one upload costs the server: its peak resident memory while it takes a file (the SDK's local-file
flow, ``POST /api/v1/uploads/oss``), over what it held before.

A real ``llamascope serve`` (the built-in model); the peak is the kernel's (VmHWM), reset before each upload
(``/proc/PID/clear_refs``), so the model's loading does not count. Linux only.

    .venv/bin/python bench/upload_memory.py [MB] [uploads]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
from harness import Processes, free_port, wait_ready

KEY = "sk-9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"  # keys of the settings must be hard to guess


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def upload(base: str, pid: int, content: bytes, name: str) -> tuple[int, int]:
    """RSS before the upload and the peak during it, KiB."""
    headers = {"Authorization": f"Bearer {KEY}"}
    params = {"action": "getPolicy", "model": "llama3.2-11b-vision"}
    data = httpx.get(base + "/api/v1/uploads", params=params, headers=headers).json()["data"]
    fields = {"policy": data["policy"], "Signature": data["signature"], "key": f"{data['upload_dir']}/{name}"}
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from the present RSS
    before = kib(pid, "VmRSS")
    r = httpx.post(data["upload_host"], data=fields, files={"file": (name, content)}, timeout=120)
    assert r.status_code == 200, r.text
    return before, kib(pid, "VmHWM")


def main() -> None:
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 10
    uploads = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    content = os.urandom(int(mb * 2**20) - 1024)  # within the default 10 MiB cap
    port = free_port()
    with Processes("llamascope-upload-") as processes:
        env = {"LLAMASCOPE_API_KEYS": KEY, "LLAMASCOPE_DATA_DIR": str(processes.tmp / "data")}
        child = processes.spawn([sys.executable, "-m", "llamascope", "serve", "--port", str(port)], env)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health")
        print(f"| upload | RSS before | peak during | peak over before ({len(content) / 2**20:.1f} MiB file) |")
        print("| --- | --- | --- | --- |")
        for i in range(uploads):
            before, peak = upload(base, child.pid, content, f"file-{i}.bin")
            print(f"| {i + 1} | {before / 1024:.0f} MiB | {peak / 1024:.0f} MiB | {(peak - before) / 1024:.1f} MiB |")


if __name__ == "__main__":
    main()
