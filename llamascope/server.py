"""The composition root: the server ``llamascope serve`` runs, built from the settings in one place.

As vLLM's ``api_server`` (``build_app``/``init_app_state``): this module reads
``Settings`` and makes everything else from it: the accounts store, the
engines, the image intake, the conversation service and the ASGI app. The
packages below take plain constructor arguments and never read the settings.

Start-up writes nothing until the server can run: the address is bound first,
then the store's schema is checked and the models are loaded; only then are
crash leftovers charged and keys made. PyTorch loads only when a model is
served in process (``engines.registry``): a gateway, every model upstream,
starts in about a second without it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from llamascope import __version__, observability
from llamascope.accounts import admin
from llamascope.accounts import store as accounts_store
from llamascope.accounts.admission import Accounts
from llamascope.accounts.checkpoints import Checkpoints
from llamascope.accounts.limits import rate_limits
from llamascope.accounts.records import ModelAllowance
from llamascope.accounts.store import AccountStore
from llamascope.api.app import create_app
from llamascope.api.drain import LAST_WORDS_SECONDS, Drain, DrainingServer
from llamascope.batch.files import FileQuota, FileStore
from llamascope.batch.lines import MAX_FILE_BYTES
from llamascope.batch.repository import BatchRepository
from llamascope.batch.runner import Runner
from llamascope.batch.service import BatchService
from llamascope.conversation.service import ConversationService, ImagePolicy
from llamascope.disk import DiskReserve, KeyQuota
from llamascope.engines.base import Engine, ModelLoadError
from llamascope.engines.devices import Bounds
from llamascope.engines.registry import (
    TEST_MODEL,
    TEXT_TEST_MODEL,
    BuiltinModel,
    InProcessModel,
    Runtime,
    UpstreamModel,
    check_model_dirs,
)
from llamascope.engines.registry import load_engines as load_models
from llamascope.engines.threads import configure_openmp, configure_torch, usable_cores
from llamascope.images.decode import DecodeLimits, configure_codec_threads
from llamascope.images.intake import ImageIntake
from llamascope.images.source import FetchPolicy, LocalPolicy
from llamascope.images.uploads import UploadStore, load_or_create_secret
from llamascope.observability.metrics import MetricsEndpoint
from llamascope.settings import BUILTIN, BUILTIN_TEXT, ModelSpec, Settings

log = logging.getLogger("llamascope")

# -- the parts, each from the settings -------------------------------------------------------------------


def configure_observability(settings: Settings) -> None:
    """Logs, traces and per-key metrics as the settings say; once, before serving."""
    observability.configure(
        settings.log_level, settings.log_format, settings.otlp_traces_endpoint, settings.metrics_keys
    )


def model_allowances(settings: Settings) -> dict[str, ModelAllowance]:
    """Each model's default allowance from the settings, for accounts.admin and the admin API."""
    return admin.model_allowances(settings.models)


def open_store(settings: Settings) -> AccountStore:
    """The accounts store, its schema migrated: a database that cannot be reached stops start-up here."""
    return accounts_store.open_store(settings.database, settings.data_dir if settings.database_url is None else None)


def model_plan(settings: Settings) -> dict[str, UpstreamModel | InProcessModel]:
    """Each served model as the engines' registry takes it."""
    return {name: _model(name, spec, settings) for name, spec in settings.models.items()}


def _model(name: str, spec: ModelSpec, settings: Settings) -> UpstreamModel | InProcessModel:
    if spec.upstreams:
        return UpstreamModel(
            upstreams=tuple(spec.upstreams),
            model=spec.upstream_model or name,
            api_key=spec.upstream_api_key,
            context_length=spec.context_length,
            tokenizer=spec.upstream_tokenizer,
            chat_template=spec.chat_template,
            silence=spec.upstream_timeout,
            named=spec.upstream_model is not None,
        )
    assert spec.path is not None  # a spec has a path or upstreams (ModelSpec checks)
    builtins: dict[str, BuiltinModel] = {BUILTIN: TEST_MODEL, BUILTIN_TEXT: TEXT_TEST_MODEL}
    builtin = builtins.get(spec.path)
    return InProcessModel(
        source=builtin or Path(spec.path),
        dtype=spec.dtype,
        quantization=spec.quantization,
        context_length=spec.context_length,
        chat_template=spec.chat_template,
        device=spec.device or settings.device,
    )


def image_policies(settings: Settings) -> dict[str, ImagePolicy]:
    """Each served model's image settings, as the conversation service takes them."""
    return {
        name: ImagePolicy(max_images=spec.max_images, require_image=spec.require_image)
        for name, spec in settings.models.items()
    }


