"""The ``llamascope`` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llamascope import __version__
from llamascope.client import chat
from llamascope.settings import BUILTIN, ModelSpec, Settings, describe_error

if TYPE_CHECKING:
    from llamascope.accounts.records import ModelAllowance
    from llamascope.accounts.store import AccountStore

log = logging.getLogger("llamascope")


def _model_arg(value: str) -> tuple[str, ModelSpec]:
    """NAME=PATH (local weights, 'builtin') or NAME=openai+URL[,openai+URL...] (upstream engines)."""
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    try:
        if source.startswith("openai+"):
            urls = [u.strip().removeprefix("openai+") for u in source.split(",") if u.strip()]
            return name, ModelSpec(upstreams=urls)
        return name, ModelSpec(path=BUILTIN if source in ("builtin", BUILTIN) else source)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{value}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


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


def build_parser() -> argparse.ArgumentParser:
    from llamascope.accounts import admin

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
    serve.add_argument("--log-level", help="debug, info, warning, error (default info)")

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
    chat.add_parser(commands)
    for command in (create, listing, revoke, grant, usage, upgrade):
        command.add_argument("--config", type=Path, help="TOML config file (default: $LLAMASCOPE_CONFIG)")
    return parser


def configure_logging(level: str) -> None:
    from llamascope.observability import logs

    logs.configure(level)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota if one is set.

    PyTorch counts the host's cores; in a container limited to 2 CPUs on a
    64-core host that oversubscribes 32-fold (bench/threads.py: 4x
    oversubscription already makes each decode step 1.5x slower here).
    """
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


# How long PyTorch's OpenMP worker threads (GNU libgomp) spin after a parallel region before they sleep.
# libgomp's default, 300,000 spins, keeps them busy between the many small operations of a decode step,
# taking a core from the event loop (and, on a small machine, from the clients): bench/engine.py's
# decode load at 16 concurrent streams ran 11% faster with 30,000 (an A/B of two rounds of each of three
# settings, one at a time 4% slower); 10,000 and below cost more than they gave.
GOMP_SPIN_COUNT = "30000"


def configure_openmp() -> None:
    """The OpenMP workers' spinning (``GOMP_SPIN_COUNT``), unless the environment sets a wait policy of its
    own. libgomp reads it once, when PyTorch loads it: call this before anything imports torch."""
    if "torch" not in sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPIN_COUNT


def configure_torch(threads: int | None) -> int:
    """Set PyTorch's threads deliberately: its defaults oversubscribe containers."""
    configure_openmp()
    import torch

    count = threads or usable_cores()
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # already set earlier in this process
        torch.set_num_interop_threads(1)  # llamascope runs one generation per engine thread
    return count


