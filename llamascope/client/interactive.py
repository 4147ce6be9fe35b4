"""The conversation of ``llamascope chat`` without a question: a prompt, slash commands, answers as they stream.

Ctrl+C while an answer is written closes its stream: the server sees the
client go and stops generating; what arrived is kept as the answer (``/retry``
asks again, ``/undo`` forgets it). Ctrl+C at the prompt clears the line.
What was typed is kept by readline in ``history_file()``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamascope.client import attachment
from llamascope.client.answering import USAGE_KEYS, ask, make_display, show_error
from llamascope.client.conversation import PARAMETERS, Conversation, parse_parameter
from llamascope.client.native import Answer, APIError, Client

HELP = """\
  /image PATH|URL     add an image to the next message, at any turn (again: several in one message,
                      as images to compare should be)
  /image              list the conversation's images and those waiting for the next message
  /image clear        forget the images waiting for the next message
  /system [TEXT]      set the system prompt (without TEXT: remove it)
  /set [NAME [VALUE]] set a parameter of the API (without VALUE: back to the server's default;
                      without NAME: list them)
  /model [NAME]       use another model (without NAME: list the served ones)
  /retry              ask the last question again, for a new answer
  /undo               forget the last question and its answer
  /clear              start again (keeps the images, system prompt and parameters)
  /save FILE          save the conversation as the JSON request body the API accepts
  /load FILE          continue a saved conversation (a request body or a list of messages)
  /stats              time to first token, tokens per second and usage: last answer and session
  /show               model, server, images, system prompt, parameters
  /help               this list
  /bye                leave (or Ctrl+D)
  \"\"\"                 begins and ends a message of several lines
  Ctrl+C              stops the answer being written (the server stops too); the chat goes on"""

MULTILINE = '"""'
REFUSALS_OF_IMAGES = (400, 413)  # statuses an image may be the cause of: the question takes its images with it


