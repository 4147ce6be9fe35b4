"""The ``llamascope`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llamascope import __version__
from llamascope.accounts import admin
from llamascope.accounts.access import KEY_RULE, MAKE_A_KEY, key_weakness
from llamascope.accounts.records import utcnow
from llamascope.engines.builtin_model import ensure_test_model
from llamascope.settings import ModelSpec, Settings, describe_error


def _model_arg(value: str) -> tuple[str, ModelSpec]:
    """NAME=PATH (local weights, 'builtin') or NAME=openai+URL[,openai+URL...] (upstream engines)."""
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        # Not echoed where it may hold a URL's password (openai+http://user:password@host/v1 without its NAME=)
        got = "an engine URL without its NAME=" if "@" in value else repr(value)
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {got}")
    try:
        if source.startswith("openai+"):
            urls = [u.strip().removeprefix("openai+") for u in source.split(",") if u.strip()]
            return name, ModelSpec(upstreams=urls)
        return name, ModelSpec(path=source)  # 'builtin' is the test model's short name (ModelSpec)
    except ValidationError as exc:
        # Named, not repeated: the message shows the URL, without a password it may hold
        raise argparse.ArgumentTypeError(f"{name}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _checked(parse: Callable[..., Any], name: str, *args: Any) -> Callable[[str], Any]:
    """An argparse type from one of accounts.admin's value checks; argparse names the option itself."""

    def convert(value: str) -> Any:
        try:
            return parse(value, name, *args)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name} ")) from None

    return convert


BUILD_TEST_MODEL_DESCRIPTION = (
    "Build the built-in test model, a tiny randomly initialised Llama 3.2 Vision model, if it "
    "is not built yet, and print its directory: a Hugging Face model directory to pass to "
    "`serve --model NAME=DIR`, or to transformers. `serve` builds it itself when it needs it."
)

KEYS_CREATE_DESCRIPTION = (
    "Make a key and print it (once: only its hash is kept). Without --model the key may call "
    "every model the server serves, however the server is configured (one grant, shown as '*', with one "
    "allowance shared by all models). --model names a model for the grant: any name is accepted, since "
    "a server (or another replica) may serve models this command's settings do not list; a name not in "
    "them is granted with a warning. A running server sees a new key on its next request."
)

KEYS_GRANT_DESCRIPTION = (
    "Grant a model to a key, or replace its grant: a fresh allowance from now, the tokens used "
    "so far forgotten. Any model name is accepted (a name this command's settings do not list is granted "
    "with a warning); '*' grants every model. A model's own grant goes before the key's '*' grant."
)


# The commands that never need the client: their parser is built without chat's (see build_parser).
SERVER_COMMANDS = frozenset({"serve", "keys", "usage", "db", "build-test-model"})


