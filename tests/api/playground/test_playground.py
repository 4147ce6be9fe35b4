"""The playground in a real headless Chromium against a real ``llamascope serve``.

Debian's ``chromium`` driven by Playwright (no browser download). The page is
used as a person would: by the accessible names of its controls. A run saves
screenshots of the page (light and dark) under ``.cache/screenshots/`` and
prints their paths.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import API_KEY, CACHE_DIR, ImageHost, Server, png_bytes, start_server

pytestmark = pytest.mark.chromium
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
expect.set_options(timeout=30_000)  # the page waits on a server sharing two busy cores

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"
SCREENSHOTS = CACHE_DIR / "screenshots"
ANSWER_TIMEOUT_MS = 90_000  # two busy cores: an answer of a few dozen tokens may take a while
IMAGE = png_bytes((30, 90, 200), (640, 480))
SECOND = png_bytes((40, 180, 60), (480, 640))  # joins the conversation at its second turn
# Records, on every change, how long the last answer is and whether it is still streaming.
WATCH_ANSWER = """() => {
    window.seenAnswers = [];
    const box = document.getElementById("conversation");
    new MutationObserver(() => {
        const answers = box.querySelectorAll("[data-role=answer]");
        const last = answers[answers.length - 1];
        if (!last) return;
        const text = last.querySelector(".answer");  // "Thinking…" while it waits for the first token: 0
        const length = text.classList.contains("waiting") ? 0 : text.textContent.length;
        window.seenAnswers.push([last.dataset.status, length]);
    }).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@dataclass
class Traffic:
    """Every request a browser context made, and the generation calls with their bodies and request ids."""

    urls: list[str] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    streams: list[Any] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def watch(self, context: Any, page: Any) -> None:
        context.on("request", self._on_request)
        context.on("response", self._on_response)
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))

    def _on_request(self, request: Any) -> None:
        self.urls.append(request.url)
        if request.url.endswith(GENERATION):
            self.generations.append(request.post_data_json)

    def _on_response(self, response: Any) -> None:
        if response.url.endswith(GENERATION):
            self.request_ids.append(response.headers.get("x-request-id", ""))
            self.streams.append(response)

    def streamed_text(self, n: int) -> str:
        """The answer as the server streamed it to the page: its events' increments, joined."""
        body = self.streams[n].text()
        events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
        return "".join(e["output"]["choices"][0]["message"]["content"][0]["text"] for e in events)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def open_page(browser: Any, server: Server, traffic: Traffic, **options: Any) -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 820}, **options)
    page = context.new_page()
    traffic.watch(context, page)
    page.goto(server.base + "/", wait_until="load")  # a browser at the root lands on the playground
    assert page.url == server.base + "/playground/"
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    return context, page


def sign_in(page: Any) -> None:
    page.get_by_label("API key").fill(API_KEY)
    expect(page.get_by_label("Model")).to_be_enabled()
    expect(page.locator("#model-badge")).to_be_visible()  # the served models are the built-in test model


def pick_image(page: Any, name: str, data: bytes, mime: str) -> None:
    page.get_by_label("Image", exact=True).set_input_files({"name": name, "mimeType": mime, "buffer": data})


def set_parameter(page: Any, label: str, value: str) -> None:
    if not page.get_by_label(label).is_visible():
        page.get_by_text("Parameters", exact=True).click()
    page.get_by_label(label).fill(value)


def ask(page: Any, text: str) -> Any:
    """Sends a message and returns the locator of its answer."""
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    return page.locator("[data-role=answer]").last


def running(server: Server) -> int:
    models = httpx.get(server.base + "/health", timeout=5).json()["models"]
    return max(stats["running"] for stats in models.values())


def access_fields(server: Server, request_id: str) -> dict[str, str]:
    line = server.access_line(request_id)
    return dict(re.findall(r"(\w+)=(\S+)", line))


