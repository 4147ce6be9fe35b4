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

from pydantic import BaseModel, Field, field_validator, model_validator
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
        None, description=f"a local Hugging Face model directory, or {BUILTIN!r} or {BUILTIN_TEXT!r}"
    )
    # OpenAI-compatible engines (SGLang, TGI, vLLM, Ollama, llama.cpp server), e.g. "http://gpu1:30000/v1".
    upstreams: list[str] = Field(default_factory=list)
    upstream_model: str | None = Field(None, description="the model name the upstreams know (default: this name)")
    upstream_api_key: str | None = None
    # A local directory with the upstream model's tokenizer: prompts are counted here, not asked of the engine.
    upstream_tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Weights quantized through bitsandbytes as they load (pip install 'llamascope[quantized]'):
    # "nf4" (4-bit NF4: the 11B in about 7 GB) or "int8" (LLM.int8: the 90B in about 90 GB).
    quantization: Literal["none", "nf4", "int8"] = "none"
    context_length: int = Field(8192, ge=16)
    # auto, cpu, cuda or cuda:N; None: the server-wide device setting.
    device: str | None = Field(None, pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    chat_template: str | None = Field(None, description="a Jinja file to render prompts with instead of llamascope's")
    description: str = ""
    # What `llamascope keys create/grant` give a key for this model unless told otherwise.
    allowance_tokens: int | None = Field(1_000_000, ge=1, description="None: unlimited")
    allowance_days: float | None = Field(180, gt=0, description="None: never expires")

    @property
    def is_builtin(self) -> bool:
        return self.path in (BUILTIN, BUILTIN_TEXT)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (not self.upstreams):
            raise ValueError("a model needs either path (local weights) or upstreams (engine URLs), not both")
        for url in self.upstreams:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} must be an http(s) URL ending in /v1")
        if self.path is not None and "://" in self.path:
            raise ValueError(
                f"{self.path!r} is a URL, not a local model directory: to serve through an OpenAI-compatible "
                f"engine, write openai+{self.path} on the command line (upstreams = [...] in the config file)"
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

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: dict[str, ModelSpec] = Field(default_factory=dict)

    # The accounts store: SQLite in data_dir by default; a postgresql+psycopg:// URL for shared replicas.
    database_url: str | None = None
    # Crash-safe accounting (accounts/checkpoints.py): what a running request has made is on disk within
    # about checkpoint_seconds or checkpoint_tokens; a stream whose checkpoint is more than checkpoint_tokens
    # behind waits for it, at most checkpoint_wait_seconds, then ends with 503. A replica that has not renewed
    # its lease for lease_seconds is taken for dead, and its running requests are charged by another.
    checkpoint_seconds: float = Field(1.0, gt=0)
    checkpoint_tokens: int = Field(64, ge=1)
    checkpoint_wait_seconds: float = Field(5.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    # Keys to put in the store at start-up, each new one granted every model ("*") without limit; each must
    # be "sk-" and 128 random bits or more, such as DashScope's 32 hex digits (serve refuses weaker ones). A
    # key these settings no longer name is revoked at the next start. With none given and an empty store, the
    # first start makes one key and prints it once.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Bearer key of the admin HTTP API (/admin/...). None: the admin API is off.
    admin_key: str | None = None
    data_dir: Path = Field(default_factory=_default_data_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    # Where in-process models run: auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda (every
    # visible GPU: a model larger than one is split across them by layers) or cuda:N. Per model too.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    # With device cuda on several GPUs: the most each may hold of a model's weights, e.g. "70GiB".
    gpu_memory_cap: str | None = Field(None, pattern=r"^\d+(\.\d+)?\s*(GiB|GB|MiB|MB)$")
    # PyTorch threads for the in-process engine; None means one per usable core.
    torch_threads: int | None = Field(None, ge=1)
    # The in-process engine's scheduler: how many requests decode together, the tokens (prompt plus the
    # most each may still make) they may hold together, how many may wait for a place (beyond: 429
    # Throttling), and how long one may wait (beyond: 408 RequestTimeOut). Batch size, batch tokens and the
    # vision cache left unset: 16, 131,072 and 1 GiB on the CPU; on a GPU, what its free memory holds
    # after loading (engines/devices.plan_memory), printed at start.
    max_batch_size: int | None = Field(None, ge=1)
    max_batch_tokens: int | None = Field(None, ge=1)
    # Requests wait while what they hold fits in max_queued_bytes (None: a quarter of the memory available
    # at start, within 256 MiB and 32 GiB); max_queued, if set, caps their number too.
    max_queued: int | None = Field(None, ge=0)
    max_queued_bytes: int | None = Field(None, ge=0)
    max_queue_wait_seconds: float = Field(60.0, gt=0)
    # A long prompt is prefilled this many tokens at a time, running streams going on in between.
    prefill_chunk_tokens: int = Field(512, ge=16)
    # Each image's cross-attention keys and values (the vision tower's output, projected) kept by image
    # content hash, so later turns with the same image skip the tower and the projections.
    vision_cache_bytes: int | None = Field(None, ge=0)
    # Images of requests admitted together go through the vision tower in one call of at most this many
    # tiles (Llama 3.2 pads every image to 4); 4 or less: one image a call. None: 16 on a GPU, 1 on the CPU,
    # where the tower is bound by its arithmetic and several images at once only delay the first
    # (bench/engine.py --only image-dominated).
    vision_batch_tiles: int | None = Field(None, ge=1)
    # Past requests' self-attention keys and values, reused by requests that start with the same tokens about
    # the same image (the next turn of a conversation). None: a tenth of the memory free at start-up (the GPU's
    # on a GPU), at most 8 GiB; 0 turns reuse off.
    prefix_cache_bytes: int | None = Field(None, ge=0)

    # Requests: the body cap sits above the image cap so an oversized data: URI
    # reaches the image check and gets its own message.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    image_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    image_max_pixels: int = Field(100_000_000, ge=1)  # as the image header declares them
    image_max_decode_pixels: int = Field(20_000_000, ge=1)  # as decoded (JPEG/JPEG2000 decode reduced)
    image_min_side: int = Field(10, ge=1)
    image_fetch_connect_timeout: float = Field(5.0, gt=0)
    image_fetch_timeout: float = Field(15.0, gt=0)
    image_fetch_max_redirects: int = Field(3, ge=0)
    # Networks or host names that image URLs may reach although they are not
    # public (loopback, private ranges...). Empty: only public addresses.
    image_fetch_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Directories whose files requests may name as file:// URLs or paths. Empty: none.
    image_local_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    image_decode_workers: int = Field(2, ge=1)
    image_decode_timeout: float = Field(5.0, gt=0)
    image_cache_bytes: int = Field(256 * 1024 * 1024, ge=0)

    # The SDK's local-file upload flow. upload_dir defaults to data_dir/uploads.
    upload_dir: Path | None = None
    upload_ttl_hours: float = Field(48.0, gt=0)
    upload_policy_seconds: int = Field(300, ge=10)
    upload_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    # The address clients reach this server at, for upload_host in upload policies
    # (e.g. https://llm.example.com behind a proxy). Default: from the request's Host.
    public_base_url: str | None = None

    # Per-key rate limits shared by every replica, in Redis (redis://host:6379/0); None: kept in this process.
    redis_url: str | None = None
    # When Redis cannot be reached: "open" serves requests without the shared limits, "closed" refuses
    # them with 503 ServiceUnavailable.
    rate_limits_on_redis_error: Literal["open", "closed"] = "open"
    # The HMAC secret of upload policies (at least 32 characters), the same on every replica; None: a
    # random one kept in DATA_DIR/upload-secret.
    upload_secret: str | None = Field(None, min_length=32)
    # Tests only: requests may ask the in-process engine to fail at a given step (engines/mllama.py, FAULT).
    fault_injection: bool = False

    shutdown_grace_seconds: float = Field(30.0, ge=0)
    log_level: str = "info"
    # Operating it (docs/observability.md): log lines as text or one JSON object a line; Prometheus
    # metrics at /metrics (no key needed unless metrics_key is set), or on a port of their own; per-key
    # series only for the key names listed; OpenTelemetry traces to an OTLP/HTTP endpoint when one is set.
    log_format: Literal["text", "json"] = "text"
    metrics: bool = True
    metrics_key: str | None = None
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    otlp_traces_endpoint: str | None = None

    @field_validator("api_keys", "image_fetch_allow", "image_local_dirs", "metrics_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # LLAMASCOPE_API_KEYS=sk-a,sk-b as well as the JSON list pydantic expects.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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


def describe_error(exc: BaseException) -> str:
    """A settings error as a user reads it: each wrong setting by the environment variable (and config-file
    key) that sets it, what is wrong, and the value given; pydantic's own text for anything else."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors(include_url=False):
        where = [str(part) for part in error["loc"]]
        name = f"LLAMASCOPE_{where[0].upper()} ({'.'.join(where)})" if len(where) == 1 else ".".join(where)
        given = f" (given: {error['input']!r})" if error["type"] != "missing" and "input" in error else ""
        lines.append(f"{name}: {error['msg']}{given}")
    return "\n".join(lines)
