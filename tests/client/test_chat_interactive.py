"""``llamascope chat`` without a question, through a real pseudo-terminal (pexpect), against a real server.

One conversation goes through the commands a person uses: an answer, /retry,
/save, a message of several lines, /undo, /load, a refused image, two images
joining at a later turn, and Ctrl+C in the middle of a long answer, after which the server is generating nothing
and the chat goes on. What the chat saved is sent again by the official SDK.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SEED_MODEL, ImageHost, Server, free_port, png_bytes, start_server

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "


def spawn(server: Server, home: Path, *args: str, key: str | None = None) -> pexpect.spawn:
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / "state"),
        "DASHSCOPE_HTTP_BASE_URL": server.api,
        "DASHSCOPE_API_KEY": key or server.key,
        "TERM": "xterm-256color",
    }
    return pexpect.spawn(
        sys.executable,
        ["-m", "llamascope", "chat", *args],
        env=env,
        cwd=str(home),
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(40, 120),
        timeout=60,
    )


def command(child: pexpect.spawn, line: str, expect: str = PROMPT) -> str:
    """Type a line; return what the chat printed until ``expect``."""
    child.sendline(line)
    child.expect_exact(expect)
    return child.before


def running(server: Server) -> int:
    return httpx.get(server.base + "/health", timeout=5).json()["models"][SEED_MODEL]["running"]


def saved(path: Path) -> list[dict]:
    return json.loads(path.read_text())["input"]["messages"]


def test_a_conversation_in_a_terminal(server: Server, image_host: ImageHost, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes())
    child = spawn(server, tmp_path, "-a", str(photo), "-m", SEED_MODEL)
    child.expect_exact(PROMPT)
    assert "built-in test model" in child.before and "image: data:image/png;base64" in child.before

    assert "max_tokens = 8" in command(child, "/set max_tokens 8")
    command(child, "/set temperature 0")
    shown = command(child, "What is in the picture?")
    assert "\x1b[?25l" in shown  # a terminal: rich draws the answer (its live area hides the cursor)
    command(child, "/retry")
    assert "session: 2 answers" in command(child, "/stats")
    command(child, "/save first.json")
    first = saved(tmp_path / "first.json")
    assert [m["role"] for m in first] == ["user", "assistant"]  # /retry replaced the answer
    assert first[0]["content"][0]["image"].startswith("data:image/png;base64,")

    child.sendline('"""')
    child.sendline("first line")
    child.sendline('second line"""')
    child.expect_exact(PROMPT)
    command(child, "/save second.json")
    second = saved(tmp_path / "second.json")
    assert second[:2] == first and second[2] == {"role": "user", "content": [{"text": "first line\nsecond line"}]}
    assert "forgot the last question" in command(child, "/undo")
    command(child, "/save undone.json")
    assert saved(tmp_path / "undone.json") == first
    assert "loaded 4 messages" in command(child, "/load second.json")
    command(child, "/save loaded.json")
    assert saved(tmp_path / "loaded.json") == second

    # A refused image: the API's code and message, and the chat goes on.
    command(child, f"/image {image_host.url('/anim.gif')}")
    refused = command(child, "And this one?")
    assert "InvalidParameter.DataInspection (HTTP 400)" in refused and "Traceback" not in refused
    assert "1 image went with the question" in refused  # so the next question is not refused again
    command(child, f"/image {photo}")  # joins the conversation, which keeps its turns

    # Ctrl+C in the middle of a long answer: the stream closes, the server stops, the chat goes on.
    command(child, "/set max_tokens 8000")
    command(child, "/set min_new_tokens 8000")
    child.sendline("Tell me everything.")
    deadline = time.monotonic() + 60
    while running(server) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 1
    time.sleep(0.5)  # some of the answer on the screen
    child.sendintr()
    child.expect_exact("(stopped; the answer so far is kept")
    assert "^C" not in child.before  # no echo while an answer is drawn: it would tear rich's live area
    child.expect_exact(PROMPT)
    deadline = time.monotonic() + 30
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(server) == 0
    stats = command(child, "/stats")
    assert "ended: stopped" in stats
    request_id = re.search(r"request ([0-9a-f-]{36})", stats)
    assert request_id and "client=disconnected" in server.access_line(request_id.group(1))
    command(child, "/set min_new_tokens")
    command(child, "/set max_tokens 4")
    # Two images in one message, at a later turn.
    other = tmp_path / "other.png"
    other.write_bytes(png_bytes((30, 200, 30)))
    command(child, f"/image {other}")
    assert "(2 with the next message)" in command(child, f"/image {photo}")
    assert "error" not in command(child, "One more?")
    listed = command(child, "/image")
    assert listed.count("in the conversation: data:image/png") == 4 and "with the next message" not in listed
    assert listed.count(f"from {other}") == 1 and listed.count(f"from {photo}") == 3  # told apart by their names
    command(child, "/save multi.json")
    images = [[i["image"][:22] for i in m["content"] if "image" in i] for m in saved(tmp_path / "multi.json")]
    png = "data:image/png;base64,"
    assert images == [[png], [], [], [], [png], [], [png, png], []]

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "What is in the picture?" in (tmp_path / "state" / "llamascope" / "chat_history").read_text()
    again = spawn(server, tmp_path)  # readline history: the up arrow brings back the last line, /bye
    again.expect_exact(PROMPT)
    again.send("\x1b[A\r")
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0

    # What /save wrote is a conversation the API takes: the official SDK sends it with one more question.
    import dashscope

    messages = [*saved(tmp_path / "first.json"), {"role": "user", "content": [{"text": "And then?"}]}]
    response = dashscope.MultiModalConversation.call(
        model=SEED_MODEL, messages=messages, api_key=server.key, base_address=server.api, max_tokens=4
    )
    assert response.status_code == 200, response.message