def screenshot(page: Any, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    with capsys.disabled():
        print(f"\nplayground screenshot: {path}")
    return path


# -- the two-turn conversation, shared by the tests that look at it ------------------------------


@dataclass
class Conversation:
    page: Any
    traffic: Traffic
    answers: list[str]  # as streamed
    shown: list[str]  # as the page shows them
    growth: list[list[Any]]


@pytest.fixture(scope="module")
def conversation(browser: Any, server: Server) -> Iterator[Conversation]:
    """Two turns, an image with each: the second joins the conversation (issue 26)."""
    traffic = Traffic()
    context, page = open_page(browser, server, traffic)
    sign_in(page)
    pick_image(page, "blue.png", IMAGE, "image/png")
    expect(page.get_by_alt_text("blue.png")).to_be_visible()  # in the tray, for the next message
    page.get_by_label("System prompt").fill("You are a terse assistant.")
    set_parameter(page, "Max tokens", "16")
    set_parameter(page, "Seed", "7")
    page.evaluate(WATCH_ANSWER)
    answers, shown, growth = [], [], []
    for n, question in enumerate(("What is in the picture?", "And what colour is it?")):
        if n == 1:
            pick_image(page, "green.png", SECOND, "image/png")
        answer = ask(page, question)
        expect(answer).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
        answers.append(traffic.streamed_text(n))
        shown.append(answer.locator(".answer").text_content())
        growth.append(page.evaluate("() => window.seenAnswers.splice(0)"))
    yield Conversation(page, traffic, answers, shown, growth)
    context.close()


def test_the_answer_streams_in(conversation: Conversation) -> None:
    first = conversation.growth[0]
    final = len(conversation.shown[0])
    partial = sorted({n for status, n in first if status == "streaming" and 0 < n < final})
    assert final > 0
    for streamed, shown in zip(conversation.answers, conversation.shown, strict=True):
        # The page renders Markdown: its words are the streamed words, its markers may be gone.
        assert re.sub(r"[\W\d_]", "", shown) == re.sub(r"[\W\d_]", "", streamed)
    assert partial, f"the answer was never shown before it was complete: {first}"
    assert ["done", final] in first


def test_follow_up_sends_the_whole_conversation_with_each_image_in_its_turn(conversation: Conversation) -> None:
    first, second = conversation.traffic.generations
    system = {"role": "system", "content": [{"text": "You are a terse assistant."}]}
    image = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    later = "data:image/png;base64," + base64.b64encode(SECOND).decode()
    asked = {"role": "user", "content": [{"image": image}, {"text": "What is in the picture?"}]}
    assert first["input"]["messages"] == [system, asked]
    assert second["input"]["messages"] == [
        system,
        asked,
        {"role": "assistant", "content": [{"text": conversation.answers[0]}]},
        {"role": "user", "content": [{"image": later}, {"text": "And what colour is it?"}]},
    ]
    assert first["parameters"] == {"max_tokens": 16, "seed": 7, "incremental_output": True}
    turns = conversation.page.locator(".message.user")
    expect(turns.nth(0).get_by_alt_text("blue.png")).to_be_visible()
    expect(turns.nth(1).get_by_alt_text("green.png")).to_be_visible()
    expect(conversation.page.locator(".attachment")).to_have_count(0)  # the tray went with the message


def test_each_answer_shows_its_timing_and_usage(conversation: Conversation, server: Server) -> None:
    for answer, request_id in zip(
        conversation.page.locator("[data-role=answer]").all(), conversation.traffic.request_ids, strict=True
    ):
        logged = access_fields(server, request_id)
        stats = answer.locator(".stats")
        expect(stats.locator(".ttft")).to_have_text(re.compile(r"^TTFT [\d,]+ ms$"))
        expect(stats.locator(".speed")).to_have_text(re.compile(r"^\d+\.\d tokens/s$"))
        expect(stats.locator(".input-tokens")).to_have_text(f"input {int(logged['input_tokens']):,}")
        expect(stats.locator(".output-tokens")).to_have_text(f"output {int(logged['output_tokens']):,}")
        expect(stats.locator(".image-tokens")).to_have_text(f"image {int(logged['image_tokens']):,}")
    assert int(access_fields(server, conversation.traffic.request_ids[1])["input_tokens"]) > int(
        access_fields(server, conversation.traffic.request_ids[0])["input_tokens"]
    )


def test_get_code_runs_as_shown(conversation: Conversation, server: Server, tmp_path: Path) -> None:
    """Each snippet, run as the dialog says (the key in the environment, the image beside it), answers."""
    page = conversation.page
    set_parameter(page, "Max tokens", "4")
    page.get_by_label("Message").fill("Anything else?")
    page.get_by_role("button", name="Get code").click()
    snippets = {}
    for tab in ("curl", "Python · dashscope", "Python · openai"):
        page.get_by_role("tab", name=tab).click()
        snippets[tab] = page.locator("#code-text").text_content()
    expect(page.locator("#code-note")).to_contain_text("blue.png, green.png")
    page.get_by_role("button", name="Close").click()
    page.get_by_label("Message").fill("")
    assert API_KEY not in "".join(snippets.values())
    assert conversation.answers[0] in snippets["curl"] and "Anything else?" in snippets["curl"]

    (tmp_path / "blue.png").write_bytes(IMAGE)
    (tmp_path / "green.png").write_bytes(SECOND)
    env = {**os.environ, "DASHSCOPE_API_KEY": API_KEY}
    env.pop("DASHSCOPE_HTTP_BASE_URL", None)
    runs = {
        "curl": ["bash", "-c", snippets["curl"]],
        "Python · dashscope": [sys.executable, "-c", snippets["Python · dashscope"]],
        "Python · openai": [sys.executable, "-c", snippets["Python · openai"]],
    }
    for tab, command in runs.items():
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tab}:\n{snippets[tab]}\n{done.stdout}\n{done.stderr}"
        assert done.stdout.strip(), f"{tab} printed no answer:\n{done.stderr}"
        if tab == "curl":
            assert '"finish_reason":"length"' in done.stdout and '"output_tokens":4' in done.stdout