def history_file() -> Path:
    """Where readline keeps what was typed: the user's state directory (XDG)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llamascope" / "chat_history"


def say(text: str) -> None:
    print(text, flush=True)


class InteractiveChat:
    def __init__(
        self,
        client: Client,
        conversation: Conversation,
        model_info: dict[str, Any] | None,
        stream: bool = True,
        markdown: bool = False,
    ) -> None:
        self.client = client
        self.conversation = conversation
        self.model_info = model_info
        self.stream = stream
        self.display = make_display(markdown)
        self.last: Answer | None = None
        self.last_stopped = False
        self.answers = 0
        self.totals = dict.fromkeys(USAGE_KEYS, 0)
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "/image": self.image,
            "/system": self.system,
            "/set": self.set,
            "/model": self.model,
            "/retry": self.retry,
            "/undo": self.undo,
            "/clear": self.clear,
            "/save": self.save,
            "/load": self.load,
            "/stats": self.stats,
            "/show": self.show,
            "/help": self.help,
            "/?": self.help,
            "/bye": self.bye,
            "/exit": self.bye,
            "/quit": self.bye,
        }

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        history = self._start_history()
        self.banner()
        try:
            while True:
                try:
                    line = self.read()
                except EOFError:
                    say("")
                    break
                except KeyboardInterrupt:
                    say("\n(Ctrl+D or /bye leaves)")
                    continue
                if not line.strip():
                    continue
                if line.startswith("/") and not line.startswith("//"):
                    name, _, rest = line.strip().partition(" ")
                    command = self.commands.get(name.lower())
                    if command is None:
                        say(f"unknown command {name}: /help lists them")
                    elif command(rest.strip()):
                        break
                    continue
                self.conversation.ask(line.removeprefix("/"))
                self.reply()
        finally:
            self._save_history(history)
        return 0

    def read(self) -> str:
        line = input(">>> ")
        if not line.lstrip().startswith(MULTILINE):
            return line
        first = line.lstrip()[len(MULTILINE) :]
        if first.rstrip().endswith(MULTILINE):
            return first.rstrip()[: -len(MULTILINE)]
        lines = [first] if first else []
        while True:
            more = input("... ")
            if more.rstrip().endswith(MULTILINE):
                lines.append(more.rstrip()[: -len(MULTILINE)])
                return "\n".join(lines).strip("\n")
            lines.append(more)

    def banner(self) -> None:
        c = self.conversation
        note = ""
        if self.model_info and self.model_info.get("test_model"):
            note = " (the built-in test model: tiny and random, its answers are random words)"
        say(f"llamascope chat: {c.model}{note} at {self.client.base_url}")
        for image in c.images:
            say(f"image: {attachment.describe(image)}")
        if not c.images:
            needed = not self.model_info or self.model_info.get("requires_image") is not False
            say(
                "no image yet: this model needs one with the first question; /image PATH|URL attaches it"
                if needed
                else "no image yet (this model takes questions without one): /image PATH|URL attaches one"
            )
        say('/help lists the commands, """ begins a message of several lines, Ctrl+D or /bye leaves.')

    def reply(self) -> None:
        """Answer the conversation as it stands (it ends with a question)."""
        try:
            answer, stopped = ask(self.client, self.conversation, self.stream, self.display)
        except APIError as error:
            # A refusal (400, 413) is most often of an image (its format, its size, one too many): the question
            # takes its images with it, so that the next one is not refused again. Any other failure (the server
            # busy or unreachable, an engine down, the key) is not theirs: they wait for the question asked again.
            refused = error.status in REFUSALS_OF_IMAGES
            dropped = self.conversation.unanswered(keep_images=not refused)
            show_error(error)
            if dropped and refused:
                say(f"({_images(len(dropped))} went with the question: /image adds again)")
            elif dropped:
                say(f"({_images(len(dropped))} will go with the next question: ask again)")
            return
        self.last, self.last_stopped = answer, stopped
        if answer.usage:
            self.answers += 1
            for key in USAGE_KEYS:
                self.totals[key] += answer.usage.get(key, 0)
        if stopped:
            if answer.text:
                self.conversation.answered(answer.text)
                say("\n(stopped; the answer so far is kept: /retry asks again, /undo forgets it)")
            else:
                self.conversation.unanswered()
                say("\n(stopped before the answer began)")
            return
        self.conversation.answered(answer.text)
        if answer.finish_reason == "length":
            say("(the answer reached max_tokens: /set max_tokens N allows more)")

    # -- commands: each returns True to leave -----------------------------------

    def image(self, value: str) -> None:
        c = self.conversation
        if not value:
            sent = c.sent_images()
            for image in sent:
                say(f"in the conversation: {attachment.describe(image)}")
            for image in c.images:
                say(f"with the next message: {attachment.describe(image)}")
            if not sent and not c.images:
                say("no image: /image PATH|URL adds one")
            return
        if value == "clear":
            say(f"forgot {_images(len(c.images))} waiting for the next message" if c.images else "none waiting")
            c.images.clear()
            return
        if value == "-":
            say("error: standard input is this terminal here: give a path or a URL")
            return
        # Said now, not at the next question: the server would refuse it with the question and its images.
        most, held = image_limit(self.model_info), len(c.sent_images()) + len(c.images)
        if most is not None and held >= most:
            way = (
                "/image clear forgets those waiting" if held - len(c.images) < most else "a new chat takes other images"
            )
            say(f"error: {too_many(c.model, most)}, and this conversation has {held}: {way}")
            return
        try:
            reference = attachment.image_reference(_typed_path(value))
        except OSError as exc:
            say(f"error: {exc}")
            return
        c.images.append(reference)
        waiting = f" ({len(c.images)} with the next message)" if len(c.images) > 1 else ""
        say(f"image: {attachment.describe(reference)}{waiting}")

    def system(self, value: str) -> None:
        self.conversation.system = value or None
        say(f"system prompt: {value}" if value else "no system prompt")

    def set(self, value: str) -> None:
        if not value:
            say("parameters (/set NAME VALUE, /set NAME for the server's default):")
            for name, parameter in PARAMETERS.items():
                current = self.conversation.parameters.get(name)
                shown = "(default)" if current is None else _json(current)
                say(f"  {name:<20} {shown:<12} {parameter.meaning}")
            for name, current in self.conversation.parameters.items():
                if name not in PARAMETERS:
                    say(f"  {name:<20} {_json(current):<12} (sent as given)")
            return
        name, _, raw = value.partition(" ")
        raw = raw.strip()
        if not raw:
            self.conversation.parameters.pop(name, None)
            say(f"{name}: the server's default")
            return
        try:
            self.conversation.parameters[name] = parse_parameter(name, raw)
        except ValueError as exc:
            say(f"error: {exc}")
            return
        unknown = "" if name in PARAMETERS else " (not a parameter llamascope knows: sent as given)"
        say(f"{name} = {_json(self.conversation.parameters[name])}{unknown}")

    def model(self, value: str) -> None:
        if value:
            try:
                listed = {m["model"]: m for m in self.client.models()}
            except APIError:  # a server without the listing (the hosted service): the name as given
                listed = {}
            if listed and value not in listed:
                say(f"error: {value} is not served here: /model lists the models that are")
                return
            self.conversation.model = value
            self.model_info = listed.get(value)
            say(f"model: {value}")
            held = len(self.conversation.sent_images()) + len(self.conversation.images)
            most = image_limit(self.model_info)
            if most is not None and held > most:
                say(f"({too_many(value, most)}: this conversation has {held}, the next question would be refused)")
            return
        say(f"model: {self.conversation.model}")
        try:
            served = self.client.models()
        except APIError as error:
            say(f"(the server lists no models: {error.describe()})")
            return
        for m in served:
            test = " (built-in test model)" if m.get("test_model") else ""
            say(f"  {m['model']}{test}")

    def retry(self, _: str) -> None:
        question = self.conversation.last_question()
        if question is None:
            say("nothing to retry")
            return
        self.conversation.ask(question)
        self.reply()

    def undo(self, _: str) -> None:
        waiting = len(self.conversation.images)
        if not self.conversation.undo():
            say("nothing to undo")
            return
        back = len(self.conversation.images) - waiting
        back_note = f" ({_images(back)} back for the next message)" if back else ""
        say("forgot the last question and its answer" + back_note)

    def clear(self, _: str) -> None:
        self.conversation.clear()
        say("a new conversation (same images, system prompt and parameters)")

    def save(self, value: str) -> None:
        if not value:
            say("/save FILE")
            return
        path = Path(_typed_path(value)).expanduser()
        try:
            path.write_text(self.conversation.save(), encoding="utf-8")
        except OSError as exc:
            say(f"error: cannot write {value}: {exc.strerror or exc}")
            return
        say(f"saved {len(self.conversation.turns)} messages to {path}")

    def load(self, value: str) -> None:
        if not value:
            say("/load FILE")
            return
        try:
            text = Path(_typed_path(value)).expanduser().read_text(encoding="utf-8")
            loaded = Conversation.load(text, model=self.conversation.model)
        except OSError as exc:
            say(f"error: cannot read {value}: {exc.strerror or exc}")
            return
        except ValueError as exc:
            say(f"error: {value} is not a conversation: {exc}")
            return
        info = self.model_info if loaded.model == self.conversation.model else self._listed(loaded.model)
        # Said now, not at the next question (a 400 that takes only that question's images, so every later one is
        # refused too): the images a conversation sent stay in it. Refused, not loaded with a warning: /load
        # replaces the conversation under way, which may be unsaved, with one that no question could continue.
        most, held = image_limit(info), len(loaded.sent_images())
        if most is not None and held > most:
            way = (
                'the file names that model: a model that takes more, named in its "model", continues it'
                if _names_model(text)
                else "/model NAME for a model that takes more, then /load again"
            )
            say(f"error: {value} holds {_images(held)}, and {too_many(loaded.model, most)}: not loaded ({way})")
            say("(the conversation goes on as it was)")
            return
        self.conversation, self.model_info = loaded, info
        say(f"loaded {len(loaded.turns)} messages, model {loaded.model}")
        if loaded.turns and loaded.turns[-1].role == "user":
            say("it ends with a question: answering it")
            self.reply()

    def _listed(self, model: str) -> dict[str, Any] | None:
        """What the server lists of ``model`` (None: not listed, or a server without the listing)."""
        try:
            return next((m for m in self.client.models() if m["model"] == model), None)
        except APIError:
            return None

    def stats(self, _: str) -> None:
        answer = self.last
        if answer is None:
            say("no answer yet")
            return
        ttft = answer.time_to_first_token
        rate = answer.tokens_per_second
        how = "stopped" if self.last_stopped else (answer.finish_reason or "unfinished")
        say(
            "last answer: "
            + (f"first token after {ttft:.2f} s" if ttft is not None else "no token")
            + (f", {rate:.1f} tokens/s" if rate is not None else "")
            + f", ended: {how}"
        )
        say(f"  usage: {_usage(answer.usage)}" + (f"  (request {answer.request_id})" if answer.request_id else ""))
        say(f"session: {self.answers} answer{'' if self.answers == 1 else 's'}, {_usage(self.totals)}")

    def show(self, _: str) -> None:
        c = self.conversation
        say(f"model: {c.model}  at {self.client.base_url}")
        images = c.sent_images() + c.images
        say(f"images: {', '.join(attachment.describe(i) for i in images) if images else '(none)'}")
        say(f"system prompt: {c.system or '(none)'}")
        say(f"parameters: {_json(c.parameters) if c.parameters else '(the server defaults)'}")
        say(f"messages so far: {len(c.turns)}")

    def help(self, _: str) -> None:
        say(HELP)

    def bye(self, _: str) -> bool:
        return True

    # -- readline ------------------------------------------------------------------

    @staticmethod
    def _start_history() -> Path | None:
        try:
            import readline  # not on every platform, and importing it changes how input() reads lines
        except ImportError:  # not on every platform; input() still works
            return None
        path = history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                readline.read_history_file(path)
        except OSError:
            return None
        readline.set_history_length(1000)
        return path

    @staticmethod
    def _save_history(path: Path | None) -> None:
        if path is None:
            return
        import readline  # loaded by _start_history already (which returned a path)

        try:
            readline.write_history_file(path)
        except OSError as exc:
            print(f"(history not saved: {exc.strerror or exc})", file=sys.stderr)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _usage(usage: dict[str, int]) -> str:
    parts = [f"{key.removesuffix('_tokens')} {usage[key]:,}" for key in USAGE_KEYS if key in usage]
    return (", ".join(parts) + " tokens") if parts else "no usage reported"


def image_limit(model_info: dict[str, Any] | None) -> int | None:
    """The images a conversation may hold, as the server lists the model (``max_images``); None: not said (a
    server without the listing), so the server's answer is the only check."""
    most = (model_info or {}).get("max_images")
    return most if isinstance(most, int) and not isinstance(most, bool) and most > 0 else None


def too_many(model: str, most: int) -> str:
    return f"{model} takes at most {_images(most)} per conversation (its max_images setting)"


def _names_model(saved: str) -> bool:
    """Whether a saved conversation names its model (``Conversation.load`` takes it over the chat's)."""
    data = json.loads(saved)
    return isinstance(data, dict) and bool(data.get("model"))


def _typed_path(value: str) -> str:
    """A path as typed or, when that names no file, as a shell reads it: a file dragged into a terminal comes
    quoted ('/home/me/my photo.png') or with its spaces escaped (my\\ photo.png). For /image, /load, /save."""
    if value.startswith(attachment.PASSED_ON) or Path(value).expanduser().exists():
        return value
    try:
        words = shlex.split(value)
    except ValueError:  # an unclosed quote: as typed
        return value
    return words[0] if len(words) == 1 else value


def _images(n: int) -> str:
    return "1 image" if n == 1 else f"{n} images"