def test_a_wrong_key_is_said_at_once_without_a_traceback(server: Server, tmp_path: Path) -> None:
    child = spawn(server, tmp_path, key="sk-wrong")
    child.expect(pexpect.EOF)
    child.close()
    assert "error: InvalidApiKey (HTTP 401): Invalid API-key provided." in child.before
    assert "Traceback" not in child.before and child.exitstatus == 1


@pytest.mark.server  # its own server: not the shared one that marks the others
def test_a_failure_not_of_the_images_keeps_them_for_the_next_question(tmp_path: Path) -> None:
    """An engine that cannot be reached (503) is no fault of the images: they wait for the question asked again,
    where a refusal (400) drops them (the test above)."""
    down = start_server(tmp_path, args=["--model", f"down=openai+http://127.0.0.1:{free_port()}/v1"])
    try:
        (tmp_path / "red.png").write_bytes(png_bytes(size=(32, 32)))
        child = spawn(down, tmp_path, "-a", "red.png")
        child.expect_exact(PROMPT)
        failed = command(child, "What is this?")
        assert "ServiceUnavailable (HTTP 503)" in failed and "1 image will go with the next question" in failed
        assert "with the next message: data:image/png" in command(child, "/image")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        down.stop()


def test_names_typed_in_commands(server: Server, tmp_path: Path) -> None:
    """Terminals paste a dropped file's path quoted, or with its spaces escaped; a model name is one served."""
    (tmp_path / "my photo.png").write_bytes(png_bytes(size=(32, 32)))
    child = spawn(server, tmp_path)
    child.expect_exact(PROMPT)
    for typed in (f"'{tmp_path}/my photo.png'", '"my photo.png"', "my\\ photo.png", "my photo.png"):
        assert "image: data:image/png;base64" in command(child, f"/image {typed}"), typed
    assert "saved 0 messages" in command(child, "/save 'my chat.json'")
    assert "loaded 0 messages" in command(child, "/load my\\ chat.json")
    assert "nosuch is not served here" in command(child, "/model nosuch")  # not taken, to fail at the next question
    assert "nosuch" not in command(child, "/show")
    assert f"model: {SEED_MODEL}" in command(child, f"/model {SEED_MODEL}")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


@pytest.mark.server  # its own server: not the shared one that marks the others
def test_images_past_the_models_limit_are_refused_as_they_are_added(tmp_path: Path, test_model_dir: Path) -> None:
    """The listing's max_images, said at /image and -a: before, the extra image was taken, and the next
    question was refused (400) and took every image with it."""
    config = tmp_path / "llamascope.toml"
    config.write_text(
        '[models."two-images"]\npath = "builtin"\nmax_images = 2\n'
        '[models."one-image"]\npath = "builtin"\nmax_images = 1\nrequire_image = false\n'
    )
    limited = start_server(tmp_path, ["--config", str(config)])
    try:
        (tmp_path / "red.png").write_bytes(png_bytes(size=(32, 32)))
        child = spawn(limited, tmp_path, "-m", "two-images", "-a", "red.png", "-o", "max_tokens", "3")
        child.expect_exact(PROMPT)
        assert "(2 with the next message)" in command(child, "/image red.png")
        refused = command(child, "/image red.png")
        assert "error: two-images takes at most 2 images per conversation (its max_images setting)" in refused
        assert "/image clear forgets those waiting" in refused
        assert "error" not in command(child, "Compare them.")  # the two taken go with the question, answered
        assert "a new chat takes other images" in command(child, "/image red.png")
        assert command(child, "/image").count("in the conversation: data:image/png") == 2
        switched = command(child, "/model one-image")
        assert "one-image takes at most 1 image" in switched and "this conversation has 2" in switched

        # /load of a conversation past its model's limit: said at /load, not at the next question (a 400 that
        # took only that question's images, so every question after it was refused too), and not loaded.
        command(child, "/save over.json")  # names one-image, with 2 images
        (tmp_path / "bare.json").write_text(json.dumps(saved(tmp_path / "over.json")))  # no model: the chat's
        command(child, "/model two-images")
        posted = limited.log().count(" POST ")
        refused = command(child, "/load over.json")
        assert "error: over.json holds 2 images, and one-image takes at most 1 image per conversation" in refused
        assert "not loaded (the file names that model" in refused and "loaded 3" not in refused
        assert "model: two-images" in command(child, "/show")  # the conversation under way goes on
        assert "error" not in command(child, "And now?")
        command(child, "/model one-image")
        refused = command(child, "/load bare.json")
        assert "bare.json holds 2 images, and one-image takes at most 1 image" in refused
        assert "/model NAME for a model that takes more, then /load again" in refused
        assert limited.log().count(" POST ") == posted + 1  # the question only: no load was sent to be refused
        command(child, "/model two-images")
        assert "loaded 2 messages, model two-images" in command(child, "/load bare.json")
        child.sendline("/bye")
        child.expect(pexpect.EOF)

        # A model that takes text-only questions says so, not that it needs an image.
        child = spawn(limited, tmp_path, "-m", "one-image")
        child.expect_exact(PROMPT)
        assert "takes questions without one" in child.before and "needs one" not in child.before
        child.sendline("/bye")
        child.expect(pexpect.EOF)

        # -a past the limit: said at once, nothing sent.
        posted = limited.log().count(" POST ")
        child = spawn(limited, tmp_path, "-m", "one-image", "-a", "red.png", "-a", "red.png", "What is it?")
        child.expect(pexpect.EOF)
        child.close()
        assert "one-image takes at most 1 image per conversation (its max_images setting): 2 given" in child.before
        assert child.exitstatus == 2 and limited.log().count(" POST ") == posted
    finally:
        limited.stop()