def engine_runtime(settings: Settings) -> Runtime:
    """What the in-process engines share."""
    return Runtime(
        cache_dir=settings.cache_dir,
        max_queued=settings.max_queued,
        max_queued_bytes=settings.max_queued_bytes,
        max_queue_wait=settings.max_queue_wait_seconds,
        prefill_chunk=settings.prefill_chunk_tokens,
        vision_batch_tiles=settings.vision_batch_tiles,
        bounds=Bounds(settings.max_batch_size, settings.max_batch_tokens, settings.vision_cache_bytes),
        gpu_memory_cap=settings.gpu_memory_cap,
        prefix_cache_bytes=settings.prefix_cache_bytes,
        faults=settings.fault_injection,
    )


def load_engines(settings: Settings, progress: Callable[[str], None] = log.info) -> dict[str, Engine]:
    """Every configured model's engine; raises ModelLoadError naming the model that failed."""
    return load_models(model_plan(settings), engine_runtime(settings), progress)


def serves_in_process(settings: Settings) -> bool:
    return any(not spec.upstreams for spec in settings.models.values())


def open_uploads(settings: Settings) -> UploadStore:
    """The store of the SDK's uploads, with its signing secret (the settings', or one kept in data_dir)."""
    return UploadStore(
        settings.upload_dir or settings.data_dir / "uploads",
        settings.upload_secret.encode()
        if settings.upload_secret
        else load_or_create_secret(settings.data_dir / "upload-secret"),
        ttl_seconds=settings.upload_ttl_hours * 3600,
        policy_seconds=settings.upload_policy_seconds,
        max_bytes=settings.upload_max_bytes,
        reserve=DiskReserve(settings.min_free_disk_bytes),
        quota=KeyQuota(settings.upload_files_per_key, settings.upload_storage_per_key_bytes),
    )


def build_intake(settings: Settings, uploads: UploadStore | None = None) -> ImageIntake:
    """The image intake: what may be fetched, how large an image may be, the decoded-image cache."""
    policy = FetchPolicy.from_allow_list(
        settings.image_fetch_allow,
        max_bytes=settings.image_max_bytes,
        connect_timeout=settings.image_fetch_connect_timeout,
        total_timeout=settings.image_fetch_timeout,
        max_redirects=settings.image_fetch_max_redirects,
        max_fetches=settings.image_fetch_concurrency,
    )
    limits = DecodeLimits(
        max_pixels=settings.image_max_pixels,
        max_decode_pixels=settings.image_max_decode_pixels,
        min_side=settings.image_min_side,
    )
    local = LocalPolicy(store=uploads, allowed_dirs=tuple(Path(d).resolve() for d in settings.image_local_dirs))
    return ImageIntake(
        policy,
        limits,
        local=local,
        decode_workers=settings.image_decode_workers,
        decode_timeout=settings.image_decode_timeout,
        cache_bytes=settings.image_cache_bytes,
    )


def open_batch_files(settings: Settings) -> FileStore:
    """The Files API's store: batch inputs and results, under the data directory unless set."""
    return FileStore(
        settings.batch_files_dir or settings.data_dir / "batch-files",
        MAX_FILE_BYTES,
        DiskReserve(settings.min_free_disk_bytes),
    )


def build_batches(
    settings: Settings,
    store: AccountStore,
    engines: dict[str, Engine],
    replica_id: str,
    drain: Drain,
    files: FileStore,
) -> BatchService:
    """The Batch and Files APIs: files under the data directory, lines claimed as this replica."""
    runner = Runner(
        BatchRepository(store),
        files,
        engines,
        store,
        replica_id=replica_id,
        in_flight=settings.batch_in_flight,
        poll_seconds=settings.batch_poll_seconds,
        price=settings.batch_price,
        stopping=lambda: drain.draining,
    )
    quota = FileQuota(settings.batch_files_per_key, settings.batch_storage_per_key_bytes)
    return BatchService(runner.repository, files, runner, quota)


def build_app(
    settings: Settings,
    service: ConversationService,
    uploads: UploadStore,
    drain: Drain,
    batches: BatchService | None = None,
) -> FastAPI:
    """The ASGI app around a ready service."""
    return create_app(
        service,
        uploads,
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
        admin_key=settings.admin_key,
        model_allowances=model_allowances(settings),
        metrics=MetricsEndpoint(
            enabled=settings.metrics,
            key=settings.metrics_key,
            port=settings.metrics_port,
            host=settings.host,
            key_names=frozenset(settings.metrics_keys),
        ),
        drain=drain,
        batches=batches,
    )


# -- the whole server ----------------------------------------------------------------------------------------


@dataclass
class Server:
    """A built server, ready to run: its app and what the banner tells about it."""

    settings: Settings
    app: FastAPI
    engines: dict[str, Engine]
    store: AccountStore
    drain: Drain
    first_key: str | None  # made on this first start, shown once
    torch_threads: int | None  # None: no model in process, PyTorch not loaded


