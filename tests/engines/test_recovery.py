"""A failure stays with its request: a step that fails for one row, or runs out of device memory, ends that
request alone, and the rest of its batch goes on token for token as alone (fault injection, tests only)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llamascope import errors
from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from tests.engines.helpers import image, run


@pytest.fixture(scope="module")
def faulty(test_model_dir: Path) -> MllamaEngine:
    """Fault injection on: a conversation holding ``[[llamascope-fault:STAGE@N]]`` fails there (tests only)."""
    return MllamaEngine.load(test_model_dir, test_model=True, faults=True)


RED = image((200, 30, 30))
GOOD = [  # one image shared by two rows (one copy of its states), another image, and a seeded sampled row
    ([Turn("user", (RED, "Describe."))], SamplingParams(max_new_tokens=14, min_new_tokens=14, temperature=0)),
    (
        [Turn("user", (RED, "Its colours?"))],
        SamplingParams(max_new_tokens=14, min_new_tokens=14, temperature=0.9, seed=5),
    ),
    (
        [Turn("user", (image((9, 99, 9), (1200, 300)), "And this?"))],
        SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0),
    ),
]


@pytest.fixture(scope="module")
def good_alone(faulty: MllamaEngine) -> list[str]:
    async def scenario() -> list[str]:
        return [(await run(faulty, turns, sampling))[0] for turns, sampling in GOOD]

    return asyncio.run(scenario())


@pytest.mark.parametrize("stage", ["prefill", "decode", "sample"])
def test_a_failing_request_ends_alone(faulty: MllamaEngine, good_alone: list[str], stage: str) -> None:
    """A request whose step fails ends with an error; the rest of its batch goes on, token for token as alone."""
    step = 0 if stage == "prefill" else 4  # prefill: before its first token; else at its fifth
    bad = [Turn("user", (RED, f"[[llamascope-fault:{stage}@{step}]] Describe."))]

    async def scenario() -> list[object]:
        return await asyncio.gather(
            *(run(faulty, t, s) for t, s in GOOD[:2]),
            run(faulty, bad, SamplingParams(max_new_tokens=14, min_new_tokens=14, temperature=0)),
            run(faulty, *GOOD[2]),
            return_exceptions=True,
        )

    together = asyncio.run(scenario())
    failed = together.pop(2)
    assert isinstance(failed, errors.ServiceError) and (failed.status, failed.code) == (500, "InternalError.Algo")
    assert [text for text, _ in together] == good_alone  # type: ignore[misc]
    assert faulty.active == 0 and faulty.stats()["waiting"] == 0


@pytest.mark.parametrize("step", [0, 3], ids=["in its prefill", "in a decode step"])
def test_out_of_memory_ends_the_newest_request_and_empties_the_caches(
    faulty: MllamaEngine, good_alone: list[str], step: int
) -> None:
    """An allocation that fails (injected as torch.OutOfMemoryError): the vision cache is emptied, the newest
    request ends with a DashScope error, and the requests already running go on, token for token as alone."""
    bad = [Turn("user", (RED, f"[[llamascope-fault:oom@{step}]] Describe."))]

    async def scenario() -> tuple[list[object], int]:
        running = [asyncio.create_task(run(faulty, t, s)) for t, s in GOOD[:2]]
        while faulty.active < 2:  # both in the batch before the newest arrives
            await asyncio.sleep(0.005)
        late = asyncio.create_task(
            run(faulty, bad, SamplingParams(max_new_tokens=14, min_new_tokens=14, temperature=0))
        )
        results = await asyncio.gather(*running, late, return_exceptions=True)
        return list(results), len(faulty.vision_cache)

    results, cached = asyncio.run(scenario())
    failed = results.pop()
    assert isinstance(failed, errors.ServiceError) and (failed.status, failed.code) == (500, "InternalError.Algo")
    assert "out of device memory" in failed.message
    assert [text for text, _ in results] == good_alone[:2]  # type: ignore[misc]
    assert cached == 0  # emptied, nothing has been put back since
    assert faulty.active == 0
