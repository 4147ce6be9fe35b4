"""The one settings object.

Sources, strongest first: command-line options, ``LLAMASCOPE_*`` environment
variables, the TOML config file (``--config`` or ``LLAMASCOPE_CONFIG``), the
defaults below. Nothing deeper in the code reads the environment.

A config file looks like::

    host = "0.0.0.0"
    port = 8000
    api_keys = ["sk-..."]

    [models."llama3.2-11b-vision"]
    path = "/models/Llama-3.2-11B-Vision-Instruct"
    dtype = "bfloat16"
"""

from __future__ import annotations

import ipaddress
import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SEED_MODELS = ("llama3.2-11b-vision", "llama3.2-90b-vision-instruct")
BUILTIN = "builtin:test-model"
BUILTIN_TEXT = "builtin:text-model"  # the tiny text-only Llama, for trying the text-only models

_config_file: ContextVar[Path | None] = ContextVar("llamascope_config_file", default=None)


class ModelSpec(BaseModel):
    """Where one served model name gets its answers from: local weights, or upstream engines."""

    path: str | None = Field(
        None,
        description=f"a local Hugging Face model directory, or {BUILTIN!r} (`builtin` for short) or {BUILTIN_TEXT!r}",
    )
    upstreams: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible engines (SGLang, TGI, vLLM, Ollama, llama.cpp server) to serve it "
        'through, e.g. `["http://gpu1:30000/v1"]`; a model has either `path` or `upstreams`',
    )
    upstream_model: str | None = Field(
        None,
        description="the model name the upstreams know (default: this name; an engine whose `GET /models` lists "
        "one model only, by a path or hub id, as vLLM lists its path without `--served-model-name`, is called by "
        "that one)",
    )
    upstream_api_key: str | None = Field(None, description="the Bearer key the upstreams ask for")
    upstream_timeout: float = Field(
        300.0,
        gt=0,
        description="seconds an upstream may send nothing (before its answer's first byte, or between two) before "
        "the request is given up on it: the next upstream, else 408 RequestTimeOut; an answer that keeps coming "
        "is never cut",
    )
    upstream_tokenizer: str | None = Field(
        None,
        description="a local directory with the upstream model's tokenizer: prompts are counted here, not asked "
        "of the engine",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the weights' type; `auto`: the checkpoint's (bf16 on a GPU)"
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="weights quantized through bitsandbytes as they load (the `quantized` extra): `nf4` "
        "(4-bit NF4: the 11B in about 7 GB) or `int8` (LLM.int8: the 90B in about 90 GB)",
    )
    context_length: int = Field(8192, ge=16, description="prompt plus answer, in tokens")
    device: str | None = Field(
        None,
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="`auto`, `cpu`, `cuda` or `cuda:N`; unset: the server-wide `device` setting",
    )
    chat_template: str | None = Field(None, description="a Jinja file to render prompts with instead of llamascope's")
    max_images: int | None = Field(
        None,
        ge=1,
        description="images a conversation may carry, in all its user messages (400 InvalidParameter above it); "
        "unset: for Llama 3.2 Vision in process 4, as many as one vision-tower call encodes (16 tiles, four an "
        "image; each image's cross-attention keys and values take 210 MB for the 11B in bf16, and neither the "
        "processor nor the model sets a limit of its own), through upstreams 1 (vLLM's default "
        "`--limit-mm-per-prompt`). Meta recommends one image a prompt for the best answers",
    )
    require_image: bool = Field(
        True,
        description="the multimodal-generation endpoint wants an image in the first user message, as the API "
        "reference says; false: it takes text-only conversations too (text generation and compatible mode always do)",
    )
    description: str = Field("", description="a note about the model, for whoever reads the config")
    # What `llamascope keys create/grant` give a key for this model unless told otherwise.
    allowance_tokens: int | None = Field(
        1_000_000, ge=1, description='the tokens a new grant of this model allows; `"unlimited"`: no cap'
    )
    allowance_days: float | None = Field(
        180, gt=0, description='how long a new grant\'s allowance lasts, in days; `"unlimited"`: it never expires'
    )

    @property
    def is_builtin(self) -> bool:
        return self.path in (BUILTIN, BUILTIN_TEXT)

    @field_validator("allowance_tokens", "allowance_days", mode="before")
    @classmethod
    def _unlimited(cls, value: Any) -> Any:
        """``"unlimited"``, as `keys create --allowance unlimited` says it: TOML has no null to write None with."""
        return None if isinstance(value, str) and value.strip().lower() == "unlimited" else value

    @field_validator("path")
    @classmethod
    def _builtin_alias(cls, path: str | None) -> str | None:
        """``builtin`` in a config file or ``LLAMASCOPE_MODELS`` names the test model, as on the command line."""
        return BUILTIN if path == "builtin" else path

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (not self.upstreams):
            raise ValueError("a model needs either path (local weights) or upstreams (engine URLs), not both")
        for url in self.upstreams:
            if not _http_url(url):  # checked here: one that passed ran, and every request to it was a 500
                raise ValueError(f"upstream {_shown_url(url)!r} must be an http(s) URL with a host, ending in /v1")
        if self.path is not None and "://" in self.path:
            raise ValueError(
                f"{_shown_url(self.path)!r} is a URL, not a local model directory: to serve through an "
                f"OpenAI-compatible engine, write openai+{_shown_url(self.path)} on the command line (upstreams = "
                "[...] in the config file)"
            )
        return self


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "llamascope"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "llamascope"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMASCOPE_", extra="forbid")

    host: str = Field("127.0.0.1", description="the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on")
    models: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description="the served model names and where each gets its answers (the table below; `--model "
        "NAME=PATH` on the command line). None given: both seed names on the built-in test model",
    )

    database_url: str | None = Field(
        None,
        description="the accounts store: SQLite in `DATA_DIR` by default; a `postgresql+psycopg://...` URL "
        "for replicas sharing one store",
    )
    # Crash-safe accounting (accounts/checkpoints.py).
    checkpoint_seconds: float = Field(
        1.0, gt=0, description="what a running request has made is on disk within about this long..."
    )
    checkpoint_tokens: int = Field(
        64, ge=1, description="...or this many tokens; a stream never runs more than this past its checkpoint"
    )
    checkpoint_wait_seconds: float = Field(
        5.0,
        gt=0,
        description="a stream whose checkpoint is more than `CHECKPOINT_TOKENS` behind waits this long for it, "
        "then ends with 503",
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="a replica that has not renewed its lease for this long is taken for dead, and its running "
        "requests are charged by another",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="keys put in the store at start-up (comma-separated), each new one granted every model "
        "(`*`) without limit; each `sk-` and 128 random bits or more (32 hex digits, as DashScope's keys). A key "
        "these settings no longer name is revoked at the next start. None given and an empty store: the first "
        "start makes one key and prints it once",
    )
    admin_key: str | None = Field(None, description="Bearer key of the admin HTTP API (`/admin/...`); unset: it is off")
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="the SQLite store, uploads, the upload-policy secret (`$XDG_DATA_HOME/llamascope`, "
        "else `~/.local/share/llamascope`)",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="where the built-in test models are built (`$XDG_CACHE_HOME/llamascope`, "
        "else `~/.cache/llamascope`)",
    )

    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="where in-process models run: `auto` (a CUDA GPU when one is visible, else the CPU), `cpu`, "
        "`cuda` (every visible GPU: a model larger than one is split across them by layers) or `cuda:N`; "
        "per model too",
    )
    gpu_memory_cap: str | None = Field(
        None,
        pattern=r"^\d+(\.\d+)?\s*(GiB|GB|MiB|MB)$",
        description="with `cuda` on several GPUs, the most of a model's weights each holds, e.g. `70GiB`",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="PyTorch intra-op threads for the in-process engine (inter-op: 1; the model runs on one "
        "thread of its own); unset: one per usable core",
    )
    # The in-process engine's scheduler; batch size, batch tokens and the vision cache left unset are worked
    # out on a GPU from its free memory after loading (engines/devices.plan_memory), printed at start.
    max_batch_size: int | None = Field(
        None, ge=1, description="requests decoded together; unset: 16 on the CPU, on a GPU from its free memory"
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens the running requests' caches may hold, counted as a batch holds them (every row as "
        "long as the longest prompt plus most-to-generate); unset: 131,072 on the CPU, on a GPU from its free "
        "memory",
    )
    max_queued: int | None = Field(
        None,
        ge=1,
        description="a cap on the number of waiting requests as well, if set; at least 1 (every request waits for "
        "the model's thread to take it, room or not: 0 refused them all)",
    )
    max_queued_bytes: int | None = Field(
        None,
        ge=0,
        description="what waiting requests may hold together; beyond: 429 `Throttling` with `Retry-After`. "
        "Unset: a quarter of the memory available at start, within 256 MiB and 32 GiB",
    )
    max_queue_wait_seconds: float = Field(
        60.0, gt=0, description="the longest wait for a place; beyond: 408 `RequestTimeOut`"
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=16,
        description="prompt tokens run before the next decode step: a long prompt does not stall running "
        "streams for its whole length",
    )
    vision_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="each image's cross-attention keys and values (the vision tower's output, projected) kept "
        "by image content hash, so later turns with the same image skip the tower and the projections (210 MB "
        "an image for the 11B in bfloat16; a running request keeps what it uses until it ends); 0 turns it off. "
        "Unset: 1 GiB on the CPU, on a GPU from its free memory",
    )
    vision_batch_tiles: int | None = Field(
        None,
        ge=1,
        description="images of requests admitted together go through the vision tower in one call of at most "
        "this many tiles (Llama 3.2 pads every image to 4); 4 or less: one image a call. Unset: 16 on a GPU, "
        "1 on the CPU, where the tower is bound by its arithmetic",
    )
    prefix_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="past requests' self-attention keys and values, reused by requests that start with the "
        "same tokens about the same image (128 KiB a token for the 11B in bfloat16); least recently used blocks "
        "go first, never one a running request holds; 0 turns reuse off. Unset: a tenth of the memory free at "
        "start-up, at most 8 GiB; on a GPU, a tenth of what the memory plan has left after loading",
    )

    # The body cap sits above the image cap so an oversized data: URI reaches the image check and gets its
    # own message.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body limit (413 above it)")
    image_max_bytes: int = Field(10 * 1024 * 1024, ge=1, description="per image, from a URL or a `data:` URI")
    image_max_pixels: int = Field(
        100_000_000, ge=1, description="pixels as the image header declares them, checked before decoding"
    )
    image_max_decode_pixels: int = Field(
        20_000_000, ge=1, description="pixels as decoded (JPEG and JPEG2000 decode at reduced size)"
    )
    image_min_side: int = Field(10, ge=1, description="the shortest width or height an image may have, in pixels")
    image_fetch_connect_timeout: float = Field(5.0, gt=0, description="seconds to connect, per image fetch")
    image_fetch_timeout: float = Field(15.0, gt=0, description="seconds for a whole image fetch")
    image_fetch_max_redirects: int = Field(3, ge=0, description="redirects an image fetch follows, each checked again")
    image_fetch_concurrency: int = Field(
        16,
        ge=1,
        description="image URL fetches at once, server-wide (each holds up to `image_max_bytes` as it arrives); "
        "a fetch that waits `image_fetch_timeout` for its turn gets 429 Throttling",
    )
    image_fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="networks or host names that image URLs may reach although they are not public "
        "(loopback, private ranges...), comma-separated; none: only public addresses",
    )
    image_local_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="server directories whose files requests may name as `file://` URLs or paths; none: none",
    )
    image_decode_workers: int = Field(2, ge=1, description="the image decode pool's threads")
    image_decode_timeout: float = Field(5.0, gt=0, description="each image's decode budget, in seconds")
    image_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="decoded images kept by content hash")

    upload_dir: Path | None = Field(
        None, description="where the SDK's local-file uploads are kept; unset: `DATA_DIR/uploads`"
    )
    upload_ttl_hours: float = Field(48.0, gt=0, description="how long an upload lives")
    upload_policy_seconds: int = Field(
        300, ge=10, description="how long an upload policy (the SDK's getPolicy answer) stays valid"
    )
    upload_max_bytes: int = Field(10 * 1024 * 1024, ge=1, description="the largest upload")
    upload_files_per_key: int = Field(
        1000,
        ge=0,
        description="the uploads one key may keep at once (each for `UPLOAD_TTL_HOURS`); one more is refused "
        "(429 `Throttling.AllocationQuota`) before its file is read, and so is its policy; 0: no bound",
    )
    upload_storage_per_key_bytes: int = Field(
        1024**3,
        ge=0,
        description="the bytes one key's uploads may take at once (1 GiB); an upload that would take the key "
        "past it is refused (429 `Throttling.AllocationQuota`); 0: no bound",
    )
    min_free_disk_bytes: int = Field(
        1024**3,
        ge=0,
        description="the free disk kept (1 GiB): an upload or a batch input file is refused (507) while storing "
        "the largest one allowed would leave less free than this on its disk; 0: none kept",
    )
    public_base_url: str | None = Field(
        None,
        description="the address clients reach this server at, for upload policies (e.g. "
        "`https://llm.example.com` behind a proxy); unset: from the request's Host",
    )

    # The Batch and Files APIs (docs/batch.md).
    batch_files_dir: Path | None = Field(
        None,
        description="where the Files API keeps batch inputs and results, the same directory on every replica; "
        "unset: `DATA_DIR/batch-files`",
    )
    batch_files_per_key: int = Field(
        10_000,
        ge=0,
        description="the files one key may keep in the Files API, its inputs and its batches' results until it "
        "deletes them (Model Studio's 10,000); an upload past it is refused (400); 0: no bound",
    )
    batch_storage_per_key_bytes: int = Field(
        100 * 1024**3,
        ge=0,
        description="the bytes those files may take (100 GiB, Model Studio's 100 GB); an upload that would "
        "take the key past it is refused (400); 0: no bound",
    )
    batch_in_flight: int = Field(
        8,
        ge=1,
        description="batch lines running at once per model (in the engine's batch, each only while no "
        "interactive request waits)",
    )
    batch_poll_seconds: float = Field(
        10.0,
        gt=0,
        description="how often the batch runner looks in the database for what no event in this process tells: "
        "batches made or cancelled on other replicas, a dead replica's lines, windows ending",
    )
    batch_price: float = Field(
        0.5,
        ge=0,
        description="the fraction of a batch line's tokens charged to the key's grant (DashScope charges batch "
        "calls half); the output file reports the tokens made",
    )

    redis_url: str | None = Field(
        None,
        description="per-key rate limits shared by every replica, in Redis (`redis://host:6379/0`); unset: "
        "kept in this process",
    )
    rate_limits_on_redis_error: Literal["open", "closed"] = Field(
        "open",
        description="Redis unreachable (each call bounded at 0.5 s): `open` serves requests without the shared "
        "limits, `closed` refuses them with 503 `ServiceUnavailable`",
    )
    upload_secret: str | None = Field(
        None,
        min_length=32,
        description="the HMAC secret of upload policies (32 characters or more), the same on every replica; "
        "unset: a random one kept in `DATA_DIR/upload-secret`",
    )
    fault_injection: bool = Field(
        False,
        description="tests only: a conversation holding `[[llamascope-fault:STAGE@N]]` (prefill, decode, "
        "sample, oom) makes the in-process engine fail there",
    )

    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM or Ctrl+C, how long running requests get to finish"
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="in any case; `debug` also shows Alembic's migration lines and libvips' notes"
    )
    # Operating it: docs/observability.md.
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or `json`: one JSON object a line, each naming its request"
    )
    metrics: bool = Field(True, description="Prometheus metrics at `/metrics`")
    metrics_key: str | None = Field(None, description="the Bearer key `/metrics` asks for; unset: no key")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve the metrics on this port (not the API's) instead of at `/metrics`"
    )
    metrics_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="key names (as `keys create --name`) whose tokens and allowance get series of their own "
        "(comma-separated)",
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        description="an OTLP/HTTP collector for OpenTelemetry traces, e.g. `http://collector:4318` (`/v1/traces` is "
        "added); unset: traces off",
    )

    @field_validator("api_keys", "image_fetch_allow", "image_local_dirs", "metrics_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # LLAMASCOPE_API_KEYS=sk-a,sk-b as well as the JSON list pydantic expects.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url", "public_base_url", "otlp_traces_endpoint", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `LLAMASCOPE_REDIS_URL=` (a compose file's `${REDIS_URL:-}`) meant unset, as the code read it: no Redis,
        # the request's Host; the checks below must not refuse it.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str | None) -> str | None:
        # redis-py's own check (Redis.from_url) runs only once the models are loaded: a wrong URL then ended
        # start-up in a traceback, after the first start's key was made and never shown. Its schemes, here.
        # redis-py's own parser, not a look at the scheme: it takes only these in lower case, and refuses a query
        # value it cannot read (`?db=one`).
        if url is not None:
            from redis.connection import parse_url  # why: redis loads (0.1 s) only when a URL is set

            try:
                parse_url(url)
            except ValueError:
                raise ValueError("must be a redis://, rediss:// or unix:// URL") from None
        return url

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port_apart(cls, port: int | None, info: ValidationInfo) -> int | None:
        # The API's own port started both servers on it (each binds with SO_REUSEADDR), the API's requests and
        # the scrapes then split between them at random.
        if port is not None and port == info.data.get("port"):
            raise ValueError(f"{port} is the API's port (LLAMASCOPE_PORT, --port): give the metrics another one")
        return port

    @field_validator("public_base_url", "otlp_traces_endpoint")
    @classmethod
    def _check_http_url(cls, url: str | None) -> str | None:
        # Either, mistyped (`llm.example.com` without its scheme), started a server whose upload policies named
        # an address no SDK can post to, or whose traces went nowhere, each said only when first used.
        if url is not None and not _http_url(url):
            raise ValueError("must be an http(s) URL with a host, e.g. https://llm.example.com")
        return url

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        # LLAMASCOPE_LOG_LEVEL=DEBUG as well; anything else is refused here, not by logging's traceback at start.
        # logging's other names for its levels (`warn`, `fatal`) were taken before this check: still taken.
        if not isinstance(value, str):
            return value
        level = value.strip().lower()
        return {"warn": "warning", "fatal": "critical"}.get(level, level)

    @field_validator("image_fetch_allow")
    @classmethod
    def _check_allow(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                if not item or "/" in item or " " in item:
                    raise ValueError(f"{item!r} is neither a network (10.0.0.0/8, ::1) nor a host name") from None
        return value

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'llamascope.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from the config file (or LLAMASCOPE_CONFIG), the environment and overrides."""
        path = config_file or os.environ.get("LLAMASCOPE_CONFIG")
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
        token = _config_file.set(path)
        try:
            settings = cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)
        if not settings.models:
            settings.models = {
                name: ModelSpec(path=BUILTIN, description="built-in test model: tiny, random weights")
                for name in SEED_MODELS
            }
        return settings


def _shown_url(url: str) -> str:
    """A URL as messages show it: without the user and password it may hold (as the engines' logs and metrics
    show it: observability.metrics.upstream_label; the layers let neither import the other)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _http_url(url: str) -> bool:
    """Whether ``url`` is http(s), with a host and a port that is a number if any (as the engines' client needs)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises for a port that is not a number, or out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


# The settings whose values are secrets: a message about one never shows what was given.
_SECRETS = frozenset(
    {"admin_key", "api_keys", "database_url", "metrics_key", "metrics_keys", "upload_secret", "upstream_api_key"}
)


def _shown_input(value: Any) -> Any:
    """A wrong setting's value as its error shows it: None (not shown) for a whole section, URLs without a
    user and password."""
    if isinstance(value, dict):
        return None
    if isinstance(value, str):
        return _shown_url(value)
    if isinstance(value, list | tuple):
        return [_shown_url(v) if isinstance(v, str) else v for v in value]
    return value


def describe_error(exc: BaseException) -> str:
    """A settings error as a user reads it: each wrong setting by the environment variable (and config-file
    key) that sets it, what is wrong, and the value given; pydantic's own text for anything else."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors(include_url=False):
        where = [str(part) for part in error["loc"]]
        name = f"LLAMASCOPE_{where[0].upper()} ({'.'.join(where)})" if len(where) == 1 else ".".join(where)
        given = ""
        # Not echoed: a key or secret's value (one too short is still a secret), or a whole section (a model's,
        # with its key); a URL (an upstream given as a string, not a list) without its user and password.
        if error["type"] != "missing" and "input" in error and not _SECRETS.intersection(where):
            shown = _shown_input(error["input"])
            given = f" (given: {shown!r})" if shown is not None else ""
        lines.append(f"{name}: {error['msg']}{given}")
    return "\n".join(lines)
