"""Image intake against the usual path: bytes to the model's pixel_values, time and peak memory.

baseline:   PIL.Image.open(bytes).convert("RGB"), then the stock Mllama image processor
pillow:     llamascope before libvips: decode_image(bytes, limits, engine.image_size, libvips=False)
            (checks, reduced decode, one resize), then the engine's one-pass preprocessing
            (MllamaPixels; equal to the stock processor's output), JPEG 2000 on every core
libvips:    llamascope as it runs: the same, with PNG decoded by libvips (images/vips.py) and WEBP by
            libwebp's API (images/libwebp.py)

A case of several images is a conversation that sends them together: the baseline
gives them to the stock processor at once; llamascope decodes them in a pool of
LLAMASCOPE_IMAGE_DECODE_WORKERS threads, as the intake's decode pool does.

Every case and method runs in a fresh process: peak memory is that process's
high-water mark above what it held before the case (Python, PyTorch and the
processor loaded). Times are medians after one warm-up run. Images are made
here, deterministically.

    .venv/bin/python bench/images.py [--repeats 3] [--only NAME]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import io, json, os, resource, statistics, sys, time, warnings
from concurrent.futures import ThreadPoolExecutor
warnings.simplefilter("ignore")
method, paths, repeats = sys.argv[1], sys.argv[2].split(os.pathsep), int(sys.argv[3])
from PIL import Image
Image.MAX_IMAGE_PIXELS = None  # the baseline as commonly run: Pillow's bomb check warns, people ignore it
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.builtin_model import ensure_test_model
from llamascope.settings import Settings
from llamascope.images import vips
from llamascope.engines.threads import usable_cores
from llamascope.images.decode import DecodeLimits, configure_codec_threads, decode_image
from llamascope import errors
settings = Settings.load()
engine = MllamaEngine.load(ensure_test_model(settings.cache_dir), test_model=True)
processor = engine.processor.image_processor
limits = DecodeLimits(max_pixels=settings.image_max_pixels, max_decode_pixels=settings.image_max_decode_pixels,
                      min_side=settings.image_min_side)
decoders = ThreadPoolExecutor(settings.image_decode_workers)  # as the intake's decode pool
images = [open(path, "rb").read() for path in paths]
use_libvips = method == "libvips"
if method != "baseline":
    configure_codec_threads(usable_cores())  # as the server sets it at start: JPEG 2000 on every usable core
if use_libvips:
    vips.available()  # libvips loaded with the process, as in a server: not the case's cost

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def baseline():
    imgs = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    return processor(images=[imgs], return_tensors="np")["pixel_values"].shape

def decode(data):
    return decode_image(data, limits, engine.image_size, libvips=use_libvips)

def llamascope():
    try:
        decoded = [decode(images[0])] if len(images) == 1 else list(decoders.map(decode, images))
    except errors.ServiceError as exc:
        return "refused: " + exc.message[:60]
    return [engine.pixels(image.image)["pixel_values"].shape for image in decoded]

run = baseline if method == "baseline" else llamascope
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark: loading is not the case's cost
before = status_kb("VmRSS")
start = time.perf_counter()
result = run()
first = time.perf_counter() - start
peak = status_kb("VmHWM") - before
times = [first]
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": statistics.median(times[1:] or times), "peak_mb": peak / 1024, "result": str(result)}))
"""


