"""``llamascope chat``: one question, or a whole conversation, with any server of the DashScope native API.

``add_parser`` registers the command on ``llamascope``'s parser and ``run``
carries it out; ``answering`` asks and shows one answer, ``interactive`` is the
conversation mode, the HTTP side is ``llamascope.client.native``, the
conversation ``llamascope.client.conversation``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

from llamascope.client import attachment
from llamascope.client.answering import Display, ask, make_display, show_error
from llamascope.client.conversation import PARAMETERS, Conversation, parse_parameter
from llamascope.client.interactive import InteractiveChat, image_limit, too_many
from llamascope.client.native import DEFAULT_BASE_URL, DEFAULT_MODEL, APIError, Client
from llamascope.structured.meta import meta_problem

DESCRIPTION = """\
Ask a vision model about an image, once or in a conversation, through the
DashScope native API: a local llamascope by default, or the server that
DASHSCOPE_HTTP_BASE_URL and DASHSCOPE_API_KEY name (the variables the
official SDK reads; --base-url and --api-key override them).

With a question it prints the answer as it streams and exits (0, or 1 when
the API refused the call). Without one it starts a conversation: /help
there lists its commands.

Images: a local path, an http(s) URL (the server fetches it under its own
rules) or - for standard input. Several -a send several images with the
first question, in order; in a conversation /image adds one to the next
message at any turn (Meta recommends one image per prompt for the best
answers; the server says how many a conversation may hold).

A local file is sent inline as a data: URI, not uploaded through the SDK's
upload flow: that works with every server of the API, stores nothing on it,
and /save then writes a conversation that any key can send again later (an
upload is readable only by the key that made it, and for 48 hours)."""

EPILOG = """\
examples:
  llamascope chat -a photo.jpg "what is this?"
  llamascope chat -a https://example.com/dog.jpeg -o temperature 0 "how many dogs?"
  llamascope chat -a before.jpg -a after.jpg "what changed between the two photos?"
  cat question.txt | llamascope chat -a photo.jpg
  curl -s https://example.com/dog.jpeg | llamascope chat -a - "describe it" --json
  llamascope chat -a receipt.jpg --schema receipt.schema.json "read the receipt"
  llamascope chat -a photo.jpg            (a conversation)"""

NO_KEY = """\
llamascope chat: no API key. Give the key `llamascope serve` printed on its first start:
  export DASHSCOPE_API_KEY=sk-...