def test_the_conversation_survives_a_reload(
    conversation: Conversation, capsys: pytest.CaptureFixture[str], server: Server
) -> None:
    page = conversation.page
    before = page.locator(".message").all_text_contents()
    page.reload()
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    assert page.locator(".message").all_text_contents() == before
    expect(page.locator("[data-role=answer][data-status=done]")).to_have_count(2)
    expect(page.get_by_label("API key")).to_have_value(API_KEY)  # session storage: this tab only
    expect(page.get_by_label("System prompt")).to_have_value("You are a terse assistant.")
    image = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    expect(page.get_by_alt_text("blue.png")).to_have_attribute("src", image)  # in its turn, kept in IndexedDB
    assert not page.evaluate("() => JSON.stringify(localStorage)").count(API_KEY)
    screenshot(page, "playground.png", capsys)
    page.emulate_media(color_scheme="dark")
    page.wait_for_timeout(300)  # the colours' transitions
    screenshot(page, "playground-dark.png", capsys)
    page.emulate_media(color_scheme="light")
    # And it goes on from where it was: the images (kept in IndexedDB) and both turns are sent again.
    answer = ask(page, "One more thing?")
    expect(answer).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
    messages = conversation.traffic.generations[-1]["input"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"][0] == {"image": image}
    assert messages[2]["content"][0]["text"] == conversation.answers[0]


def test_no_request_leaves_the_origin_and_nothing_breaks_the_policy(conversation: Conversation, server: Server) -> None:
    assert conversation.traffic.urls
    assert [url for url in conversation.traffic.urls if not url.startswith(server.base + "/")] == []
    assert conversation.traffic.console_errors == []


def test_two_tabs_keep_their_own_conversation_and_images(conversation: Conversation, server: Server) -> None:
    """New-user trial: two tabs shared one saved conversation, and New chat in one deleted the images the other
    had just added (gone from IndexedDB: lost on its reload)."""
    first = conversation.page
    answers = first.locator("[data-role=answer][data-status=done]").count()
    second = first.context.new_page()
    second.goto(server.base + "/playground/", wait_until="load")
    expect(second.locator("body[data-ready=true]")).to_have_count(1)
    expect(second.locator("[data-role=answer][data-status=done]")).to_have_count(answers)  # the last saved
    pick_image(first, "later.png", SECOND, "image/png")
    expect(first.get_by_alt_text("later.png")).to_be_visible()
    first.wait_for_function(
        "(n) => new Promise((done) => { const o = indexedDB.open('llamascope-playground', 1); o.onsuccess = () =>"
        " { const c = o.result.transaction('images').objectStore('images').count(); c.onsuccess = () =>"
        " { o.result.close(); done(c.result >= n); }; }; })",
        arg=3,
    )
    second.get_by_role("button", name="New chat").click()
    expect(second.locator("[data-role=answer]")).to_have_count(0)
    second.wait_for_timeout(300)  # its pruning, done by now
    second.close()
    first.reload()
    expect(first.locator("body[data-ready=true]")).to_have_count(1)
    expect(first.locator("[data-role=answer][data-status=done]")).to_have_count(answers)  # its own conversation
    image = "data:image/png;base64," + base64.b64encode(SECOND).decode()
    expect(first.get_by_alt_text("later.png")).to_have_attribute("src", image)
    expect(first.get_by_role("status")).to_have_text("")


# -- stopping, refusals, the other ways in: each in a fresh browser context ----------------------


@dataclass
class Tab:
    page: Any
    traffic: Traffic


@pytest.fixture
def tab(browser: Any, server: Server) -> Iterator[Tab]:
    traffic = Traffic()
    context, page = open_page(browser, server, traffic)
    yield Tab(page, traffic)
    context.close()


def test_stop_ends_generation_on_the_server(tab: Tab, server: Server) -> None:
    page, traffic = tab.page, tab.traffic
    sign_in(page)
    pick_image(page, "long.png", IMAGE, "image/png")
    set_parameter(page, "Max tokens", "4000")
    answer = ask(page, "Tell me a very long story about this picture.")
    expect(answer.locator(".answer.streaming")).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    assert running(server) == 1
    page.get_by_role("button", name="Stop").click()
    expect(answer).to_have_attribute("data-status", "stopped")
    expect(answer.locator(".stats .stopped")).to_have_text("stopped")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    deadline = time.monotonic() + 30
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(server) == 0
    logged = access_fields(server, traffic.request_ids[0])
    assert "client" in logged and logged["client"] == "disconnected"
    assert 0 < int(logged["output_tokens"]) < 4000


def test_a_reload_while_the_answer_streams_keeps_the_answer_so_far(tab: Tab, server: Server) -> None:
    """As Stop would: stopped, in the conversation, the server no longer generating (it was shown as a
    broken stream, and the answer left out of the conversation)."""
    page = tab.page
    sign_in(page)
    pick_image(page, "long.png", IMAGE, "image/png")
    set_parameter(page, "Max tokens", "4000")
    answer = ask(page, "Tell me a very long story about this picture.")
    expect(answer.locator(".answer.streaming")).to_have_count(1, timeout=ANSWER_TIMEOUT_MS)
    page.reload()
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    expect(answer).to_have_attribute("data-status", "stopped")
    expect(answer.locator(".error")).to_be_hidden()
    assert answer.locator(".answer").text_content()
    expect(page.locator(".attachment")).to_have_count(0)  # its image stays in its turn
    deadline = time.monotonic() + 30
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(server) == 0


def test_a_gif_is_refused_with_its_dashscope_code(tab: Tab) -> None:
    page, traffic = tab.page, tab.traffic
    sign_in(page)
    pick_image(page, "anim.gif", png_bytes((0, 200, 0), fmt="GIF"), "image/gif")
    answer = ask(page, "What is this?")
    expect(answer).to_have_attribute("data-status", "error", timeout=ANSWER_TIMEOUT_MS)
    expect(answer.locator(".error .error-code")).to_have_text("InvalidParameter.DataInspection")
    expect(answer.locator(".error")).to_contain_text("GIF")
    expect(answer.locator(".error .request-id")).to_have_text(f"request {traffic.request_ids[0]}")


def test_more_images_than_the_model_takes_are_refused_before_they_are_sent(tab: Tab, server: Server) -> None:
    page, traffic = tab.page, tab.traffic
    sign_in(page)
    served = httpx.get(server.api + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    limit = served[0]["max_images"]  # the model the page picks: the first
    files = [{"name": f"{n}.png", "mimeType": "image/png", "buffer": IMAGE} for n in range(limit + 1)]
    page.get_by_label("Image", exact=True).set_input_files(files)
    set_parameter(page, "Max tokens", "3")
    page.get_by_label("Message").fill("Compare them all.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#status")).to_contain_text(f"at most {limit} images a conversation")
    expect(page.locator("#status")).to_contain_text("remove some from the tray")
    expect(page.locator(".attachment")).to_have_count(limit + 1)  # still there, to remove one
    page.get_by_role("button", name="Remove 0.png").click()
    expect(ask(page, "Compare them all.")).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
    assert len(traffic.generations) == 1 and len(traffic.generations[0]["input"]["messages"][0]["content"]) == limit + 1


@pytest.mark.server  # its own server, with two models' settings
def test_the_image_hint_and_limit_follow_the_model(browser: Any, tmp_path: Path, test_model_dir: Path) -> None:
    """The hint said "the first message needs one" and "send them together" whatever the model's require_image
    and max_images; one image too many was said only at Send."""
    config = tmp_path / "llamascope.toml"
    config.write_text(
        '[models."one-image"]\npath = "builtin"\nmax_images = 1\nrequire_image = false\n'
        '[models."three-images"]\npath = "builtin"\nmax_images = 3\n'
    )
    limited = start_server(tmp_path, ["--config", str(config)])
    traffic = Traffic()
    context, page = open_page(browser, limited, traffic)
    try:
        sign_in(page)
        expect(page.get_by_label("Model")).to_have_value("one-image")
        hint = page.locator("#image-hint")
        expect(hint).to_contain_text("a message may also go without one")
        expect(hint).to_contain_text("one-image takes at most 1 image a conversation")
        expect(hint).not_to_contain_text("the first message needs one")
        expect(hint).not_to_contain_text("To compare images")
        pick_image(page, "0.png", IMAGE, "image/png")
        expect(page.locator("#status")).to_have_text("")
        pick_image(page, "1.png", SECOND, "image/png")  # one too many: said as it joins the tray, before Send
        expect(page.locator("#status")).to_contain_text("one-image takes at most 1 image a conversation")
        expect(page.locator("#status")).to_contain_text("remove some from the tray")
        page.get_by_role("button", name="Remove 1.png").click()
        expect(page.locator("#status")).to_have_text("")
        pick_image(page, "1.png", SECOND, "image/png")
        page.get_by_label("Model").select_option("three-images")  # takes both: nothing to say any more
        expect(page.locator("#status")).to_have_text("")
        expect(hint).to_contain_text("the first message needs one")
        expect(hint).to_contain_text("three-images takes at most 3 images a conversation")
        expect(hint).to_contain_text("To compare images, send them together")
        assert traffic.generations == []
    finally:
        context.close()
        limited.stop()


def test_a_request_over_the_body_limit_says_what_to_do(tab: Tab) -> None:
    page = tab.page
    sign_in(page)
    over = 3 * 32 * 2**20 // 4 + 2**20  # as base64, more than the server's 32 MiB body limit
    pick_image(page, "huge.png", IMAGE + bytes(over), "image/png")
    answer = ask(page, "What is this?")
    expect(answer).to_have_attribute("data-status", "error", timeout=ANSWER_TIMEOUT_MS)
    expect(answer.locator(".error .error-code")).to_have_text("BadRequest.TooLarge")
    expect(answer.locator(".error .error-hint")).to_contain_text("MAX_BODY_BYTES")
    expect(page.locator(".attachment")).to_have_count(1)  # back in the tray, to remove


def test_a_wrong_key_is_shown_as_the_api_says(tab: Tab) -> None:
    page = tab.page
    page.get_by_label("API key").fill("sk-" + "0" * 40)
    expect(page.get_by_role("status")).to_contain_text("InvalidApiKey")
    expect(page.get_by_label("Model")).to_be_disabled()


def test_an_image_by_url_is_fetched_by_the_server_only(tab: Tab, server: Server, image_host: ImageHost) -> None:
    page, traffic = tab.page, tab.traffic
    sign_in(page)
    url = image_host.url("/red.png")
    page.get_by_label("Image URL").fill(url)
    page.get_by_role("button", name="Use", exact=True).click()
    expect(page.locator(".url-card")).to_contain_text(f"127.0.0.1:{image_host.port}")
    set_parameter(page, "Max tokens", "3")
    answer = ask(page, "What is in the picture?")
    expect(answer).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
    assert traffic.generations[0]["input"]["messages"][0]["content"][0] == {"image": url}
    assert [u for u in traffic.urls if not u.startswith(server.base + "/")] == []


def test_get_code_for_an_image_url_with_quotes_runs_as_shown(tab: Tab, image_host: ImageHost, tmp_path: Path) -> None:
    """A URL's " (and a "$&", a replacement pattern to String.replace) once broke the curl snippet's JSON."""
    page = tab.page
    image_host.files["/say%22cheese%22$&.png"] = (IMAGE, "image/png")
    url = image_host.url('/say"cheese"$&.png')
    sign_in(page)
    page.get_by_label("Image URL").fill(url)
    page.get_by_role("button", name="Use", exact=True).click()
    set_parameter(page, "Max tokens", "3")
    page.get_by_label("Message").fill("What is it?")
    page.get_by_role("button", name="Get code").click()
    curl = page.locator("#code-text").text_content()
    page.get_by_role("tab", name="Python · openai").click()
    openai = page.locator("#code-text").text_content()
    env = {**os.environ, "DASHSCOPE_API_KEY": API_KEY}
    ran = subprocess.run(["bash", "-c", curl], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert '"finish_reason":"length"' in ran.stdout, f"{curl}\n{ran.stdout}\n{ran.stderr}"
    ran = subprocess.run(
        [sys.executable, "-c", openai], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0 and ran.stdout.strip(), f"{openai}\n{ran.stderr}"


def test_an_image_by_drop_or_paste(tab: Tab) -> None:
    page, traffic = tab.page, tab.traffic
    sign_in(page)
    ask(page, "What is this?")  # no image yet: the page says so and calls nothing
    expect(page.get_by_role("status")).to_contain_text("Add an image first")
    assert traffic.generations == []
    make_transfer = """([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        return transfer;
    }"""
    data = base64.b64encode(IMAGE).decode()
    dropped = page.evaluate_handle(make_transfer, [data, "dropped.png"])
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    expect(page.locator(".attachment .image-name")).to_have_text(["dropped.png"])
    pasted = page.evaluate_handle(make_transfer, [data, "pasted.png"])
    page.evaluate(
        "(t) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: t, bubbles: true}))", pasted
    )
    expect(page.locator(".attachment .image-name")).to_have_text(["dropped.png", "pasted.png"])  # both, in order
    expect(page.get_by_alt_text("pasted.png")).to_have_attribute("src", "data:image/png;base64," + data)
    page.get_by_role("button", name="Remove dropped.png").click()
    expect(page.locator(".attachment .image-name")).to_have_text(["pasted.png"])


def test_the_page_needs_no_key_and_allows_only_its_origin(server: Server) -> None:
    assert f"Playground: {server.base}/ in a browser" in server.log()  # start-up says where it is
    with httpx.Client(base_url=server.base, timeout=10) as client:
        root = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert root.status_code == 307 and root.headers["location"] == "/playground/"
        api_root = client.get("/", headers={"Accept": "application/json"})
        assert api_root.status_code == 404 and api_root.json()["code"] == "NotFound"
        for path in ("/playground/", "/playground/playground.js", "/playground/playground.css"):
            page = client.get(path)
            assert page.status_code == 200, path
            policy = page.headers["content-security-policy"]
            assert "default-src 'self'" in policy and "script-src 'self'" in policy
            assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        html = client.get("/playground/").text
        assert "<script>" not in html and "style=" not in html  # no inline script or style
        assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from elsewhere
        assert client.get("/api/v1/models").json()["code"] == "InvalidApiKey"  # the API still needs a key
        assert client.get("/playgrounds").json()["code"] == "InvalidApiKey"  # the public prefix is the folder only
    # Paths under the public prefix reach the static files and nothing else, dot segments or not.
    host, port = server.base.removeprefix("http://").split(":")
    for raw in ("/playground/../api/v1/models", "/playground/%2e%2e/admin/keys", "/playground/../../etc/passwd"):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", raw)
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())["code"]) == (404, "NotFound"), raw
        connection.close()


STORED_IMAGE = """() => new Promise((resolve) => {
  const opened = indexedDB.open("llamascope-playground", 1);
  opened.onerror = () => resolve(false);
  opened.onsuccess = () => {
    const db = opened.result;
    try {
      const got = db.transaction("images").objectStore("images").count();
      got.onsuccess = () => { db.close(); resolve(Boolean(got.result)); };
      got.onerror = () => { db.close(); resolve(false); };
    } catch (error) { db.close(); resolve(false); }
  };
})"""


def test_a_large_image_survives_a_reload(tab: Tab) -> None:
    """A photo's data: URI is bigger than localStorage holds (about 5 M characters): it is kept in IndexedDB."""
    noise = Image.frombytes("RGB", (1500, 1300), os.urandom(1500 * 1300 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    data = buffer.getvalue()
    assert len(data) * 4 / 3 > 5_500_000
    page = tab.page
    pick_image(page, "photo.png", data, "image/png")
    expect(page.locator(".image-name")).to_have_text("photo.png")
    # Writing 7.8 MB into IndexedDB takes a while on a busy machine: reload once it is there, as a person would.
    page.wait_for_function(STORED_IMAGE, timeout=60_000)
    page.reload()
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    expect(page.locator(".image-name")).to_have_text("photo.png")
    src = page.get_by_alt_text("photo.png").get_attribute("src")
    assert src == "data:image/png;base64," + base64.b64encode(data).decode()
    expect(page.get_by_role("status")).to_have_text("")


def test_answers_render_markdown_and_never_run_html(tab: Tab, image_host: ImageHost) -> None:
    """A stored answer with Markdown and HTML in it: the Markdown is drawn, the HTML is shown as text."""
    answer = (
        "Here is **bold** and `code`.\n\n1. one\n2. two\n\n```python\nprint('hi')\n```\n"
        '<img src="x" onerror="window.ran = true"> <script>window.ran = true</script>'
    )
    stored = {
        "model": "",
        "system": "",
        "parameters": {},
        "image": {"kind": "url", "src": image_host.url("/red.png"), "name": "red.png"},
        "turns": [{"user": "Show me", "answer": answer, "status": "done", "withImage": True}],
    }
    page = tab.page
    page.evaluate("(s) => localStorage.setItem('llamascope.playground.conversation', s)", json.dumps(stored))
    page.reload()
    bubble = page.locator("[data-role=answer] .answer")
    expect(bubble.locator("strong")).to_have_text("bold")
    expect(bubble.locator("p code")).to_have_text("code")
    expect(bubble.locator("ol li")).to_have_text(["one", "two"])
    expect(bubble.locator("pre code")).to_have_text("print('hi')")
    expect(bubble).to_contain_text('<img src="x" onerror="window.ran = true"> <script>')
    assert bubble.locator("img, script").count() == 0
    assert page.evaluate("() => window.ran") is None


def hold_model_list(page: Any) -> list[Any]:
    """Holds the page's model-list requests until released (``route.continue_()``): a Send is then surely
    clicked before the list for the key just typed has arrived, however busy the machine."""
    held: list[Any] = []
    page.route("**/api/v1/models", lambda route: held.append(route))
    return held


def release_when_asked(page: Any, held: list[Any]) -> None:
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # lets Playwright deliver the routed request
    assert held, "the page never asked for the model list"
    for route in held:
        route.continue_()
    page.unroute("**/api/v1/models")


def test_send_right_after_the_key_waits_for_the_model_list(tab: Tab) -> None:
    """The key typed, Send clicked at once: the answer comes once the key's models are known (not nothing)."""
    page, traffic = tab.page, tab.traffic
    pick_image(page, "blue.png", IMAGE, "image/png")
    set_parameter(page, "Max tokens", "3")
    held = hold_model_list(page)
    page.get_by_label("API key").fill(API_KEY)
    answer = ask(page, "What is in the picture?")
    release_when_asked(page, held)
    expect(answer).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
    assert len(traffic.generations) == 1 and answer.locator(".answer").text_content()
    expect(page.get_by_role("status")).to_have_text("")


def test_a_refusal_stays_when_the_model_list_arrives(tab: Tab) -> None:
    page, traffic = tab.page, tab.traffic
    held = hold_model_list(page)
    page.get_by_label("API key").fill(API_KEY)
    ask(page, "What is this?")  # no image yet
    release_when_asked(page, held)
    expect(page.get_by_label("Model")).to_be_enabled()  # the list has come
    expect(page.get_by_role("status")).to_contain_text("Add an image first")
    page.wait_for_timeout(500)  # and nothing the page does by itself takes the refusal away
    expect(page.get_by_role("status")).to_contain_text("Add an image first")
    assert traffic.generations == []


def test_a_json_schema_holds_the_answer_and_shows_it_pretty_printed(tab: Tab) -> None:
    """Issue 24: the schema field becomes parameters.response_format; the answer shows indented."""
    page, traffic = tab.page, tab.traffic
    sign_in(page)
    pick_image(page, "blue.png", IMAGE, "image/png")
    page.get_by_text("Answer shape", exact=True).click()
    page.get_by_label("JSON Schema").fill("{not json")
    ask(page, "Which colour?")
    expect(page.get_by_role("status")).to_contain_text("The JSON Schema is not JSON")
    assert traffic.generations == []
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["colour", "sure"],
        "additionalProperties": False,
    }
    page.get_by_label("JSON Schema").fill(json.dumps(schema))
    set_parameter(page, "Max tokens", "1e999")  # Infinity, which JSON sends as null: said, not sent
    ask(page, "Which colour?")
    expect(page.get_by_role("status")).to_contain_text("Max tokens: not a number in range.")
    assert traffic.generations == []
    set_parameter(page, "Max tokens", "64")
    answer = ask(page, "Which colour?")
    expect(answer).to_have_attribute("data-status", "done", timeout=ANSWER_TIMEOUT_MS)
    sent = traffic.generations[0]["parameters"]["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    value = json.loads(traffic.streamed_text(0))
    assert value["colour"] in ("red", "blue") and isinstance(value["sure"], bool)
    expect(answer.locator("pre.json")).to_have_text(json.dumps(value, indent=2))

    page.get_by_role("button", name="Get code").click()  # the schema rides in the code, as Python's literals
    page.get_by_role("tab", name="Python · dashscope").click()
    expect(page.locator("#code-text")).to_contain_text('"additionalProperties": False')
    page.get_by_role("button", name="Close").click()