def build_parser(with_chat: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamascope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llamascope {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    tokens = _checked(admin.parse_tokens, "allowance")
    days = _checked(admin.parse_days, "days")

    serve = commands.add_parser("serve", help="serve the DashScope API")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        metavar="NAME=PATH",
        help="serve NAME from a local Hugging Face directory ('builtin' for the test model), or through "
        "OpenAI-compatible engines: NAME=openai+http://host:port/v1[,openai+http://...] (repeatable). "
        "Replaces the models of the config file.",
    )
    serve.add_argument("--config", type=Path, help="TOML config file (default: $LLAMASCOPE_CONFIG)")
    serve.add_argument("--threads", type=int, help="PyTorch threads (default: one per usable core)")
    serve.add_argument(
        "--device",
        help="auto (default: a CUDA GPU when one is visible, else the CPU), cpu, cuda (every visible GPU, "
        "a model too large for one split across them) or cuda:N",
    )
    serve.add_argument("--log-level", help="debug, info, warning, error, critical (default info)")

    build = commands.add_parser(
        "build-test-model",
        help="build the built-in test model (tiny, random weights) and print its directory",
        description=BUILD_TEST_MODEL_DESCRIPTION,
    )
    build.add_argument("--cache-dir", type=Path, help="where to build it (default: $LLAMASCOPE_CACHE_DIR)")

    keys_parser = commands.add_parser("keys", help="API keys and their model grants")
    keys = keys_parser.add_subparsers(dest="action", required=True)
    create = keys.add_parser(
        "create",
        help="make a key and print it (once: only its hash is kept)",
        description=KEYS_CREATE_DESCRIPTION,
    )
    create.add_argument("--name", default="", help="a note of whose key it is")
    create.add_argument(
        "--model",
        action="append",
        help="a model to grant (repeatable; default: every served model, '*'); its allowance defaults to the "
        "model's allowance_tokens/allowance_days in the settings",
    )
    create.add_argument(
        "--allowance",
        type=tokens,
        help="tokens (input + output) per grant, or 'unlimited' (default: the model's; 1,000,000 for '*')",
    )
    create.add_argument(
        "--days", type=days, help="days each grant's allowance is valid, or 'unlimited' (default: the model's, 180)"
    )
    create.add_argument(
        "--expires-days",
        type=_checked(admin.parse_days, "expires-days", False),
        help="days until the key itself expires (above 0; default: never)",
    )
    create.add_argument(
        "--rpm", type=_checked(admin.parse_limit, "rpm"), help="requests per minute (default: no limit)"
    )
    create.add_argument("--tpm", type=_checked(admin.parse_limit, "tpm"), help="tokens per minute (default: no limit)")
    create.add_argument(
        "--concurrency", type=_checked(admin.parse_limit, "concurrency"), help="requests at once (default: no limit)"
    )
    listing = keys.add_parser("list", help="keys (prefix only), their state, expiry, limits, grants and use")
    revoke = keys.add_parser("revoke", help="revoke a key: its next request is refused")
    revoke.add_argument("key", help="the key's id, the key itself, or an unambiguous prefix of it")
    grant = keys.add_parser(
        "grant",
        help="grant a model to a key, with a fresh allowance",
        description=KEYS_GRANT_DESCRIPTION,
    )
    grant.add_argument("key", help="the key's id, the key itself, or an unambiguous prefix of it")
    grant.add_argument("--model", required=True, help="the model name clients call, or '*' for every model")
    grant.add_argument(
        "--allowance", type=tokens, help="tokens (input + output), or 'unlimited' (default: the model's, 1,000,000)"
    )
    grant.add_argument(
        "--days", type=days, help="days the allowance is valid, or 'unlimited' (default: the model's, 180)"
    )

    usage = commands.add_parser("usage", help="requests and tokens per day, key and model; or single requests")
    usage.add_argument("--key", help="only this key (its id, the key itself, or a prefix)")
    usage.add_argument(
        "--days", type=_checked(admin.parse_days, "days", False), help="only the last N days (default: all)"
    )
    usage.add_argument(
        "--requests",
        type=_checked(admin.parse_limit, "requests"),
        metavar="N",
        help="list the N newest requests one by one, with how each ended (ok, cancelled, or the error code)",
    )

    db = commands.add_parser("db", help="the accounts database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply schema migrations")
    if with_chat:
        # why: the client (httpx, and rich through it: 0.1-0.2 s) loads only when the command may be a client's
        from llamascope.client import batch, chat

        chat.add_parser(commands)
        batch.add_parser(commands)
    for command in (create, listing, revoke, grant, usage, upgrade):
        command.add_argument("--config", type=Path, help="TOML config file (default: $LLAMASCOPE_CONFIG)")
    return parser


def weak_keys(keys: list[str]) -> list[str]:
    """Lines that say which keys of the settings are too easy to guess, and how to make a good one."""
    lines = [f"  key {i + 1} ({key[:7]}…): {reason}" for i, key in enumerate(keys) if (reason := key_weakness(key))]
    if lines:
        lines.insert(0, "the API keys of the settings (LLAMASCOPE_API_KEYS or api_keys) must be hard to guess:")
        lines.append(f"  {KEY_RULE}; {MAKE_A_KEY}")
    return lines


def serve(args: argparse.Namespace) -> int:
    """``llamascope serve``: the settings from the environment, the config file and the options; then the server."""
    overrides: dict[str, object] = {
        "host": args.host,
        "port": args.port,
        "torch_threads": args.threads,
        "device": args.device,
        "log_level": args.log_level,
    }
    if args.model:
        overrides["models"] = dict(args.model)
    try:
        settings = Settings.load(args.config, **overrides)
    except Exception as exc:  # pydantic's ValidationError or a missing file: say it plainly
        print(f"llamascope: bad settings: {describe_error(exc)}", file=sys.stderr)
        return 2
    if weak := weak_keys(settings.api_keys):
        print("llamascope: cannot start: " + "\n".join(weak), file=sys.stderr)
        return 2
    # The server's stack (FastAPI, SQLAlchemy, uvicorn) loads only for the commands that run it: chat starts fast.
    from llamascope import server

    return server.serve(settings)


def accounts_command(args: argparse.Namespace) -> int:
    # why: the store (SQLAlchemy) loads only for the commands that use it, and never the server's stack
    # (FastAPI, uvicorn, the engines): chat starts fast, and so do these
    from llamascope.accounts.store import StoreUnreachable, open_store, printable_url

    try:
        settings = Settings.load(getattr(args, "config", None))
    except Exception as exc:
        print(f"llamascope: bad settings: {describe_error(exc)}", file=sys.stderr)
        return 2
    try:
        store = open_store(settings.database, settings.data_dir if settings.database_url is None else None)
    except StoreUnreachable as exc:
        print(f"llamascope: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "db":
            print(f"schema up to date in {printable_url(store.url)}")
        elif args.command == "usage":
            key_id = store.key(args.key).id if args.key else None
            since = utcnow() - timedelta(days=args.days) if args.days else None
            if args.requests:
                print(admin.requests_table(store.requests(key_id, since, args.requests)))
            else:
                print(admin.usage_table(store.usage(key_id, since)))
        elif args.action == "create":
            # Checked before the warning: a name refused (empty) is not "granted anyway".
            _warn_unknown(admin.unknown_models(admin.parse_models(args.model), settings.models), settings)
            key, view, grants = admin.create_key(
                store,
                admin.model_allowances(settings.models),
                name=args.name,
                models=args.model,
                allowance=args.allowance,
                days=args.days,
                expires_days=args.expires_days,
                requests_per_minute=args.rpm,
                tokens_per_minute=args.tpm,
                max_concurrent=args.concurrency,
            )
            print(key)
            print(f"(key id {view.id}; shown only now, only its hash is kept)", file=sys.stderr)
            print(admin.keys_table([(view, grants)]), file=sys.stderr)
        elif args.action == "list":
            print(admin.keys_table(store.list_keys()))
        elif args.action == "revoke":
            view = store.revoke(args.key)
            print(f"revoked key {view.id} ({view.prefix}…)")
        elif args.action == "grant":
            view = store.key(args.key)
            _warn_unknown(admin.unknown_models(admin.parse_models([args.model]), settings.models), settings)
            admin.grant_models(
                store, view.id, [args.model], admin.model_allowances(settings.models), args.allowance, args.days
            )
            print(admin.keys_table([(v, g) for v, g in store.list_keys() if v.id == view.id]))
    except (LookupError, ValueError) as exc:
        print(f"llamascope: {exc}", file=sys.stderr)
        return 2
    return 0


def _warn_unknown(models: list[str], settings: Settings) -> None:
    for model in models:
        print(
            f"llamascope: warning: {model!r} is not among the models of these settings ({', '.join(settings.models)}); "
            "granted anyway, for a server that serves it (check the name: a client must call it exactly so)",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_chat=not argv or argv[0] not in SERVER_COMMANDS).parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command in ("keys", "usage", "db"):
        return accounts_command(args)
    if args.command == "chat":
        from llamascope.client import chat  # why: see build_parser

        return chat.run(args)
    if args.command == "batch":
        from llamascope.client import batch  # why: see build_parser

        return batch.run(args)
    if args.command == "build-test-model":
        # Observability (prometheus-client, OpenTelemetry) loads only for the commands that serve or build:
        # chat starts fast. (PyTorch and transformers load inside ensure_test_model.)
        from llamascope.observability import logs

        logs.configure("info")
        print(ensure_test_model(args.cache_dir or Settings.load().cache_dir))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
