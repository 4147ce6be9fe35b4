"""An image URL sent again, as a conversation's next turn or a batch's next line does: what its intake costs.

A loopback HTTP/1.1 host (keep-alive) serves one 1120x840 photo-like JPEG at three paths, each with other
caching headers: ``Cache-Control: max-age=600`` (fresh: not fetched again), an ``ETag`` alone (stale: asked
whether it changed, answered 304 with no body; OSS's way), and nothing (fetched whole every time). Each is
loaded once, then --repeats times again (median shown), through ``ImageIntake.load`` of this tree and, with
--baseline DIR (a directory holding another version's ``llamascope`` package), of that version, each in a
process of its own. Loopback has no round trip to save; over a network each fetch avoided also saves one,
and each connection kept saves a TCP and a TLS handshake.

    git archive main llamascope | tar -x -C /tmp/baseline
    .venv/bin/python bench/image_urls.py [--baseline /tmp/baseline] [--repeats 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from batch import URL_HEADERS, image_host

CASES = {"/fresh": "max-age=600 (fresh)", "/etag": "ETag only (304)", "/silent": "no caching headers"}


def measure(port: int, repeats: int) -> None:
    """In a child process (this tree, or the baseline on its PYTHONPATH): one JSON line of medians, ms."""
    from llamascope.images.decode import DecodeLimits
    from llamascope.images.intake import ImageIntake
    from llamascope.images.source import FetchPolicy

    intake = ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())

    async def run() -> dict[str, float]:
        medians = {}
        for path in URL_HEADERS:
            url = f"http://127.0.0.1:{port}{path}"
            await intake.load(url, fit_key="bench")
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                await intake.load(url, fit_key="bench")
                times.append((time.perf_counter() - began) * 1000)
            medians[path] = statistics.median(times)
        return medians

    print(json.dumps(asyncio.run(run())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, help="a directory holding another version's llamascope package")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.repeats)
        return
    server, _ = image_host()
    port = server.server_address[1]
    here = str(Path(__file__).resolve().parents[1])
    trees = {"this tree": here} | ({"baseline": str(args.baseline)} if args.baseline else {})
    results = {}
    for name, tree in trees.items():
        child = [sys.executable, __file__, "--child", str(port), "--repeats", str(args.repeats)]
        out = subprocess.run(child, env={"PYTHONPATH": tree}, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    server.shutdown()
    print(f"an image URL loaded again (1120x840 JPEG over loopback, median of {args.repeats}), ms")
    print(
        f"{'the host says':<24}"
        + "".join(f"{name:>12}" for name in results)
        + ("       ratio" if args.baseline else "")
    )
    for path, label in CASES.items():
        row = "".join(f"{results[name][path]:>12.3f}" for name in results)
        if args.baseline:
            row += f"{results['baseline'][path] / results['this tree'][path]:>11.1f}x"
        print(f"{label:<24}{row}")


if __name__ == "__main__":
    main()
