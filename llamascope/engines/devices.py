"""Where a model runs, how it is placed there, and how many requests fit beside it.

``resolve_device`` turns the ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device that
exists, or a ``DeviceError`` that says why not; ``placement`` gives transformers' ``from_pretrained`` its
``device_map`` and ``max_memory`` (one GPU, or layers split across every visible GPU through accelerate);
``plan_memory`` works out, from a model's config and the memory left after loading, the scheduler's batch
bounds and the vision cache's size.

The plan counts what the scheduler really holds per request (see ``engines/scheduler.py`` and ``engines/batch.py``):
- self-attention keys and values: ``2 x self-attention layers x kv heads x head dim`` per token, for the
  prompt and every token it may still make (``MAX_BATCH_TOKENS`` bounds their sum);
- the image's cross-attention keys and values: ``2 x cross-attention layers x kv heads x head dim`` per
  vision state, 6,404 states an image (4 tiles of 1,601): 210 MB a request for the 11B in bf16;
- a request about several images: their keys and values once more, one after another, while it is prefilled
  (``scheduler.cross_states``), and while it decodes a copy of the real tiles of those its tokens attend to;
- the vision cache: the projected vision states an image, ``hidden size x 6,404`` (52 MB for the 11B);
- the activations of one prefill chunk and the logits of one decode step, which live only for that step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class DeviceError(Exception):
    """A device setting this machine cannot honour; the message says why and what to do."""


def cuda_devices() -> int:
    """How many CUDA GPUs this PyTorch sees (0 on a CPU build or a machine without one)."""
    import torch  # gateways import this module: PyTorch only when a device is used

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def out_of_memory(exc: BaseException) -> bool:
    """A device allocation that failed (CUDA's, or another backend's RuntimeError saying so)."""
    import torch  # as in cuda_devices

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def resolve_device(requested: str, visible: int | None = None) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda``/``cuda:N`` only where they exist."""
    count = cuda_devices() if visible is None else visible
    if requested == "auto":
        return "cuda" if count else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not count:
            import torch  # as in cuda_devices

            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(
                f"device {requested!r}: no CUDA GPU is visible (PyTorch {torch.__version__}, {build}). "
                "Install a CUDA build of PyTorch (docs/models.md, 'On GPUs') or serve with --device cpu"
            )
        if requested.startswith("cuda:"):
            index = requested.removeprefix("cuda:")
            if not index.isdigit():
                raise DeviceError(f"device {requested!r}: expected cuda:N with N a GPU number, e.g. cuda:0")
            if int(index) >= count:
                raise DeviceError(f"device {requested!r}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")
        return requested
    raise DeviceError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")


def compute_dtype(dtype: str, device: str) -> str:
    """The dtype to load in: ``auto`` keeps the checkpoint's on the CPU and means bfloat16 on a GPU."""
    if dtype == "auto" and device != "cpu":
        return "bfloat16"
    return dtype


