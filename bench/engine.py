"""The in-process engine under load, through the HTTP server: batching, vision reuse, server overhead.

A real ``llamascope serve`` process (the built-in test model unless --model
names a directory) takes streamed native requests from this process over
loopback. Every level sends the same requests; concurrency 1 serves them one at
a time and is the baseline the other levels are set against. Each level runs
--rounds times (after one untimed round of every level) and the round of
median tokens per second is shown: this machine is shared, and single rounds of
the same code wander by 20%. Rounds go through every level in turn.

- decode-dominated: a short prompt with one small image that every request shares (Llama 3.2 Vision
  conversations start with an image; after the first, its vision states come from the cache), exactly
  --tokens new tokens (min_new_tokens = max_tokens), greedy.
- decode, sampled: the same requests with the API's default sampling (temperature 0.8) instead of greedy.
- decode, own images: the greedy requests, each with an image of its own (also cached): the batch cannot share
  one copy of the image's cross-attention states as it does when all requests are about one image.
- image-dominated: every request a different 1120x840 photo-like JPEG (as a data: URI, so no vision-cache
  hit), 8 new tokens.
- two turns with the same image: time to first token of turn 2 against turn 1 (median of --conversations).
- server overhead: time to first token of one short request (the small image) through HTTP, against the same request
  given to an engine in this process (prepare + generate to the first chunk); medians of --repeats.
- the decode-dominated load given to that engine directly, one at a time and all at once: what the scheduler
  does without the HTTP server, its event loop and this process's client sharing the machine's cores.
- a stream's longest gap between chunks while a prompt near the context limit is prefilled beside it
  (prefilled in pieces of PREFILL_CHUNK_TOKENS, so the stream goes on in between).
- multi-turn: --conversations conversations about one image each, one after another, every turn adding a
  forced 128-token answer and a short question, until the history passes --history tokens; time to first
  token by turn (median over the conversations) on two servers at once, one reusing the history's keys and
  values (PREFIX_CACHE_BYTES at its default) and one not (PREFIX_CACHE_BYTES=0), each turn sent to both in
  turn. ``--only multi-turn`` runs this load alone.
- image-dominated, encoding on and off: the image-dominated load on two servers, one encoding the
  images of requests admitted together in one vision-tower call (VISION_BATCH_TILES=16, the default on
  a GPU), one encoding each alone (VISION_BATCH_TILES=1, the default on the CPU), each round sent to
  both in turn. ``--only image-dominated``. With ``--images 4``, its multi-image variant (issue 26): four
  different photos in each request's message, four times the images to decode and encode.

    .venv/bin/python bench/engine.py [--model PATH | --shape tiny|medium] [--dtype auto|float32|bfloat16]
                                     [--tokens 128] [--requests 16] [--levels 1,4,16] [--rounds 3]
                                     [--history 2000] [--only multi-turn|image-dominated] [--images 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from harness import Processes, free_port, wait_ready
from PIL import Image

KEY = "sk-1e9bb01f134451d1a43b1903784a1916afafe9b0"
# The built-in model's text part is 4 layers of width 64 under a 128,256-token output layer (96% of its
# weights); "medium" is 10 layers of width 512 (the same tokenizer and vision tower), where decoding is
# bound by reading the weights, as with real models.
SHAPES: dict[str, dict] = {
    "tiny": {},
    "medium": {
        "text_overrides": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 10,
            "cross_attention_layers": [3, 8],
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "initializer_range": 0.05,
        },
    },
}
PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def photo(seed: int) -> str:
    """A distinct 1120x840 JPEG with smooth gradients and some noise, as a data: URI."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:840, 0:1120].astype(np.float32)
    base = np.stack([x / 1120 * 255, y / 840 * 255, (x + y) / 1960 * 255], axis=-1)
    pixels = np.clip(base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def small_image(colour: tuple[int, int, int] = (200, 30, 30)) -> tuple[str, Image.Image]:
    image = Image.new("RGB", (320, 240), colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), image


def body(model: str, messages: list[dict], tokens: int, greedy: bool = True) -> dict:
    """Exactly ``tokens`` new tokens; greedy, or sampled with the API's defaults (temperature 0.8, top_p 1.0)."""
    parameters = {"max_tokens": tokens, "min_new_tokens": tokens, "incremental_output": True}
    if greedy:
        parameters["temperature"] = 0
    return {"model": model, "input": {"messages": messages}, "parameters": parameters}


def user(text: str, *images: str | None) -> dict:
    """A user message: its images (none, one or several; None for none), in order, then the text."""
    return {"role": "user", "content": [*({"image": image} for image in images if image), {"text": text}]}


async def stream(client: httpx.AsyncClient, payload: dict) -> tuple[float, int, str, int]:
    """(time to first event, output tokens, text, input tokens) of one streamed request. The time runs from
    sending the request: its body is encoded before (a conversation with four photos as data: URIs is 1 MB of
    JSON, milliseconds of the client's work that the server's time to first token does not include)."""
    content = json.dumps(payload).encode()
    headers = {"X-DashScope-SSE": "enable", "Content-Type": "application/json"}
    first = 0.0
    tokens = prompt = 0
    text = ""
    started = time.perf_counter()
    async with client.stream("POST", PATH, content=content, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                first = first or time.perf_counter() - started
                event = json.loads(line[5:])
                if "output" not in event:
                    raise RuntimeError(f"error event: {line}")
                text += event["output"]["choices"][0]["message"]["content"][0].get("text", "")
                tokens, prompt = event["usage"]["output_tokens"], event["usage"]["input_tokens"]
    return first, tokens, text, prompt


def tok_s(result: dict) -> float:
    return result["tok_s"]


async def level(client: httpx.AsyncClient, payloads: list[dict], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one(payload: dict) -> tuple[float, int, str, int]:
        async with gate:
            return await stream(client, payload)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in payloads))
    elapsed = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    return {
        "tok_s": sum(r[1] for r in results) / elapsed,
        "p50": statistics.median(ttfts) * 1000,
        "p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000,
        "texts": [r[2] for r in results],
    }


async def turns(client: httpx.AsyncClient, model: str, conversations: int) -> tuple[float, float]:
    firsts, seconds = [], []
    for i in range(conversations):
        image = photo(10_000 + i)
        turn1 = [user("What is in this picture?", image)]
        ttft1, _, answer, _ = await stream(client, body(model, turn1, 16))
        turn2 = [*turn1, {"role": "assistant", "content": [{"text": answer}]}, user("And what colour is it?")]
        ttft2, *_ = await stream(client, body(model, turn2, 16))
        firsts.append(ttft1)
        seconds.append(ttft2)
    return statistics.median(firsts) * 1000, statistics.median(seconds) * 1000


async def http_ttft(client: httpx.AsyncClient, model: str, repeats: int) -> float:
    payload = body(model, [user("Say hello.", small_image()[0])], 4)
    for _ in range(3):
        await stream(client, payload)
    return statistics.median([(await stream(client, payload))[0] for _ in range(repeats)]) * 1000


async def conversation_turns(
    clients: list[httpx.AsyncClient], model: str, seed: int, history: int, answer: int
) -> list[list[tuple[int, float]]]:
    """One conversation on each server, turn by turn (each turn to every server in turn): per server, each turn's
    (history tokens, time to first token)."""
    image = photo(seed)
    conversations: list[list[dict]] = [[] for _ in clients]
    out: list[list[tuple[int, float]]] = [[] for _ in clients]
    turn = 0
    while not out[0] or out[0][-1][0] < history:
        turn += 1
        for client, messages, timings in zip(clients, conversations, out, strict=True):
            question = f"Turn {turn}: what else can you tell me about the picture?"
            messages.append(user(question, image if turn == 1 else None))
            first, _, text, prompt = await stream(client, body(model, messages, answer))
            messages.append({"role": "assistant", "content": [{"text": text}]})
            timings.append((prompt, first * 1000))
    return out


def serve_pair(children: Processes, model_dir: Path, dtype: str, envs: list[dict[str, str]]) -> list[int]:
    """A ``llamascope serve`` of the model for each of ``envs`` (settings on top of the bench's), ready; their ports."""
    ports = []
    for env in envs:
        port = free_port()
        config = children.tmp / f"llamascope-{port}.toml"
        config.write_text(f'[models.bench]\npath = "{model_dir}"\ndtype = "{dtype}"\n')
        children.spawn(
            [sys.executable, "-m", "llamascope", "serve", "--port", str(port), "--config", str(config)],
            {
                "LLAMASCOPE_API_KEYS": KEY,
                "LLAMASCOPE_DATA_DIR": str(children.tmp / f"data-{port}"),
                "LLAMASCOPE_LOG_LEVEL": "warning",
                **env,
            },
        )
        ports.append(port)
    for port in ports:
        wait_ready(f"http://127.0.0.1:{port}/health", seconds=600)
    return ports


def multi_turn(model_dir: Path, dtype: str, conversations: int, history: int, answer: int) -> list[str]:
    """The multi-turn load on two servers, reuse on and off; the table's lines."""
    with Processes("llamascope-multiturn-") as children:
        ports = serve_pair(children, model_dir, dtype, [{}, {"LLAMASCOPE_PREFIX_CACHE_BYTES": "0"}])

        async def measure() -> list[list[list[tuple[int, float]]]]:
            headers = {"Authorization": f"Bearer {KEY}"}
            clients = [
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=3600) for port in ports
            ]
            try:
                for client in clients:  # warm up: the first request of a process is slow
                    await stream(client, body("bench", [user("warm up", small_image()[0])], 2))
                return [
                    await conversation_turns(clients, "bench", 20_000 + c, history, answer)
                    for c in range(conversations)
                ]
            finally:
                for client in clients:
                    await client.aclose()

        runs = asyncio.run(measure())
    lines = [
        f"multi-turn: {conversations} conversations one after another, each turn a forced {answer}-token answer and a "
        "short question; time to first token by turn, median over the conversations",
        f"{'turn':>4} {'history tokens':>15} {'TTFT reuse':>11} {'TTFT no reuse':>14} {'no reuse / reuse':>17} "
        f"{'reuse / turn 2':>15}",
    ]
    turns = min(len(run[0]) for run in runs)
    reuse_turn2 = statistics.median(run[0][1][1] for run in runs) if turns > 1 else 0.0
    for t in range(turns):
        tokens = int(statistics.median(run[0][t][0] for run in runs))
        on = statistics.median(run[0][t][1] for run in runs)
        off = statistics.median(run[1][t][1] for run in runs)
        versus = f"{on / reuse_turn2:>14.2f}x" if reuse_turn2 else ""
        lines.append(f"{t + 1:>4} {tokens:>15} {on:>9.1f}ms {off:>12.1f}ms {off / on:>16.2f}x {versus}")
    return lines


