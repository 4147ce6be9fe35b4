"""How long reading a request's JSON body holds the event loop: the old way (Python's json, then ``_fault``'s walk
of every container and string) against ``api.incoming.parse_body`` (orjson with the garbage collector paused, a
walk for depth and wide numbers only), both measured here in the same run, median of --rounds.

Bodies: a 4-image conversation's turn (four 320 KB data: URIs), 100,000 small message objects (about 15 MB), a
valid body nested 128 levels deep (with 2,000 items at the bottom), and a 10 MB single string. ``--heap N`` keeps N
small objects alive first, as a server's loaded modules and caches are: the collector's sweeps, which the old way
set off every 700 containers it created, cost more the larger the heap.

    .venv/bin/python bench/json_body.py [--rounds 7] [--heap 0]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

from harness import median_ms

from llamascope import errors
from llamascope.api.incoming import _fault, parse_body


def old(body: bytes) -> object:
    """read_json's parse and check before parse_body (json.loads, then _fault)."""
    value = json.loads(body)
    fault = _fault(value)
    if fault is not None:
        raise fault
    return value


def bodies() -> dict[str, bytes]:
    uri = "data:image/png;base64," + base64.b64encode(os.urandom(240_000)).decode()
    images = [{"type": "image_url", "image_url": {"url": uri}} for _ in range(4)]
    many = [
        {"role": "user", "content": [{"type": "text", "text": f"message number {i}, a short one"}], "name": f"u{i}"}
        for i in range(100_000)
    ]
    deep: object = [{"n": i, "t": "x"} for i in range(2_000)]
    for _ in range(125):  # with the body, the list and its items: 128 levels
        deep = {"a": deep}
    return {
        "4 data: URIs": json.dumps({"model": "m", "messages": [{"role": "user", "content": images}]}).encode(),
        "100,000 objects": json.dumps({"model": "m", "messages": many}).encode(),
        "128 levels deep": json.dumps({"model": "m", "x": deep}).encode(),
        "10 MB string": json.dumps({"model": "m", "input": "a" * 10_000_000}).encode(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--heap", type=int, default=0, help="small objects kept alive, as a server's heap")
    args = parser.parse_args()
    heap = [[i] for i in range(args.heap)]
    print(f"heap: {len(heap):,} objects kept alive; median of {args.rounds} rounds")
    print(f"{'body':<18} {'MB':>6} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    for name, body in bodies().items():
        try:
            same = parse_body(body) == old(body)
        except errors.ServiceError as exc:
            sys.exit(f"{name}: refused: {exc}")
        assert same, name
        was = median_ms(lambda body=body: old(body), args.rounds)
        now = median_ms(lambda body=body: parse_body(body), args.rounds)
        print(f"{name:<18} {len(body) / 1e6:>6.2f} {was:>9.1f} {now:>9.1f} {was / now:>7.1f}x")


if __name__ == "__main__":
    main()
