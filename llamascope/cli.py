"""The ``llamascope`` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from llamascope import __version__
from llamascope.settings import BUILTIN, ModelSpec, Settings

log = logging.getLogger("llamascope")


def _model_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, BUILTIN if path in ("builtin", BUILTIN) else path


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
        help="serve NAME from a local Hugging Face directory (repeatable; 'builtin' for the test model). "
        "Replaces the models of the config file.",
    )
    serve.add_argument("--config", type=Path, help="TOML config file (default: $LLAMASCOPE_CONFIG)")
    serve.add_argument("--threads", type=int, help="PyTorch threads (default: one per usable core)")
    serve.add_argument("--log-level", help="debug, info, warning, error (default info)")

    build = commands.add_parser("build-test-model", help="build the built-in test model and print its directory")
    build.add_argument("--cache-dir", type=Path)
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


def configure_torch(threads: int | None) -> int:
    """Set PyTorch's threads deliberately: its defaults oversubscribe containers."""
    import torch

    count = threads or usable_cores()
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # already set earlier in this process
        torch.set_num_interop_threads(1)  # llamascope runs one generation per engine thread
    return count


def serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {
        "host": args.host,
        "port": args.port,
        "torch_threads": args.threads,
        "log_level": args.log_level,
    }
    if args.model:
        overrides["models"] = {name: ModelSpec(path=path) for name, path in args.model}
    try:
        settings = Settings.load(args.config, **overrides)
    except Exception as exc:  # pydantic's ValidationError or a missing file: say it plainly
        print(f"llamascope: bad settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    import uvicorn

    from llamascope.accounts.keys import StaticKeys, ensure_key_file
    from llamascope.api.app import create_app
    from llamascope.conversation.service import ConversationService
    from llamascope.engines.mllama import ModelLoadError
    from llamascope.engines.registry import load_engines
    from llamascope.images.intake import ImageIntake
    from llamascope.images.uploads import UploadStore, load_or_create_secret

    threads = configure_torch(settings.torch_threads)
    keys = list(settings.api_keys)
    key_note = "from LLAMASCOPE_API_KEYS / the config file"
    if not keys:
        key_file = settings.data_dir / "api-key"
        key, created = ensure_key_file(key_file)
        keys = [key]
        key_note = f"{'created now and ' if created else ''}kept in {key_file}"
    try:
        engines = load_engines(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ModelLoadError as exc:
        print(f"llamascope: cannot start: {exc}", file=sys.stderr)
        return 2
    store = UploadStore(
        settings.upload_dir or settings.data_dir / "uploads",
        load_or_create_secret(settings.data_dir / "upload-secret"),
        ttl_seconds=settings.upload_ttl_hours * 3600,
        policy_seconds=settings.upload_policy_seconds,
        max_bytes=settings.upload_max_bytes,
    )
    service = ConversationService(engines, ImageIntake.from_settings(settings, store))
    app = create_app(
        service,
        StaticKeys(keys),
        store,
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
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
    if len(keys) == 1 and not settings.api_keys:
        lines.append(f"API key: {keys[0]}  ({key_note})")
    else:
        lines.append(f"API keys: {len(keys)} ({key_note})")
    lines.append(f"SDK: export DASHSCOPE_HTTP_BASE_URL={base}/api/v1 DASHSCOPE_API_KEY=<the key>")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "build-test-model":
        from llamascope.engines.test_model import ensure_test_model

        configure_logging("info")
        print(ensure_test_model(args.cache_dir or Settings.load().cache_dir))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