or make one (on the machine that serves, with its settings):
  export DASHSCOPE_API_KEY=$(.venv/bin/llamascope keys create --name chat)"""


def add_parser(commands: Any) -> None:
    """Register ``chat`` on the ``llamascope`` command's subparsers."""
    chat = commands.add_parser(
        "chat",
        help="ask a model about an image: one question, or a conversation",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("prompt", nargs="*", help="the question; none: a conversation, or the question from a pipe")
    chat.add_argument(
        "-a",
        "--attach",
        metavar="IMAGE",
        action="append",
        default=[],
        help="an image: a local path, an http(s) URL, or - (stdin); repeat it for several, sent in order with the"
        " first question",
    )
    chat.add_argument(
        "-m", "--model", help="model name (default: the first the server lists, else " + DEFAULT_MODEL + ")"
    )
    chat.add_argument("-s", "--system", help="system prompt")
    chat.add_argument(
        "-o",
        "--option",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter of the API, e.g. -o temperature 0.2 -o max_tokens 100 (repeatable): " + ", ".join(PARAMETERS),
    )
    chat.add_argument(
        "--base-url", help=f"the API's base URL (default: $DASHSCOPE_HTTP_BASE_URL or {DEFAULT_BASE_URL})"
    )
    chat.add_argument("--api-key", help="API key (default: $DASHSCOPE_API_KEY, then the SDK's key files)")
    chat.add_argument(
        "--schema",
        metavar="FILE",
        type=Path,
        help="a JSON Schema: the answer is held to it (response_format json_schema) and printed indented",
    )
    chat.add_argument("--json", action="store_true", help="print the final response body as JSON, not the text")
    chat.add_argument("--no-stream", action="store_true", help="ask for the whole answer at once")
    chat.add_argument("--plain", action="store_true", help="never render Markdown (it is only on a terminal anyway)")


def resolve_api_key(given: str | None) -> str | None:
    """As the official SDK finds it: the argument, $DASHSCOPE_API_KEY, $DASHSCOPE_API_KEY_FILE_PATH, ~/.dashscope."""
    if given:
        return given
    if os.environ.get("DASHSCOPE_API_KEY"):
        return os.environ["DASHSCOPE_API_KEY"]
    for name in (os.environ.get("DASHSCOPE_API_KEY_FILE_PATH"), "~/.dashscope/api_key"):
        path = Path(name).expanduser() if name else None
        if path is not None and path.is_file():
            key = path.read_text().strip()
            if key:
                return key
    return None


def discover_model(client: Client, wanted: str | None) -> tuple[str, dict[str, Any] | None]:
    """The model to use and what the server says of it. Only a llamascope lists its models: elsewhere the
    listing fails and the default name is used. An unreachable server or a wrong key is said at once."""
    try:
        served = client.models()
    except APIError as error:
        if error.code == "ConnectionError" or error.status == 401:
            raise
        served = []
    name = wanted or (served[0]["model"] if served else DEFAULT_MODEL)
    return name, next((m for m in served if m.get("model") == name), None)


def schema_format(path: Path) -> dict[str, Any]:
    """``response_format`` for the JSON Schema in ``path``, named after the file; OSError or ValueError says why
    it cannot be read."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(schema, dict):
        raise ValueError("a JSON Schema is a JSON object")
    # Checked here, as any server of the API refuses it: a batch's every line would be refused the same.
    problem = meta_problem(schema)
    if problem:
        raise ValueError(f"not a JSON Schema ({problem})")
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", path.name.split(".")[0])[:64] or "answer"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def indented(text: str, terminal: bool = False) -> str:
    """A JSON answer indented for reading; one that is not JSON (cut by max_tokens) as it is. For a
    ``terminal``, without the control characters it would act on (``display.for_terminal``): a string's
    ``\\u009b`` is one once decoded, and an answer cut short is the engine's text as it came."""
    with suppress(ValueError):
        text = json.dumps(json.loads(text), ensure_ascii=False, indent=2)
    if terminal:
        from llamascope.client.display import for_terminal  # rich, only when an answer is shown (see answering)

        text = for_terminal(text)
    return text


def one_shot(client: Client, conversation: Conversation, question: str, args: argparse.Namespace) -> int:
    conversation.ask(question)
    pretty = args.schema is not None and not args.json  # the whole answer, indented, once it is complete
    if args.json or pretty:
        from llamascope.client.display import PlainText  # rich, only when an answer is shown (see answering)

        display: Callable[[], AbstractContextManager[Display]] = lambda: PlainText(io.StringIO())  # noqa: E731
    else:
        display = make_display(sys.stdout.isatty() and not args.plain)
    try:
        answer, stopped = ask(client, conversation, not args.no_stream, display)
    except APIError as error:
        show_error(error)
        return 1
    except BrokenPipeError:  # the reader went away (`| head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if stopped:
        print("(stopped)", file=sys.stderr)
        return 130
    if args.json:
        body = answer.body if args.no_stream and answer.body else answer.final_body()
        print(json.dumps(body, ensure_ascii=False, indent=2))
    elif pretty:
        print(indented(answer.text, sys.stdout.isatty()))
    if not args.json and answer.finish_reason == "length":
        print("(the answer reached max_tokens)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """``llamascope chat``: the exit status."""
    base_url = args.base_url or os.environ.get("DASHSCOPE_HTTP_BASE_URL") or DEFAULT_BASE_URL
    key = resolve_api_key(args.api_key)
    if not key:
        print(NO_KEY, file=sys.stderr)
        return 2
    try:
        parameters = {name: parse_parameter(name, value) for name, value in args.option}
    except ValueError as exc:
        print(f"llamascope chat: {exc}", file=sys.stderr)
        return 2
    if args.schema is not None:
        try:
            parameters["response_format"] = schema_format(args.schema)
        except (OSError, ValueError) as exc:
            print(f"llamascope chat: --schema {args.schema}: {exc}", file=sys.stderr)
            return 2
    question = " ".join(args.prompt)
    interactive = not question and sys.stdin.isatty()
    if (not question or question == "-") and not interactive:
        if "-" in args.attach:
            print(
                "llamascope chat: the image comes from standard input: give the question as an argument",
                file=sys.stderr,
            )
            return 2
        question = sys.stdin.read().strip()
        if not question:
            print("llamascope chat: no question (none given, and standard input was empty)", file=sys.stderr)
            return 2
    if "-" in args.attach and interactive:
        print("llamascope chat: -a - reads standard input, which is the terminal here", file=sys.stderr)
        return 2
    if args.attach.count("-") > 1:
        print("llamascope chat: standard input holds one image: give -a - once", file=sys.stderr)
        return 2
    images = []
    for value in args.attach:
        try:
            images.append(attachment.image_reference(value))
        except OSError as exc:
            print(f"llamascope chat: {exc}", file=sys.stderr)
            return 2

    with Client(base_url, key) as client:
        try:
            model, info = discover_model(client, args.model)
        except APIError as error:
            show_error(error)
            return 1
        most = image_limit(info)
        if most is not None and len(images) > most:  # said before a question is sent (or typed) to be refused
            print(f"llamascope chat: {too_many(model, most)}: {len(images)} given with -a", file=sys.stderr)
            return 2
        conversation = Conversation(model=model, system=args.system, images=images, parameters=parameters)
        if not interactive:
            if info and info.get("test_model") and sys.stderr.isatty():
                print(f"({model} is the built-in test model: its answers are random words)", file=sys.stderr)
            return one_shot(client, conversation, question, args)
        markdown = sys.stdout.isatty() and not args.plain
        return InteractiveChat(client, conversation, info, stream=not args.no_stream, markdown=markdown).run()
