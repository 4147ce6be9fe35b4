"""The ``llamascope`` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llamascope import __version__
from llamascope.client import chat
from llamascope.settings import BUILTIN, ModelSpec, Settings

if TYPE_CHECKING:
    from llamascope.accounts.store import AccountStore

log = logging.getLogger("llamascope")


def _model_arg(value: str) -> tuple[str, ModelSpec]:
    """NAME=PATH (local weights, 'builtin') or NAME=openai+URL[,openai+URL...] (upstream engines)."""
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    if source.startswith("openai+"):
        urls = [u.strip().removeprefix("openai+") for u in source.split(",") if u.strip()]
        return name, ModelSpec(upstreams=urls)
    return name, ModelSpec(path=BUILTIN if source in ("builtin", BUILTIN) else source)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamascope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llamascope {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

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

    build = commands.add_parser("build-test-model", help="build the built-in test model and print its directory")
    build.add_argument("--cache-dir", type=Path)

    keys_parser = commands.add_parser("keys", help="API keys and their model grants")
    keys = keys_parser.add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="make a key and print it (once: only its hash is kept)")
    create.add_argument("--name", default="")
    create.add_argument("--model", action="append", help="a served model to grant (repeatable; default: all)")
    create.add_argument("--allowance", help="tokens (input + output) per model, or 'unlimited' (default: the model's)")
    create.add_argument("--days", help="days the allowance is valid, or 'unlimited' (default: the model's, 180)")
    create.add_argument("--expires-days", type=float, help="days until the key itself expires (default: never)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--concurrency", type=int, help="concurrent requests")
    listing = keys.add_parser("list", help="keys, their grants and what they used")
    revoke = keys.add_parser("revoke", help="revoke a key (by id or prefix)")
    revoke.add_argument("key")
    grant = keys.add_parser("grant", help="grant a model to a key, with a fresh allowance")
    grant.add_argument("key")
    grant.add_argument("--model", required=True)
    grant.add_argument("--allowance")
    grant.add_argument("--days")

    usage = commands.add_parser("usage", help="tokens used, per day, key and model")
    usage.add_argument("--key", help="only this key (id or prefix)")
    usage.add_argument("--days", type=float, help="only the last N days")

    db = commands.add_parser("db", help="the accounts database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply schema migrations")
    chat.add_parser(commands)
    for command in (create, listing, revoke, grant, usage, upgrade):
        command.add_argument("--config", type=Path, help="TOML config file (default: $LLAMASCOPE_CONFIG)")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # httpx logs every image fetch at INFO; the access log already says what a request did.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


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


def serve(args: argparse.Namespace) -> int:
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
        print(f"llamascope: bad settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    import uvicorn

    from llamascope.accounts import admin
    from llamascope.accounts.admission import Accounts
    from llamascope.accounts.limits import rate_limits
    from llamascope.api.app import create_app
    from llamascope.conversation.service import ConversationService
    from llamascope.engines.mllama import ModelLoadError
    from llamascope.engines.registry import load_engines
    from llamascope.images.intake import ImageIntake
    from llamascope.images.uploads import UploadStore, load_or_create_secret

    threads = configure_torch(settings.torch_threads)
    store = open_store(settings)
    if store.is_sqlite:
        store.forget_reservations()  # one server per SQLite file: nothing else can be holding any
    admin.seed_keys(store, settings.api_keys, settings.models)
    first_key = None
    if store.count_keys() == 0:
        first_key, _, _ = admin.create_key(
            store, settings.models, name="first start", allowance=admin.UNLIMITED, days=admin.UNLIMITED
        )
    try:
        engines = load_engines(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ModelLoadError as exc:
        print(f"llamascope: cannot start: {exc}", file=sys.stderr)
        return 2
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
    service = ConversationService(engines, ImageIntake.from_settings(settings, uploads_store), Accounts(store, limits))
    app = create_app(
        service,
        uploads_store,
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
        admin_key=settings.admin_key,
        model_specs=dict(settings.models),
    )

    base = f"http://{settings.host}:{settings.port}"
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
        lines.append(f"API keys: {store.count_keys()} in {_safe_url(store.url)} (`llamascope keys list`)")
    lines.append(f"SDK: export DASHSCOPE_HTTP_BASE_URL={base}/api/v1 DASHSCOPE_API_KEY=<the key>")
    lines.append(f"Playground: {base}/ in a browser")
    print("\n".join(lines), file=sys.stderr, flush=True)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        server_header=False,
    )
    uvicorn.Server(config).run()
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


def _limit(value: str | None) -> int | str | None:
    if value is None or value == "unlimited":
        return value
    return int(float(value))


def accounts_command(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from llamascope.accounts import admin
    from llamascope.accounts.store import utcnow

    settings = Settings.load(getattr(args, "config", None))
    store = open_store(settings)
    try:
        if args.command == "db":
            print(f"schema up to date in {_safe_url(store.url)}")
        elif args.command == "usage":
            key_id = store.key(args.key).id if args.key else None
            since = utcnow() - timedelta(days=args.days) if args.days else None
            print(admin.usage_table(store.usage(key_id, since)))
        elif args.action == "create":
            key, view, grants = admin.create_key(
                store,
                settings.models,
                name=args.name,
                models=args.model,
                allowance=_limit(args.allowance),
                days=_limit(args.days),
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
            admin.grant_models(store, view.id, [args.model], settings.models, _limit(args.allowance), _limit(args.days))
            print(admin.keys_table([(v, g) for v, g in store.list_keys() if v.id == view.id]))
    except (LookupError, ValueError) as exc:
        print(f"llamascope: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command in ("keys", "usage", "db"):
        return accounts_command(args)
    if args.command == "chat":
        return chat.run(args)
    if args.command == "build-test-model":
        from llamascope.engines.test_model import ensure_test_model

        configure_logging("info")
        print(ensure_test_model(args.cache_dir or Settings.load().cache_dir))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
