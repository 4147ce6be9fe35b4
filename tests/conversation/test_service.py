"""Settling a reply: generating charges nothing; ``Reply.settle()`` charges once, however the reply ended."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llamascope.accounts import admin
from llamascope.accounts.admission import Accounts
from llamascope.accounts.store import AccountStore
from llamascope.conversation.rules import Images, parse_messages
from llamascope.conversation.service import ConversationService, Endpoint, ImagePolicy, checked_output_spec
from llamascope.engines.base import Chunk, EngineInfo, FinishReason, PreparedPrompt, SamplingParams, Turn
from llamascope.errors import ServiceError
from llamascope.images.decode import DecodeLimits
from llamascope.images.intake import ImageIntake
from llamascope.images.source import FetchPolicy
from llamascope.observability.facts import UpstreamHealth
from llamascope.structured.spec import OutputSpec
from tests.conftest import API_KEY

MESSAGES = [{"role": "user", "content": "Say three words."}]


class ScriptedEngine:
    """A text-only engine that says ``words``, then stops, or fails if ``fail``."""

    info = EngineInfo(kind="scripted", source="tests", context_length=4096, takes_images=False)

    def __init__(self, words: list[str], fail: bool = False) -> None:
        self.words = words
        self.fail = fail

    async def prepare(self, turns: list[Turn], output: OutputSpec | None = None) -> PreparedPrompt:
        return PreparedPrompt(input_tokens=12, image_tokens=0, max_new_tokens=100)

    async def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        for i, word in enumerate(self.words):
            yield Chunk(word, i + 1)
        if self.fail:
            raise ServiceError(500, "InternalError.Algo", "the engine failed")
        yield Chunk("", len(self.words), FinishReason.STOP)

    def tokens(self, prompt: PreparedPrompt) -> tuple[list[int], list[str]]:
        return [], []

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def stats(self) -> dict[str, int]:
        return {"running": 0}

    def health(self) -> tuple[UpstreamHealth, ...]:
        return ()

    async def close(self) -> None:
        pass


def ledger_after(tmp_path: Path, engine: ScriptedEngine, settles: int) -> list[dict]:
    store = AccountStore(f"sqlite:///{tmp_path / 'accounts.db'}")
    store.migrate()
    admin.seed_keys(store, [API_KEY])
    accounts = Accounts(store)
    service = ConversationService({"scripted": engine}, ImageIntake(FetchPolicy(), DecodeLimits()), accounts)

    async def run() -> None:
        principal = await accounts.authenticate(f"Bearer {API_KEY}")
        reply = await service.open(principal, "request-1", "scripted", MESSAGES, {}, endpoint=Endpoint.TEXT)
        with contextlib.suppress(ServiceError):
            await reply.complete()
        assert store.requests() == []  # generating, finished or failed, charges nothing by itself
        for _ in range(settles):
            await reply.settle()

    try:
        asyncio.run(run())
        return store.requests()
    finally:
        service.intake.close()
        accounts.close()


def test_a_finished_reply_is_charged_once_however_often_it_is_settled(tmp_path: Path) -> None:
    (row,) = ledger_after(tmp_path, ScriptedEngine(["one", " two", " three"]), settles=3)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 12, 3)


def test_a_failed_reply_is_charged_what_it_made_with_the_error_code(tmp_path: Path) -> None:
    (row,) = ledger_after(tmp_path, ScriptedEngine(["one", " two"], fail=True), settles=2)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("InternalError.Algo", 12, 2)


def test_image_rules_per_model_and_endpoint() -> None:
    """A model's image settings (``ImagePolicy``) over its engine's default: the limit, and whether the
    multimodal endpoint wants an image first; text generation and compatible mode never do."""
    vision = ScriptedEngine([])
    vision.info = EngineInfo(kind="scripted", source="tests", context_length=4096, max_images=4)
    intake = ImageIntake(FetchPolicy(), DecodeLimits())
    relaxed = {"b": ImagePolicy(max_images=2, require_image=False)}
    service = ConversationService({"a": vision, "b": vision}, intake, None, relaxed)  # type: ignore[arg-type]
    try:
        assert service.image_rules("a", Endpoint.MULTIMODAL) == Images(4, required=True)
        assert service.image_rules("a", Endpoint.CHAT) == service.image_rules("a", Endpoint.TEXT) == Images(4)
        assert service.image_rules("b", Endpoint.MULTIMODAL) == Images(2)
    finally:
        intake.close()


def test_a_schema_is_checked_while_the_loops_default_executor_is_busy() -> None:
    """Checked on asyncio.to_thread's executor, a few requests with large schemas seen for the first time took its
    every worker for seconds, and what else runs there (an upstream engine's token count of every request) waited
    for them, and they for it. With that executor's only worker held, a request's schema is still checked."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    parameters = {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    draft = parse_messages(MESSAGES, Images(0))

    async def scenario() -> OutputSpec | None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        release = threading.Event()
        held = loop.run_in_executor(None, release.wait)
        try:
            # The bound only keeps a wait without end from stalling the suite.
            return await asyncio.wait_for(checked_output_spec(parameters, draft, Endpoint.CHAT), 30)
        finally:
            release.set()
            await held

    output = asyncio.run(scenario())
    assert output is not None and output.grammar() is not None