def listen(host: str, port: int) -> socket.socket:
    """Bind the server's address before anything slow (a model load takes minutes) or anything written:
    a port already in use stops start-up at once. uvicorn serves on this very socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def weak_keys(keys: list[str]) -> list[str]:
    """Lines that say which keys of the settings are too easy to guess, and how to make a good one."""
    from llamascope.accounts.access import KEY_RULE, MAKE_A_KEY, key_weakness

    lines = [f"  key {i + 1} ({key[:7]}…): {reason}" for i, key in enumerate(keys) if (reason := key_weakness(key))]
    if lines:
        lines.insert(0, "the API keys of the settings (LLAMASCOPE_API_KEYS or api_keys) must be hard to guess:")
        lines.append(f"  {KEY_RULE}; {MAKE_A_KEY}")
    return lines


def serve(args: argparse.Namespace) -> int:
    """Start in an order that writes nothing until the server can run: settings, the address, the store's
    schema, the models; then the keys, the banner, and serving."""
    configure_openmp()  # before the imports below load torch
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
    from llamascope import observability

    observability.configure(  # logs, traces, per-key metrics
        settings.log_level, settings.log_format, settings.otlp_traces_endpoint, settings.metrics_keys
    )
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"llamascope: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    import uvicorn

    from llamascope.accounts import admin
    from llamascope.accounts.admission import Accounts
    from llamascope.accounts.checkpoints import Checkpoints
    from llamascope.accounts.limits import rate_limits
    from llamascope.api.app import create_app
    from llamascope.api.drain import LAST_WORDS_SECONDS, Drain, DrainingServer
    from llamascope.conversation.service import ConversationService
    from llamascope.engines.base import ModelLoadError
    from llamascope.engines.registry import load_engines
    from llamascope.images.intake import ImageIntake
    from llamascope.images.uploads import UploadStore, load_or_create_secret
    from llamascope.observability.metrics import MetricsEndpoint

    threads = configure_torch(settings.torch_threads)
    store = open_store(settings)  # the schema only: a database that cannot be reached stops start-up here
    try:
        engines = load_engines(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ModelLoadError as exc:
        print(f"llamascope: cannot start: {exc}", file=sys.stderr)
        return 2

    # Start-up has succeeded: now the store is written. First what requests a crash interrupted had made
    # (this replica's predecessor's, or a dead replica's) is charged, then the keys (a failed start uses up
    # no first key).
    checkpoints = Checkpoints(
        store,
        seconds=settings.checkpoint_seconds,
        tokens=settings.checkpoint_tokens,
        wait_seconds=settings.checkpoint_wait_seconds,
        lease_seconds=settings.lease_seconds,
    )
    checkpoints.start()
    for change in admin.seed_keys(store, settings.api_keys):
        log.info("API keys: %s", change)
    first_key = None
    if store.count_keys() == 0:
        first_key, _, _ = admin.create_key(
            store, model_allowances(settings), name="first start", allowance=admin.UNLIMITED, days=admin.UNLIMITED
        )
    uploads_store = UploadStore(
        settings.upload_dir or settings.data_dir / "uploads",
        settings.upload_secret.encode()
        if settings.upload_secret
        else load_or_create_secret(settings.data_dir / "upload-secret"),
        ttl_seconds=settings.upload_ttl_hours * 3600,
        policy_seconds=settings.upload_policy_seconds,
        max_bytes=settings.upload_max_bytes,
    )
    limits = rate_limits(settings.redis_url, settings.rate_limits_on_redis_error)
    accounts = Accounts(store, limits, checkpoints=checkpoints)
    service = ConversationService(engines, ImageIntake.from_settings(settings, uploads_store), accounts)
    drain = Drain(settings.shutdown_grace_seconds)
    app = create_app(
        service,
        uploads_store,
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
        admin_key=settings.admin_key,
        model_specs=dict(settings.models),
        metrics=MetricsEndpoint(
            enabled=settings.metrics,
            key=settings.metrics_key,
            port=settings.metrics_port,
            host=settings.host,
            key_names=frozenset(settings.metrics_keys),
        ),
        drain=drain,
    )

    host, port = sock.getsockname()[:2]
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    lines = [f"llamascope {__version__} on {base} (PyTorch threads: {threads})", "models:"]
    for name, engine in engines.items():
        what = (
            "built-in test model: tiny and random, its answers are random text"
            if engine.info.test_model
            else engine.info.source
        )
        lines.append(f"  {name:<32} {what}")
    if first_key:
        lines.append(f"API key: {first_key}")
        lines.append("  (made on this first start and shown only now: keep it. `llamascope keys create` makes more.)")
    else:
        active = store.count_keys(active=True)
        lines.append(f"API keys: {active} active in {_safe_url(store.url)} (`llamascope keys list`)")
    lines.append(f"SDK: export DASHSCOPE_HTTP_BASE_URL={base}/api/v1 DASHSCOPE_API_KEY=<the key>")
    lines.append(f"Playground: {base}/ in a browser")
    print("\n".join(lines), file=sys.stderr, flush=True)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_config=None,
        access_log=False,
        # The drain (api.drain) has ended every request by then; this only bounds a stuck one.
        timeout_graceful_shutdown=int(LAST_WORDS_SECONDS) + 1,
        # Idle keep-alive connections are closed after 75 s, later than clients (httpx: 5 s) and load
        # balancers (nginx's upstream keepalive: 60 s) drop them: the side that reuses a connection must not
        # meet one the server closed a moment before (a ReadError, or a 502 from the balancer).
        timeout_keep_alive=75,
        server_header=False,
    )
    DrainingServer(config, drain).run(sockets=[sock])
    return 0


def _safe_url(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_store(settings: Settings) -> AccountStore:
    from llamascope.accounts.store import AccountStore

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = AccountStore(settings.database)
    store.migrate()
    return store


def model_allowances(settings: Settings) -> dict[str, ModelAllowance]:
    """Each model's default allowance from the settings, for accounts.admin (which reads no settings)."""
    from llamascope.accounts.records import ModelAllowance

    return {name: ModelAllowance(spec.allowance_tokens, spec.allowance_days) for name, spec in settings.models.items()}


def accounts_command(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from llamascope.accounts import admin
    from llamascope.accounts.records import utcnow

    try:
        settings = Settings.load(getattr(args, "config", None))
    except Exception as exc:
        print(f"llamascope: bad settings: {describe_error(exc)}", file=sys.stderr)
        return 2
    store = open_store(settings)
    try:
        if args.command == "db":
            print(f"schema up to date in {_safe_url(store.url)}")
        elif args.command == "usage":
            key_id = store.key(args.key).id if args.key else None
            since = utcnow() - timedelta(days=args.days) if args.days else None
            if args.requests:
                print(admin.requests_table(store.requests(key_id, since, args.requests)))
            else:
                print(admin.usage_table(store.usage(key_id, since)))
        elif args.action == "create":
            _warn_unknown(admin.unknown_models(args.model or [], settings.models), settings)
            key, view, grants = admin.create_key(
                store,
                model_allowances(settings),
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
            _warn_unknown(admin.unknown_models([args.model], settings.models), settings)
            admin.grant_models(store, view.id, [args.model], model_allowances(settings), args.allowance, args.days)
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
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command in ("keys", "usage", "db"):
        return accounts_command(args)
    if args.command == "chat":
        return chat.run(args)
    if args.command == "build-test-model":
        from llamascope.engines.builtin_model import ensure_test_model

        configure_logging("info")
        print(ensure_test_model(args.cache_dir or Settings.load().cache_dir))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
