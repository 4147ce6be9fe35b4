"""``llamascope chat`` with a question, as a user runs it: a real process against a real server.

Its standard output is a pipe here, so the answer comes as plain text, exactly.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llamascope.client.chat import indented, schema_format
from tests.conftest import ADMIN_KEY, SEED_MODEL, ImageHost, Server, free_port, png_bytes, user_turn

GREEDY = ["-o", "temperature", "0", "-o", "max_tokens", "12"]


def chat(
    args: list[str], server: Server, home: Path, stdin: bytes | str = b"", **environment: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": str(home),  # no ~/.dashscope/api_key of the person running the tests
        "DASHSCOPE_HTTP_BASE_URL": server.api,
        "DASHSCOPE_API_KEY": server.key,
        **environment,
    }
    env = {k: v for k, v in env.items() if v}
    data = stdin if isinstance(stdin, bytes) else stdin.encode()
    done = subprocess.run(
        [sys.executable, "-m", "llamascope", "chat", *args], input=data, capture_output=True, env=env, timeout=120
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((200, 30, 30)))  # the same bytes as the image host's /red.png
    return path


def test_the_answer_streams_to_standard_output(server: Server, image_host: ImageHost, photo: Path) -> None:
    home = photo.parent
    streamed = chat(["-a", str(photo), *GREEDY, "What is in the picture?"], server, home)
    assert streamed.returncode == 0, streamed.stderr
    answer = streamed.stdout.removesuffix("\n")
    assert answer.strip() and "\x1b" not in streamed.stdout  # plain text: no Markdown rendering into a pipe

    # The question from standard input, the whole answer at once, the response body as JSON: the same answer.
    body = chat(["-a", str(photo), *GREEDY, "--no-stream", "--json"], server, home, stdin="What is in the picture?\n")
    assert body.returncode == 0, body.stderr
    data = json.loads(body.stdout)
    assert data["output"]["choices"][0]["message"]["content"][0]["text"] == answer
    assert data["usage"]["image_tokens"] > 0 and data["request_id"]

    # The image by URL (the server fetches it) and from standard input: the same image, the same answer.
    by_url = chat(["-a", image_host.url("/red.png"), *GREEDY, "--json", "What is in the picture?"], server, home)
    streamed_body = json.loads(by_url.stdout)
    assert streamed_body["output"] == data["output"] and streamed_body["usage"] == data["usage"]
    piped = chat(["-a", "-", *GREEDY, "What is in the picture?"], server, home, stdin=photo.read_bytes())
    assert piped.returncode == 0 and piped.stdout == streamed.stdout

    # Several -a: every image goes with the question, in order.
    both = ["-a", str(photo), "-a", "-", *GREEDY, "--json", "Compare them."]
    two = chat(both, server, home, stdin=photo.read_bytes())
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["usage"]["image_tokens"] == 2 * data["usage"]["image_tokens"]


def test_options_override_the_environment_and_choose_the_model(server: Server, photo: Path) -> None:
    options = ["--base-url", server.api, "--api-key", server.key, "-m", "llama3.2-11b-vision"]
    done = chat(
        ["-a", str(photo), *options, *"--json -o max_tokens 3 Hi".split()],
        server,
        photo.parent,
        DASHSCOPE_HTTP_BASE_URL=f"http://127.0.0.1:{free_port()}/api/v1",
        DASHSCOPE_API_KEY="sk-wrong",
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["usage"]["output_tokens"] == 3
    assert "model=llama3.2-11b-vision" in server.access_line(data["request_id"])


def used_up_key(server: Server) -> str:
    r = httpx.post(
        server.base + "/admin/keys",
        json={"name": "used up", "allowance": 1},  # every model; an allowance is at least 1 token: spend it
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    key = r.json()["data"]["api_key"]
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    spend = {"model": SEED_MODEL, "input": {"messages": [user_turn(image)]}, "parameters": {"max_tokens": 1}}
    path = "/api/v1/services/aigc/multimodal-generation/generation"
    spent = httpx.post(server.base + path, json=spend, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert spent.status_code == 200, spent.text
    return key


@pytest.mark.parametrize(
    "case,expected,status",
    [
        ("wrong key", "InvalidApiKey (HTTP 401): Invalid API-key provided.", 1),
        ("refused image", "InvalidParameter.DataInspection (HTTP 400): ", 1),
        ("used-up allowance", "AllocationQuota.FreeTierOnly (HTTP 403): ", 1),
        ("unreachable server", "ConnectionError: cannot reach http://127.0.0.1:", 1),
        ("no image", "InvalidParameter (HTTP 400): messages[0]: the first user message must carry", 1),
        ("missing file", "llamascope chat: no such file: nothere.png", 2),
        ("no key", "llamascope chat: no API key.", 2),
        (
            "over the body limit",
            "HTTP 413): Exceeded limit on max bytes to request body : 33554432 [request_id",
            1,
        ),
    ],
)
def test_errors_are_shown_as_the_api_gave_them(
    case: str, expected: str, status: int, server: Server, image_host: ImageHost, photo: Path
) -> None:
    args, env = ["-a", str(photo), "What is it?"], {}
    if case == "wrong key":
        env = {"DASHSCOPE_API_KEY": "sk-wrong"}
    elif case == "refused image":
        args[1] = image_host.url("/anim.gif")
    elif case == "used-up allowance":
        env = {"DASHSCOPE_API_KEY": used_up_key(server)}
    elif case == "unreachable server":
        env = {"DASHSCOPE_HTTP_BASE_URL": f"http://127.0.0.1:{free_port()}/api/v1"}
    elif case == "no image":
        args = ["What is it?"]
    elif case == "missing file":
        args[1] = "nothere.png"
    elif case == "no key":
        env = {"DASHSCOPE_API_KEY": ""}
    elif case == "over the body limit":  # three photos of 8 MB, sent inline: 32 MB of base64
        big = photo.parent / "big.bin"
        big.write_bytes(b"\0" * (8 << 20))
        args = ["-a", str(big), "-a", str(big), "-a", str(big), "What is it?"]
    done = chat(args, server, photo.parent, **env)
    assert done.returncode == status
    assert expected in done.stderr
    if "HTTP 413" in expected:
        assert "\n  (local images are sent inline" in done.stderr  # and what to do
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_reader_that_goes_away_stops_the_answer_quietly(server: Server, photo: Path) -> None:
    """``llamascope chat ... | head -c 20``: no traceback, and the server stops generating."""
    env = {**os.environ, "HOME": str(photo.parent), "DASHSCOPE_HTTP_BASE_URL": server.api}
    env["DASHSCOPE_API_KEY"] = server.key
    args = ["-a", str(photo), "-o", "max_tokens", "8000", "-o", "min_new_tokens", "8000", "Go on."]
    process = subprocess.Popen(
        [sys.executable, "-m", "llamascope", "chat", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(20)
    process.stdout.close()
    assert process.wait(60) == 141
    assert "Traceback" not in process.stderr.read().decode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(server.base + "/health").json()["models"][SEED_MODEL]["running"]:
        time.sleep(0.1)
    assert httpx.get(server.base + "/health").json()["models"][SEED_MODEL]["running"] == 0


def test_a_schema_holds_the_answer_and_prints_it_indented(server: Server, photo: Path, tmp_path: Path) -> None:
    """Issue 24: ``--schema FILE`` sends it as response_format json_schema and prints the answer indented."""
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "shade": {"type": "integer", "maximum": 9}},
        "required": ["colour", "shade"],
        "additionalProperties": False,
    }
    path = tmp_path / "colour.schema.json"
    path.write_text(json.dumps(schema))
    home = tmp_path / "home"
    home.mkdir()
    args = ["-a", str(photo), "--schema", str(path), "-o", "max_tokens", "64", "-o", "seed", "3", "Which colour?"]
    done = chat(args, server, home)
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert done.stdout == json.dumps(value, indent=2) + "\n"
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["shade"], int) and value["shade"] <= 9
    body = json.loads(chat([*args, "--json"], server, home).stdout)  # the same seed, the same answer
    assert json.loads(body["output"]["choices"][0]["message"]["content"][0]["text"]) == value

    path.write_text("{not json")
    refused = chat(args, server, home)
    assert refused.returncode == 2 and f"--schema {path}" in refused.stderr


@pytest.mark.parametrize(
    "schema",
    [{"$schema": 5, "type": "object"}, {"type": "string", "pattern": "^a{4294967296}$"}],
    ids=["dialect", "pattern"],
)
def test_a_schema_jsonschema_cannot_read_is_named_not_a_traceback(schema: dict, tmp_path: Path) -> None:
    """``--schema`` checks the file as the server does: jsonschema raised AttributeError for a $schema that is a
    number, re OverflowError for a repetition past 2**32 - 1, and the command ended in a traceback."""
    path = tmp_path / "odd.schema.json"
    path.write_text(json.dumps(schema))
    with pytest.raises(ValueError, match=r"^not a JSON Schema"):
        schema_format(path)


def test_a_schema_answer_printed_to_a_terminal_has_no_control_characters() -> None:
    """``--schema`` printed its answer past the display, straight to the terminal: a JSON string's ``\\u009b``
    (CSI), valid JSON a model may be steered to write, came out decoded, and an answer cut short (no JSON) came
    out with its ESC sequences as the engine sent them. A pipe still gets the exact text."""
    answer = json.dumps({"note": "\x9b2J\x1b]52;c;cHduZWQ=\x07 \x7f done"})
    shown = indented(answer, terminal=True)
    assert json.loads(shown) == {"note": "2J\x1b]52;c;cHduZWQ=\x07  done"}  # C0 stays escaped, as JSON writes it
    assert not any(c in shown for c in "\x9b\x7f\x1b\x07")
    assert "\x9b" in indented(answer)  # a pipe: the text as decoded
    cut = '{"note": "\x1b]0;title\x07 \x1b[2J'
    assert indented(cut, terminal=True) == '{"note": "]0;title [2J' and indented(cut) == cut
