"""Device choice, placement, memory planning, and the model thread's device discipline.

What needs a GPU runs in ``bench/gpu_check.py`` on one; here, everything that decides where tensors go.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import MllamaConfig

from llamascope.engines import devices
from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.builtin_model import ELEVEN_B
from llamascope.engines.devices import DeviceError, placement, plan_memory, resolve_device
from llamascope.engines.kv_cache import SLACK
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.requests import BatchLimits
from tests.conftest import CACHE_DIR, free_port
from tests.engines.helpers import REQUESTS, image, most_active, run

GIB = 1 << 30


def eleven_b() -> MllamaConfig:
    """Llama-3.2-11B-Vision-Instruct's sizes (its config.json), no weights."""
    return MllamaConfig(**ELEVEN_B)


def test_resolve_device() -> None:
    assert resolve_device("auto", visible=0) == "cpu"
    assert resolve_device("auto", visible=2) == "cuda"
    assert resolve_device("cpu", visible=2) == "cpu"
    assert resolve_device("cuda:1", visible=2) == "cuda:1"
    with pytest.raises(DeviceError, match="no CUDA GPU is visible") as refused:
        resolve_device("cuda", visible=0)
    # It named the README's 'On GPUs', a section of docs/models.md (docs review)
    assert "docs/models.md, 'On GPUs'" in str(refused.value)
    assert "## On GPUs" in (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    with pytest.raises(DeviceError, match="only 2 GPU"):
        resolve_device("cuda:2", visible=2)
    with pytest.raises(DeviceError, match="expected auto, cpu"):
        resolve_device("tpu", visible=0)


def test_dtype_auto_is_bf16_on_gpu_only() -> None:
    assert devices.compute_dtype("auto", "cuda:0") == "bfloat16"
    assert devices.compute_dtype("auto", "cpu") == "auto"
    assert devices.compute_dtype("float32", "cuda") == "float32"


def test_placement() -> None:
    assert placement("cpu", 0) == {}
    assert placement("cuda:1", 2) == {"device_map": {"": 1}}
    assert placement("cuda", 1) == {"device_map": {"": 0}}
    assert placement("cuda", 4, "70GiB") == {"device_map": "auto", "max_memory": {i: "70GiB" for i in range(4)}}


def test_memory_plan_of_the_11b_fits_what_is_free() -> None:
    config = eleven_b()
    # Exact sizes, from the architecture: 32 self-attention layers x 8 kv heads x 128 x (k, v) x 2 bytes.
    assert devices.kv_bytes_per_token(config, 2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert devices.image_states(config) == 6404
    for free in (4 * GIB, 20 * GIB, 60 * GIB, 120 * GIB):
        plan = plan_memory(config, free, dtype_bytes=2, context_length=8192)
        held = (
            plan.max_batch_tokens * plan.kv_bytes_per_token
            + plan.max_batch_size * (plan.image_bytes_per_request + SLACK * plan.kv_bytes_per_token)
            + plan.vision_cache_bytes
            + plan.prefix_cache_bytes
            + plan.step_bytes
        )
        assert held <= free * 0.9, plan
        assert plan.max_batch_tokens >= 8192  # one request of the whole context always fits
        assert plan.image_bytes_per_request == 2 * 8 * 8 * 128 * 6404 * 2
        assert "MAX_BATCH_SIZE" in plan.describe()
    one, four = plan_memory(config, 20 * GIB), plan_memory(config, 20 * GIB, max_images=4)
    assert four.step_bytes == one.step_bytes + 2 * 4 * one.image_bytes_per_request  # a prefill's images joined
    assert four.vision_cache_bytes >= 4 * one.image_bytes_per_request  # a conversation's images stay cached
    small, large = plan_memory(config, 20 * GIB), plan_memory(config, 120 * GIB)
    assert large.max_batch_size > small.max_batch_size and large.max_batch_tokens > small.max_batch_tokens
    with pytest.raises(DeviceError, match="not enough"):
        plan_memory(config, 64 << 20)


def test_bounds_set_by_the_operator_are_kept_and_cpu_gets_fixed_defaults(test_model_dir: Path) -> None:
    engine = MllamaEngine.load(test_model_dir, test_model=True, bounds=devices.Bounds(max_batch_size=3))
    assert engine.scheduler.limits.max_batch == 3
    assert engine.scheduler.limits.max_batch_tokens == devices.CPU_BOUNDS.max_batch_tokens
    assert engine.vision_cache.max_size == devices.CPU_BOUNDS.vision_cache_bytes


@pytest.mark.server
@pytest.mark.skipif(devices.cuda_devices() > 0, reason="this machine has a GPU")
def test_serve_on_cuda_without_a_gpu_stops_clearly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LLAMASCOPE_CACHE_DIR": str(CACHE_DIR),
        "LLAMASCOPE_DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "llamascope", "serve", "--port", str(free_port()), "--device", "cuda"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.slow
def test_model_thread_names_every_tensors_device(test_model_dir: Path) -> None:
    """Batched prefill, decode and sampling (greedy, top-k, top-p, penalties, seeds), with and without
    images, make no tensor without ``device=``: on a GPU each such tensor would be on the CPU."""
    engine = MllamaEngine.load(test_model_dir, test_model=True)
    check = devices.discipline()
    engine.scheduler.device_check = check

    async def scenario() -> None:
        await asyncio.gather(*(run(engine, turns, sampling) for turns, sampling in REQUESTS))
        # a stop by length and a minimum length, which hold back the end-of-turn token
        turns = [Turn("user", (image((5, 100, 5)), "Go on."))]
        await run(engine, turns, SamplingParams(max_new_tokens=6, min_new_tokens=4, temperature=0))

    asyncio.run(scenario())
    assert sorted(set(check.violations)) == []


def test_padded_batch_counts_against_the_token_bound(test_model_dir: Path) -> None:
    """A batch's caches are as long as its longest row times its rows: that is what MAX_BATCH_TOKENS bounds."""
    engine = MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(max_batch_tokens=260))
    short = [Turn("user", "Hi")]
    # budgets 200-odd and 20-odd: together 230-odd tokens, but padded 2 x 200-odd > 260
    _, peak = asyncio.run(
        most_active(
            engine,
            run(engine, short, SamplingParams(max_new_tokens=200, temperature=0)),
            run(engine, short, SamplingParams(max_new_tokens=20, temperature=0)),
        )
    )
    assert peak == 1


# The smallest loads that still run every part: one sample per time-to-first-token row, two images encoded
# together against one at a time.
QUICK = ["--tokens", "4", "--levels", "2", "--images", "2", "--samples", "1"]


@pytest.mark.slow
def test_gpu_check_script_runs_its_parts_on_the_cpu(tmp_path: Path) -> None:
    """bench/gpu_check.py, the one command for a GPU machine, runs end to end here on the CPU and tiny model."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--device",
            "cpu",
            "--shape",
            "tiny",
            *QUICK,
            "--cache-dir",
            str(CACHE_DIR),
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    # 0, or 1 when a check says no: batched and lone answers may part at a float32 tie on some CPU (README).
    assert done.returncode in (0, 1), done.stdout + done.stderr[-3000:]
    for row in (
        "batched == alone (float32)",
        "tok/s, 2 concurrent",
        "TTFT, new image",
        "TTFT, cached image",
        "2 new images at once, encoded together",
    ):
        assert row in done.stdout
    cancelled = next(line for line in done.stdout.splitlines() if line.startswith("cancelled request left the batch"))
    assert cancelled.split()[-2:] == ["yes", "yes"], cancelled
    row = next(line for line in done.stdout.splitlines() if line.startswith("tensors made without a device"))
    assert row.split()[-2:] == ["none", "yes"], row