def build(settings: Settings, progress: Callable[[str], None] = log.info) -> Server:
    """Everything from the settings, in an order that writes nothing until the server can run: the store's
    schema, the models; then crash leftovers are charged and the keys seeded. Raises ModelLoadError."""
    configure_openmp()  # before anything loads torch
    configure_codec_threads(usable_cores())  # JPEG 2000 on every usable core; an environment variable: set first
    check_model_dirs(model_plan(settings))  # a wrong model path stops start-up before PyTorch's seconds of imports
    threads = configure_torch(settings.torch_threads) if serves_in_process(settings) else None
    store = open_store(settings)
    engines = load_engines(settings, progress)
    # What may still fail on this machine (a directory that cannot be made, a Redis URL redis-py refuses) is
    # opened before anything is written: such a start made the first key, then failed before showing it.
    uploads = open_uploads(settings)
    batch_files = open_batch_files(settings)
    limits = rate_limits(settings.redis_url, settings.rate_limits_on_redis_error)
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
    accounts = Accounts(store, limits, checkpoints=checkpoints)
    service = ConversationService(engines, build_intake(settings, uploads), accounts, image_policies(settings))
    drain = Drain(settings.shutdown_grace_seconds)
    batches = build_batches(settings, store, engines, checkpoints.replica_id, drain, batch_files)
    app = build_app(settings, service, uploads, drain, batches)
    return Server(settings, app, engines, store, drain, first_key, threads)


def serve(settings: Settings) -> int:
    """``llamascope serve`` from loaded settings: the exit status (2: it could not start)."""
    configure_observability(settings)
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"llamascope: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if settings.metrics and settings.metrics_port is not None:
        # prometheus-client binds its own server once the app starts, after the models load (minutes): a port
        # in use then ended start-up in a lifespan traceback. Tried here too, and let go (prometheus-client
        # makes its own socket; SO_REUSEADDR lets it bind again), so a port in use stops start-up at once.
        try:
            listen(settings.host, settings.metrics_port).close()
        except OSError as exc:
            sock.close()
            print(
                f"llamascope: cannot listen on {settings.host}:{settings.metrics_port} (LLAMASCOPE_METRICS_PORT): "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
    try:
        server = build(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ModelLoadError, accounts_store.StoreUnreachable) as exc:
        print(f"llamascope: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a directory of the settings that cannot be made or written (upload_dir, data_dir)
        print(f"llamascope: cannot start: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(banner(server, f"http://{f'[{host}]' if ':' in host else host}:{port}"), file=sys.stderr, flush=True)
    return run(server, sock)


def banner(server: Server, base: str) -> str:
    """What ``serve`` prints when it is ready: where, which models, the key, how to call it."""
    threads = f" (PyTorch threads: {server.torch_threads})" if server.torch_threads is not None else ""
    lines = [f"llamascope {__version__} on {base}{threads}", "models:"]
    for name, engine in server.engines.items():
        what = (
            "built-in test model: tiny and random, its answers are random text"
            if engine.info.test_model
            else engine.info.source
        )
        lines.append(f"  {name:<32} {what}")
    if server.first_key:
        lines.append(f"API key: {server.first_key}")
        lines.append("  (made on this first start and shown only now: keep it. `llamascope keys create` makes more.)")
    else:
        active = server.store.count_keys(active=True)
        lines.append(f"API keys: {active} active in {safe_url(server.store.url)} (`llamascope keys list`)")
    # Where clients reach it: behind a load balancer (public_base_url) not the bound address, often 0.0.0.0.
    public = server.settings.public_base_url or base
    lines.append(f"SDK: export DASHSCOPE_HTTP_BASE_URL={public}/api/v1 DASHSCOPE_API_KEY=<the key>")
    lines.append(f"Playground: {public}/ in a browser")
    return "\n".join(lines)


def run(server: Server, sock: socket.socket) -> int:
    """Serve on ``sock`` until a signal stops the server (``api.drain``); the exit status."""
    config = uvicorn.Config(
        server.app,
        host=server.settings.host,
        port=sock.getsockname()[1],
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
    runner = DrainingServer(config, server.drain)
    status = 0
    try:
        runner.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C that stopped it, after a clean shutdown
        status = 130  # as a shell reports a command that Ctrl+C ended, without a traceback
    if runner.hurried:
        # A second signal asks to stop at once, and everything is closed and written by now: exit-time handlers
        # run, but not the interpreter's teardown, which frees a model's objects one by one (seconds).
        started = time.monotonic()
        atexit._run_exitfuncs()
        log.debug("exit handlers took %.2f s", time.monotonic() - started)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


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


def safe_url(url: str) -> str:
    """A database URL without its password, for printing."""
    return accounts_store.printable_url(url)