def image_batching(
    model_dir: Path, dtype: str, levels: list[int], requests: int, rounds: int, images: int = 1
) -> list[str]:
    """The image-dominated load on two servers, images encoded together (VISION_BATCH_TILES=16, the default
    on a GPU) and one at a time (VISION_BATCH_TILES=1); each round sent to both in turn. ``images``: photos in
    each request. The table's lines."""
    batch = str(max(levels))
    with Processes("llamascope-images-") as children:
        ports = serve_pair(
            children,
            model_dir,
            dtype,
            [
                {"LLAMASCOPE_MAX_BATCH_SIZE": batch},
                {"LLAMASCOPE_MAX_BATCH_SIZE": batch, "LLAMASCOPE_VISION_BATCH_TILES": "1"},
            ],
        )

        async def measure() -> list[dict[int, dict]]:
            headers = {"Authorization": f"Bearer {KEY}"}
            limits = httpx.Limits(max_connections=max(levels) + 4)
            clients = [
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, limits=limits, timeout=3600)
                for port in ports
            ]
            results: list[dict[int, list[dict]]] = [{n: [] for n in levels} for _ in clients]
            try:
                for client in clients:  # warm up: the first requests of a process are slow
                    await level(client, [body("bench", [user("Describe.", photo(900 + i))], 2) for i in range(4)], 4)
                for r in range(rounds):
                    for n in levels:
                        seeds = [300_000 + 100_000 * r + 1000 * n + 10 * i for i in range(requests)]
                        load = [
                            body("bench", [user("Describe the pictures.", *(photo(s + j) for j in range(images)))], 8)
                            for s in seeds
                        ]
                        for client, found in zip(clients, results, strict=True):  # the same fresh images to each
                            found[n].append(await level(client, load, n))
            finally:
                for client in clients:
                    await client.aclose()
            return [{n: sorted(found[n], key=tok_s)[rounds // 2] for n in levels} for found in results]

        together, alone = asyncio.run(measure())
    lines = [
        "image-dominated, images encoded together (VISION_BATCH_TILES=16) and one at a time (=1, the CPU's "
        f"default): {requests} requests, each {images} new 1120x840 photo{'s' if images > 1 else ''} and 8 new "
        "tokens; round of median tok/s",
        f"{'concurrent':>10} {'together tok/s':>15} {'one at a time':>14} {'together / one':>15} "
        f"{'TTFT p50 together':>18} {'one at a time':>14}",
    ]
    for n in levels:
        on, off = together[n], alone[n]
        lines.append(
            f"{n:>10} {on['tok_s']:>15.1f} {off['tok_s']:>14.1f} {on['tok_s'] / off['tok_s']:>14.2f}x "
            f"{on['p50']:>16.1f}ms {off['p50']:>12.1f}ms"
        )
    base_on, base_off = together[levels[0]]["tok_s"], alone[levels[0]]["tok_s"]
    lines.append(
        f"x {levels[0]} concurrent at {levels[-1]}: together {together[levels[-1]]['tok_s'] / base_on:.2f}x, "
        f"one at a time {alone[levels[-1]]['tok_s'] / base_off:.2f}x"
    )
    return lines


def direct(model_dir: Path, repeats: int, dtype: str, tokens: int, requests: int, rounds: int) -> dict:
    """The engine in this process, no HTTP, no keys, no JSON: time to first token of the short request, and
    the decode-dominated load's tokens per second one at a time and all at once (median of ``rounds``)."""
    from llamascope.engines.base import SamplingParams, Turn
    from llamascope.engines.mllama import MllamaEngine
    from llamascope.engines.threads import configure_torch
    from llamascope.images import PreparedImage

    configure_torch(None)
    engine = MllamaEngine.load(model_dir, dtype=dtype)
    image = PreparedImage(small_image()[1], "small", "PNG", 320, 240)

    async def once() -> float:
        started = time.perf_counter()
        prompt = await engine.prepare([Turn("user", (image, "Say hello."))])
        chunks = engine.generate(prompt, SamplingParams(max_new_tokens=4, min_new_tokens=4, temperature=0))
        await anext(chunks)
        elapsed = time.perf_counter() - started
        await chunks.aclose()  # type: ignore[attr-defined]
        return elapsed

    async def story(i: int) -> int:
        prompt = await engine.prepare([Turn("user", (image, f"Tell a story about the number {i}."))])
        greedy = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)
        made = 0
        async for chunk in engine.generate(prompt, greedy):
            made = chunk.output_tokens
        return made

    async def decode(together: bool) -> float:
        started = time.perf_counter()
        if together:
            made = sum(await asyncio.gather(*(story(i) for i in range(requests))))
        else:
            made = sum([await story(i) for i in range(requests)])
        return made / (time.perf_counter() - started)

    async def stall() -> tuple[float, float]:
        """A stream's median and longest gap between chunks (ms) while a prompt near the context limit arrives."""
        stamps: list[float] = []
        long_prompt = await engine.prepare([Turn("user", "describe every detail " * 900)])
        prompt = await engine.prepare([Turn("user", "Tell me a story.")])

        async def running() -> None:
            async for _ in engine.generate(prompt, SamplingParams(max_new_tokens=300, min_new_tokens=300)):
                stamps.append(time.perf_counter())

        task = asyncio.create_task(running())
        while len(stamps) < 20:
            await asyncio.sleep(0.001)
        chunks = engine.generate(long_prompt, SamplingParams(max_new_tokens=1))
        await anext(chunks)
        await chunks.aclose()  # type: ignore[attr-defined]
        await task
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        return statistics.median(gaps) * 1000, max(gaps) * 1000

    async def run() -> dict:
        for _ in range(3):
            await once()
        ttft = statistics.median([await once() for _ in range(repeats)]) * 1000
        await decode(False)  # untimed, as through HTTP
        await decode(True)
        one_by_one, together = [], []
        for _ in range(rounds):  # in turn, as through HTTP
            one_by_one.append(await decode(False))
            together.append(await decode(True))
        alone, batched = statistics.median(one_by_one), statistics.median(together)
        gap, longest = await stall()
        await engine.close()
        return {"ttft": ttft, "alone": alone, "batched": batched, "gap": gap, "longest_gap": longest}

    return asyncio.run(run())


def main() -> None:
    if sys.argv[1:2] == ["--direct"]:  # the child that times the engine alone, in a fresh process like the server
        model_dir, repeats, dtype, tokens, requests, rounds = sys.argv[2:8]
        print(json.dumps(direct(Path(model_dir), int(repeats), dtype, int(tokens), int(requests), int(rounds))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="a Llama 3.2 Vision directory (default: the built-in test model)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="tiny",
        help="without --model: the built-in model (tiny), or a random one with a wider, deeper text model",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="as a config file's dtype"
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level; the median is shown")
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--history", type=int, default=2000, help="multi-turn: turns until the history passes this")
    parser.add_argument("--only", choices=["multi-turn", "image-dominated"], help="run only this load")
    parser.add_argument("--images", type=int, default=1, help="image-dominated: photos in each request (issue 26)")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]

    from llamascope.engines.builtin_model import ensure_test_model
    from llamascope.settings import Settings

    model_dir = args.model or ensure_test_model(Settings.load().cache_dir, **SHAPES[args.shape])
    if args.only == "multi-turn":
        print(f"model: {model_dir} ({args.dtype})")
        print("\n".join(multi_turn(model_dir, args.dtype, args.conversations, args.history, args.tokens)))
        return
    if args.only == "image-dominated":
        print(f"model: {model_dir} ({args.dtype})")
        print("\n".join(image_batching(model_dir, args.dtype, levels, args.requests, args.rounds, args.images)))
        return
    name = "bench"
    rows: list[tuple[str, int, dict]] = []
    with Processes("llamascope-engine-") as children:
        port = free_port()
        config = children.tmp / "llamascope.toml"  # the model as a user configures one
        config.write_text(f'[models.{name}]\npath = "{model_dir}"\ndtype = "{args.dtype}"\n')
        children.spawn(
            [sys.executable, "-m", "llamascope", "serve", "--port", str(port), "--config", str(config)],
            {
                "LLAMASCOPE_API_KEYS": KEY,
                "LLAMASCOPE_DATA_DIR": str(children.tmp / "data"),
                "LLAMASCOPE_LOG_LEVEL": "warning",
                "LLAMASCOPE_MAX_BATCH_SIZE": str(max(levels)),
            },
        )
        wait_ready(f"http://127.0.0.1:{port}/health", seconds=600)

        async def measure() -> tuple[float, float, float]:
            limits = httpx.Limits(max_connections=max(levels) + 4)
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers=headers,
                limits=limits,
                timeout=3600,
            ) as client:
                shared = small_image()[0]
                await stream(client, body(name, [user("warm up", shared)], 2))  # its vision states: cached
                decode = [
                    body(name, [user(f"Tell a story about the number {i}.", shared)], args.tokens)
                    for i in range(args.requests)
                ]
                sampled = [{**b, "parameters": body(name, [], args.tokens, greedy=False)["parameters"]} for b in decode]
                own = [small_image((200, 30, 10 * i))[0] for i in range(args.requests)]
                for image in own:  # their vision states: cached, as the shared image's
                    await stream(client, body(name, [user("warm up", image)], 2))
                apart = [
                    body(name, [user(f"Tell a story about the number {i}.", own[i])], args.tokens)
                    for i in range(args.requests)
                ]
                # One untimed round of every level: with only the largest batch before it, the load measured
                # first ran 5-10% slower at 16 than the same load measured later in the run.
                for n in levels:
                    await level(client, decode, n)

                async def medians(label: str, load: Callable[[int, int], list[dict]]) -> None:
                    """Each level's round of median tokens/s. Rounds go through every level in turn, so a
                    level's rounds and the baseline's share the same stretches of this shared machine."""
                    results: dict[int, list[dict]] = {n: [] for n in levels}
                    for r in range(args.rounds):
                        for n in levels:
                            results[n].append(await level(client, load(r, n), n))
                    for n in levels:
                        rows.append((label, n, sorted(results[n], key=tok_s)[args.rounds // 2]))

                def images(r: int, n: int) -> list[dict]:  # fresh images every round and level: no cache hits
                    seeds = [100_000 * r + 1000 * n + i for i in range(args.requests)]
                    return [body(name, [user("Describe the picture.", photo(seed))], 8) for seed in seeds]

                await medians("decode-dominated", lambda r, n: decode)
                await medians("decode, sampled", lambda r, n: sampled)
                await medians("decode, own images", lambda r, n: apart)
                await medians("image-dominated", images)
                turn1, turn2 = await turns(client, name, args.conversations)
                http = await http_ttft(client, name, args.repeats)
            return turn1, turn2, http

        turn1, turn2, http = asyncio.run(measure())
    settings = [str(model_dir), str(args.repeats), args.dtype, str(args.tokens), str(args.requests), str(args.rounds)]
    child = [sys.executable, __file__, "--direct", *settings]
    alone = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    conversation = multi_turn(model_dir, args.dtype, args.conversations, args.history, args.tokens)
    encoding = image_batching(model_dir, args.dtype, levels, args.requests, args.rounds, args.images)

    print(f"model: {model_dir} ({args.dtype}); {args.requests} streamed requests per level, over loopback")
    print(f"{'load':<18} {'concurrent':>10} {'tok/s':>9} {'x 1-at-a-time':>14} {'TTFT p50':>10} {'TTFT p99':>10}")
    baseline: dict[str, float] = {}
    for label, n, r in rows:
        baseline.setdefault(label, r["tok_s"])
        print(
            f"{label:<18} {n:>10} {r['tok_s']:>9.1f} {r['tok_s'] / baseline[label]:>13.2f}x "
            f"{r['p50']:>8.1f}ms {r['p99']:>8.1f}ms"
        )
    # Greedy: batching must not change a token (float32; bfloat16 sums in another order at another batch size).
    for greedy in ("decode-dominated", "decode, own images"):
        answers = [r["texts"] for label, _, r in rows if label == greedy]
        same = sum(all(texts[i] == answers[0][i] for texts in answers) for i in range(len(answers[0])))
        print(f"{greedy} answers identical at every concurrency: {same} of {len(answers[0])}")
    print(
        f"two turns, same image: turn 1 TTFT {turn1:.1f} ms, turn 2 {turn2:.1f} ms "
        f"(turn 2 / turn 1 = {turn2 / turn1:.2f})"
    )
    print(
        f"server overhead: TTFT through HTTP {http:.2f} ms, engine called directly {alone['ttft']:.2f} ms, "
        f"added {http - alone['ttft']:.2f} ms"
    )
    print(
        f"decode-dominated, engine called directly (no HTTP): one at a time {alone['alone']:.1f} tok/s, "
        f"{args.requests} at once {alone['batched']:.1f} tok/s = {alone['batched'] / alone['alone']:.2f}x"
    )
    print(
        f"a prompt near the context limit beside a running stream (engine directly): the stream's median gap "
        f"{alone['gap']:.1f} ms, longest {alone['longest_gap']:.1f} ms (PREFILL_CHUNK_TOKENS at its default)"
    )
    print("\n".join(conversation))
    print("\n".join(encoding))


if __name__ == "__main__":
    main()