def placement(device: str, visible: int, gpu_memory_cap: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` arguments that put the model on ``device``.

    ``cuda:N`` and ``cuda`` with one GPU: the whole model on that GPU. ``cuda`` with several GPUs: layers
    split across all of them (accelerate's ``device_map="auto"``, whole decoder layers per GPU, each GPU at
    most ``gpu_memory_cap``, e.g. ``"70GiB"``). That is pipeline-style layer splitting: one GPU works at a
    time. ``cpu``: nothing (transformers' default, as before).
    """
    if device == "cpu":
        return {}
    if device.startswith("cuda:"):
        return {"device_map": {"": int(device.removeprefix("cuda:"))}}
    if visible <= 1:
        return {"device_map": {"": 0}}
    extra: dict[str, Any] = {"device_map": "auto"}
    if gpu_memory_cap:
        extra["max_memory"] = {i: gpu_memory_cap for i in range(visible)}
    return extra


@dataclass(frozen=True)
class MemoryPlan:
    """The scheduler's bounds as the memory left after loading allows them."""

    free_bytes: int
    kv_bytes_per_token: int
    image_bytes_per_request: int
    vision_cache_bytes: int
    prefix_cache_bytes: int
    step_bytes: int
    max_batch_size: int
    max_batch_tokens: int

    def describe(self) -> str:
        gib = 1 << 30
        return (
            f"{self.free_bytes / gib:.1f} GiB free after loading: MAX_BATCH_SIZE {self.max_batch_size}, "
            f"MAX_BATCH_TOKENS {self.max_batch_tokens:,} ({self.kv_bytes_per_token / 1024:.0f} KiB of keys and "
            f"values a token), VISION_CACHE_BYTES {self.vision_cache_bytes / gib:.2f} GiB, "
            f"PREFIX_CACHE_BYTES {self.prefix_cache_bytes / gib:.2f} GiB, "
            f"{self.image_bytes_per_request / (1 << 20):.0f} MiB of image states a request, "
            f"{self.step_bytes / (1 << 20):.0f} MiB kept for a step's activations"
        )


def _text(config: Any) -> Any:
    return getattr(config, "text_config", config)


def _kv_layout(config: Any) -> tuple[int, int, int]:
    """(self-attention layers, cross-attention layers, kv heads x head dim) of a model's text part."""
    text = _text(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    cross = len(getattr(text, "cross_attention_layers", None) or [])
    return text.num_hidden_layers - cross, cross, kv_heads * head_dim


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    layers, _, width = _kv_layout(config)
    return 2 * layers * width * dtype_bytes


def image_states(config: Any) -> int:
    """Vision states an image becomes (6,404 for Llama 3.2 Vision); 0 for a text-only model."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    return vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)


def image_kv_bytes(config: Any, dtype_bytes: int) -> int:
    """One image's cross-attention keys and values, every cross-attention layer's (210 MB for the 11B in bf16):
    what a request about it holds, and a vision-cache entry; 0 for a text-only model."""
    _, cross, width = _kv_layout(config)
    return 2 * cross * width * image_states(config) * dtype_bytes


def plan_memory(
    config: Any,
    free_bytes: int,
    *,
    dtype_bytes: int = 2,
    context_length: int = 8192,
    prefill_chunk: int = 512,
    headroom: float = 0.10,
    vision_cache_share: float = 0.10,
    prefix_cache_share: float = 0.10,
    max_batch_cap: int = 256,
    vision_batch_tiles: int = 16,
    max_images: int = 1,
) -> MemoryPlan:
    """Batch bounds that fit in ``free_bytes`` (what the GPU has left once the weights are loaded).

    ``headroom`` of it stays unused (the allocator's fragmentation, CUDA's own workspaces); the activations
    of one prefill chunk and one decode step's logits are set aside; the vision cache takes
    ``vision_cache_share`` of the rest (at least ``max_images``, a conversation's most), the prefix pool
    ``prefix_cache_share``; a prefill about ``max_images`` images holds their keys and values joined; what
    remains holds the running requests: each
    its keys and values for prompt plus answer, and, with an image, that image's cross-attention states.
    ``MAX_BATCH_TOKENS`` is that remainder in tokens; ``MAX_BATCH_SIZE`` is how many requests of a quarter
    of the context each, with an image, fit in it (at least 1, at most ``max_batch_cap``).
    """
    text = _text(config)
    per_token = kv_bytes_per_token(config, dtype_bytes)
    states = image_states(config)
    per_image_request = image_kv_bytes(config, dtype_bytes)  # also what a vision-cache entry takes
    # A prefill chunk's widest activations (the MLP's gate and up projections, attention's q/k/v), held a few
    # times over by autograd-free eager code; a decode step's float32 logits for a full batch; the vision
    # tower's for one call of ``vision_batch_tiles`` tiles, the same way.
    step = prefill_chunk * (4 * text.hidden_size + 3 * text.intermediate_size) * dtype_bytes * 2
    step += max_batch_cap * text.vocab_size * 4
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        tiles = max(vision_batch_tiles, vision.max_num_tiles)
        step += tiles * per_tile * (4 * vision.hidden_size + vision.intermediate_size) * dtype_bytes * 2
        if max_images > 1:  # the prefill's images joined (a copy), and the decode copy of those its tokens see
            step += 2 * max_images * per_image_request
    usable = int(free_bytes * (1 - headroom)) - step
    if usable <= 0:
        raise DeviceError(
            f"only {free_bytes / (1 << 30):.1f} GiB left after loading: not enough for one request's activations "
            "(quantize the weights, split them across GPUs, or use a larger GPU)"
        )
    cache = max(max(max_images, 1) * per_image_request, int(usable * vision_cache_share)) if states else 0
    prefix = int(usable * prefix_cache_share)  # finished requests' keys and values, for prefix reuse
    for_requests = usable - cache - prefix
    from llamascope.engines.kv_cache import SLACK  # kv_cache imports transformers: gateways import this module

    # Each running request also holds its image's keys and values and room for SLACK more tokens (kv_cache).
    per_request = per_image_request + SLACK * per_token
    typical = (context_length // 4) * per_token + per_request
    max_batch = max(1, min(max_batch_cap, for_requests // max(typical, 1)))
    # Images' keys and values of a full batch come out of the same memory as the self-attention ones.
    tokens = max(0, for_requests - max_batch * per_request) // per_token
    if tokens < context_length:
        max_batch = max(1, min(max_batch, (for_requests - context_length * per_token) // max(per_request, 1)))
        tokens = max(0, for_requests - max_batch * per_request) // per_token
    return MemoryPlan(
        free_bytes=free_bytes,
        kv_bytes_per_token=per_token,
        image_bytes_per_request=per_image_request,
        vision_cache_bytes=cache,
        prefix_cache_bytes=prefix,
        step_bytes=step,
        max_batch_size=int(max_batch),
        max_batch_tokens=int(tokens),
    )


def free_memory(model: Any) -> int:
    """Bytes free on the GPUs the model's weights are on, once loaded; 0 for a model on the CPU."""
    import torch  # as in cuda_devices

    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    # Split across GPUs, each holds its own layers' keys and values: their free memory adds up.
    return sum(torch.cuda.mem_get_info(d)[0] for d in devices)


@dataclass(frozen=True)
class Bounds:
    """The scheduler's memory-bound settings; None: derive it (CPU_BOUNDS on the CPU, ``plan_memory`` on a GPU)."""

    max_batch_size: int | None = None
    max_batch_tokens: int | None = None
    vision_cache_bytes: int | None = None
    prefix_cache_bytes: int | None = None  # None on the CPU too: prefix_cache.default_bytes


CPU_BOUNDS = Bounds(max_batch_size=16, max_batch_tokens=131072, vision_cache_bytes=1 << 30)


def settle(
    model: Any,
    wanted: Bounds,
    *,
    context_length: int,
    prefill_chunk: int,
    report: Any = None,
    vision_batch_tiles: int = 16,
    max_images: int = 1,
) -> tuple[int, int, int, int | None]:
    """(max batch size, max batch tokens, vision cache bytes, prefix pool bytes or None for its own default):
    what the operator set, the rest derived."""
    if wanted.max_batch_size and wanted.max_batch_tokens and wanted.vision_cache_bytes is not None:
        return wanted.max_batch_size, wanted.max_batch_tokens, wanted.vision_cache_bytes, wanted.prefix_cache_bytes
    free = free_memory(model)
    if not free:  # on the CPU: fixed defaults, as the operating system pages and nothing fails on a spike
        derived = CPU_BOUNDS
    else:
        plan = plan_memory(
            model.config,
            free,
            dtype_bytes=model.dtype.itemsize,
            context_length=context_length,
            prefill_chunk=prefill_chunk,
            vision_batch_tiles=vision_batch_tiles,
            max_images=max_images,
        )
        if report is not None:
            report(plan.describe())
        derived = Bounds(plan.max_batch_size, plan.max_batch_tokens, plan.vision_cache_bytes, plan.prefix_cache_bytes)
    return (
        wanted.max_batch_size or int(derived.max_batch_size or 1),
        wanted.max_batch_tokens or int(derived.max_batch_tokens or 1),
        wanted.vision_cache_bytes if wanted.vision_cache_bytes is not None else int(derived.vision_cache_bytes or 0),
        wanted.prefix_cache_bytes if wanted.prefix_cache_bytes is not None else derived.prefix_cache_bytes,
    )


# Tensor factories: each makes a tensor on the default device (the CPU) unless told ``device=``.
_FACTORIES = frozenset(
    {
        "tensor",
        "as_tensor",
        "arange",
        "zeros",
        "ones",
        "full",
        "empty",
        "rand",
        "randn",
        "randint",
        "linspace",
        "eye",
    }
)


def discipline() -> Any:
    """A debug mode for the model thread: every tensor llamascope's engine code makes names its device.

    On a GPU, a tensor made without ``device=`` lands on the CPU, and the first operation that meets the
    model's tensors fails (or copies each step). On a CPU-only machine that mix-up cannot show, so this
    mode (a ``TorchFunctionMode``) records each factory call from ``llamascope/engines`` that gives no
    device: a test runs batched, sampled generation under it and expects none. Draws from a request's own
    CPU generator (``generator=``) are allowed: they are moved with the values they make.
    """
    import torch  # as in cuda_devices
    from torch.overrides import TorchFunctionMode

    engines = str(__file__).rsplit("/", 1)[0] + "/"

    class Discipline(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.violations: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if (
                name in _FACTORIES
                and getattr(torch, name, None) is func
                and kwargs.get("device") is None
                and kwargs.get("generator") is None
            ):
                frame: Any = sys._getframe(1)
                while frame is not None and "/torch/" in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(engines):
                    where = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
                    self.violations.append(f"torch.{name} without device= at {where}")
            return func(*args, **kwargs)

    return Discipline()