def photo(width: int, height: int, seed: int = 0, noise: float = 12) -> Image.Image:
    """Photo-like content (smooth shapes plus sensor noise), so codecs work as hard as on real photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / (width / 7) + seed),
            127 + 100 * np.cos(y / (height / 5)),
            127 + 100 * np.sin((x + y) / (width / 3)),
        ],
        axis=-1,
    )
    grain = rng.normal(0, noise, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def j2k_near(img: Image.Image, target_bytes: int) -> bytes:
    """A JPEG2000 file of about target_bytes (rate-controlled)."""
    raw = img.width * img.height * 3
    return encode(img, "JPEG2000", quality_mode="rates", quality_layers=[raw / target_bytes], irreversible=True)


def cases() -> dict[str, bytes | list[bytes]]:
    formats_img = photo(1600, 1200, 1)
    out = {
        f"{fmt.lower()} 1600x1200": encode(formats_img.convert(mode) if mode else formats_img, fmt, **kw)
        for fmt, mode, kw in [
            ("BMP", None, {}),
            ("DIB", None, {}),
            ("JPEG", None, {"quality": 90}),
            ("JPEG2000", None, {}),
            ("PNG", None, {}),
            ("SGI", None, {}),
            ("TIFF", None, {}),
            ("WEBP", None, {"quality": 90}),
        ]
    }
    out["ico 256x256"] = encode(photo(256, 256, 2), "ICO", sizes=[(256, 256)])
    out["icns 1024x1024"] = encode(photo(1024, 1024, 3), "ICNS")
    big = photo(4000, 3000, 4)
    out["WORST 12 MP JPEG"] = encode(big, "JPEG", quality=92)
    out["12 MP JPEG, less sensor noise"] = encode(photo(4000, 3000, 5, noise=3), "JPEG", quality=92)
    out["WORST 9 MB JPEG2000"] = j2k_near(big, 9 * 1024 * 1024)
    out["WORST bomb 12000x12000 PNG"] = encode(Image.new("RGB", (12000, 12000), (200, 10, 10)), "PNG")
    out["WORST 20 MP PNG (at the decode budget)"] = encode(Image.new("RGB", (5470, 3656), (10, 120, 200)), "PNG")
    out["WORST 100 MP JPEG (at the pixel budget)"] = encode(Image.new("RGB", (12000, 8333), (9, 9, 9)), "JPEG")
    out["WORST 12 MP WEBP"] = encode(big, "WEBP", quality=90)
    # A conversation comparing phone photos: what people send, each in its common format.
    out["4 images: 12 MP JPEG, WEBP, PNG 1600x1200, JPEG"] = [
        out["12 MP JPEG, less sensor noise"],
        encode(photo(4000, 3000, 6, noise=3), "WEBP", quality=85),
        out["png 1600x1200"],
        out["jpeg 1600x1200"],
    ]
    return out


def measure(method: str, paths: list[Path], repeats: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, os.pathsep.join(map(str, paths)), str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if out.returncode != 0:
        return {"seconds": float("nan"), "peak_mb": float("nan"), "result": "crashed: " + out.stderr[-200:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="run only cases whose name contains this")
    args = parser.parse_args()
    started = time.time()
    print("bytes -> Mllama pixel_values; time = median, peak = memory high-water mark above the loaded process;")
    print("speed-up = baseline time / llamascope time (before libvips: pillow; now: libvips and libwebp)")
    header = (
        f"{'case':<46} {'size':>8} {'baseline':>9} {'peak':>6} {'pillow':>8} {'peak':>6} {'libvips':>8} {'peak':>6}"
        f" {'before':>7} {'now':>6}  result"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in cases().items():
            if args.only and args.only not in name:
                continue
            images = content if isinstance(content, list) else [content]
            paths = [Path(tmp) / f"image{i}" for i in range(len(images))]
            for path, data in zip(paths, images, strict=True):
                path.write_bytes(data)
            base = measure("baseline", paths, args.repeats)
            before = measure("pillow", paths, args.repeats)
            now = measure("libvips", paths, args.repeats)
            result = now["result"] if now["result"].startswith(("refused", "crashed")) else "ok"
            size = sum(map(len, images)) / 1e6
            print(
                f"{name:<46} {size:>6.2f}MB {base['seconds'] * 1000:>7.0f}ms {base['peak_mb']:>4.0f}MB "
                f"{before['seconds'] * 1000:>6.0f}ms {before['peak_mb']:>4.0f}MB "
                f"{now['seconds'] * 1000:>6.0f}ms {now['peak_mb']:>4.0f}MB "
                f"{base['seconds'] / before['seconds']:>6.1f}x {base['seconds'] / now['seconds']:>5.1f}x  {result}",
                flush=True,
            )
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
