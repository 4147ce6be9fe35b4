"""What the replica topology of docs/deploy.md adds to a request: nginx in front of three llamascope replicas
sharing one PostgreSQL and one Redis, against one replica called directly, against the engine directly.

The engine is bench/gateway.py's stub (a fixed answer streamed at once), so what is measured is the path,
not a model. The key has requests-per-minute and concurrency limits, so every request meets Redis twice
(in and out) and PostgreSQL for its lookup, reservation and charge. Sequential streamed requests, the whole
answer read; p50/p99 and the added latency against the engine directly.

    .venv/bin/python bench/topology.py [--requests 300] [--database-url postgresql+psycopg://...]

Without --database-url it starts a throwaway PostgreSQL from the machine's binaries (as .ci/run does).
Needs nginx and redis-server (Debian's packages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from gateway import STUB, body
from harness import Processes, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-" + "b" * 40
MODEL = "stub-vision"
NGINX = """worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.log warn;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};
  upstream llamascope {{ {servers} keepalive 32; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://llamascope; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $http_host; proxy_buffering off; proxy_cache off; proxy_read_timeout 3600s; }} }} }}
"""


def postgres(children: Processes) -> str:
    """A throwaway PostgreSQL on a free port, its directory under the children's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        sys.exit("no PostgreSQL here: give --database-url")
    bin_dir, data, port = found[-1].parent, children.tmp / "pg", free_port()
    run_as = ["su", "postgres", "-s", "/bin/sh", "-c"] if os.geteuid() == 0 else ["sh", "-c"]
    if os.geteuid() == 0:
        shutil.chown(children.tmp, "postgres")
    subprocess.run([*run_as, f"'{bin_dir}/initdb' -D '{data}' -A trust -U llamascope >/dev/null"], check=True)
    children.spawn([*run_as, f"exec '{bin_dir}/postgres' -D '{data}' -p {port} -k '{children.tmp}' -c fsync=off"])
    deadline = time.monotonic() + 30
    import psycopg

    while True:
        try:
            with psycopg.connect(f"postgresql://llamascope@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE llamascope")
            return f"postgresql+psycopg://llamascope@127.0.0.1:{port}/llamascope"
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def latencies(url: str, headers: dict[str, str], payload: dict, requests: int) -> list[float]:
    out = []
    with httpx.Client(timeout=60, headers=headers) as client:
        for i in range(requests + 20):
            started = time.perf_counter()
            with client.stream("POST", url, json=payload) as r:
                assert r.status_code == 200, r.read()
                for _ in r.iter_bytes():
                    pass
            if i >= 20:  # the first 20 warm connections and caches
                out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() or not shutil.which("redis-server"):
        sys.exit("needs nginx and redis-server")
    with Processes("llamascope-topology-") as children:
        database = args.database_url or postgres(children)
        stub_port, redis_port = free_port(), free_port()
        children.spawn([sys.executable, "-c", STUB, str(stub_port)])
        children.spawn(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"])
        config = children.tmp / "llamascope.toml"
        config.write_text(f'[models."{MODEL}"]\nupstreams = ["http://127.0.0.1:{stub_port}/v1"]\n')
        env = {
            "LLAMASCOPE_DATABASE_URL": database,
            "LLAMASCOPE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LLAMASCOPE_UPLOAD_SECRET": "bench-topology-secret-" + "2" * 40,
            "LLAMASCOPE_CONFIG": str(config),
            "LLAMASCOPE_LOG_LEVEL": "warning",
        }
        key = subprocess.run(
            [sys.executable, "-m", "llamascope", "keys", "create", "--rpm", "1000000", "--concurrency", "1000"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[0]
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            children.spawn(
                [sys.executable, "-m", "llamascope", "serve", "--port", str(port)],
                {**env, "LLAMASCOPE_DATA_DIR": str(children.tmp / f"data{i}")},
            )
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}/health")
        proxy_port = free_port()
        servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
        (children.tmp / "nginx.conf").write_text(NGINX.format(tmp=children.tmp, servers=servers, port=proxy_port))
        children.spawn([nginx, "-c", str(children.tmp / "nginx.conf"), "-g", "daemon off;"])
        wait_ready(f"http://127.0.0.1:{proxy_port}/health")

        payload = {**body(), "stream": True}
        auth = {"Authorization": f"Bearer {key}"}
        rows = {
            "the engine (stub), directly": latencies(
                f"http://127.0.0.1:{stub_port}/v1/chat/completions", {}, payload, args.requests
            ),
            "one replica, directly": latencies(
                f"http://127.0.0.1:{ports[0]}/compatible-mode/v1/chat/completions", auth, payload, args.requests
            ),
            "nginx -> 3 replicas": latencies(
                f"http://127.0.0.1:{proxy_port}/compatible-mode/v1/chat/completions", auth, payload, args.requests
            ),
        }
    base = statistics.median(rows["the engine (stub), directly"])
    print(f"{args.requests} sequential streamed requests; PostgreSQL and Redis in the path of every llamascope row")
    print(f"{'path':<30} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10}")
    for name, values in rows.items():
        p50, p99 = statistics.median(values), statistics.quantiles(values, n=100)[98]
        print(f"{name:<30} {p50:>8.2f} {p99:>8.2f} {p50 - base:>+9.2f}")
    direct = statistics.median(rows["one replica, directly"])
    print(f"nginx adds {statistics.median(rows['nginx -> 3 replicas']) - direct:+.2f} ms p50 to one replica directly")


if __name__ == "__main__":
    main()
