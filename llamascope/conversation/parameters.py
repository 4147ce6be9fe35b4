"""The ``parameters`` object: the seed's defaults and ranges, checked by hand.

Hand-written rather than a pydantic model because the messages must be
DashScope's (``Range of top_p should be (0.0, 1.0]``) and must name the
parameter; JSON ``true`` is not accepted where a number is meant (pydantic's
lax mode would take it as 1). Unknown parameters are ignored, as the hosted
service ignores them: the SDKs forward every keyword they do not consume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llamascope import errors
from llamascope.engines.base import SamplingParams

MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 512
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat completions
MAX_STOPS, MAX_STOP_CHARS = 32, 1000  # OpenAI takes 4 stop strings
# One setting, several names: the first one the caller sent is the one used, and named in its errors.
MAX_TOKENS_NAMES = ("max_tokens", "max_new_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class Options:
    sampling: SamplingParams  # with the stop strings
    incremental_output: bool = False


def _bad(message: str) -> errors.ServiceError:
    return errors.invalid_parameter(message)


def _integer(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # NaN and infinities are not integers
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"Parameter {name} should be an integer; got {value!r:.40}.")
    return value


def _number(params: dict[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"Parameter {name} should be a number; got {value!r:.40}.")
    # NaN and infinities are not JSON, but Python's parser takes them; an integer beyond a float's range too.
    number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
    if not math.isfinite(number):
        raise _bad(f"Parameter {name} should be a finite number; got {value!r:.40}.")
    return number


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("Parameter stop should be a string or a list of strings (stop token ids are not supported).")
    if any(s == "" for s in items):
        raise _bad("Parameter stop should not contain an empty string.")
    # Each is looked for in every piece of the answer, on the event loop: tens of thousands stalled the server.
    if len(items) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in items):
        raise _bad(f"Parameter stop should hold at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters.")
    return tuple(dict.fromkeys(items))


def _penalty(params: dict[str, Any], name: str) -> float:
    """presence_penalty or frequency_penalty: OpenAI's range, DashScope's for presence_penalty."""
    value = _number(params, name)
    if value is not None and not -2 <= value <= 2:
        raise _bad(f"Range of {name} should be [-2.0, 2.0]")
    return value or 0.0


def parse_parameters(params: Any, context_length: int) -> Options:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("parameters must be an object.")

    n = params.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad("Parameter n: only one choice per request is supported.")

    max_name = next((name for name in MAX_TOKENS_NAMES if params.get(name) is not None), "max_tokens")
    max_new = _integer(params, max_name)
    if max_new is None:
        max_new = min(DEFAULT_MAX_TOKENS, context_length)  # a short context's model still takes the default
    if not 1 <= max_new <= context_length:
        raise _bad(f"Range of {max_name} should be [1, {context_length}]")

    min_new = _integer(params, "min_new_tokens") or 0
    if min_new < 0:
        raise _bad(f"Range of min_new_tokens should be [0, {max_name}]")

    top_p = _number(params, "top_p")
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise _bad("Range of top_p should be (0.0, 1.0]")

    temperature = _number(params, "temperature")
    temperature = 0.8 if temperature is None else temperature
    if temperature < 0:
        raise _bad("Range of temperature should be [0.0, +inf); 0 means greedy decoding")

    top_k = _integer(params, "top_k")
    if top_k is not None and top_k < 0:
        raise _bad("Range of top_k should be [0, +inf); None, 0 or a value above 100 turns top-k off")
    if top_k is not None and (top_k == 0 or top_k > 100):
        top_k = None

    seed = _integer(params, "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise _bad(f"Range of seed should be [0, {MAX_SEED}]")

    penalty = _number(params, "repetition_penalty")
    penalty = 1.0 if penalty is None else penalty
    if penalty <= 0:
        raise _bad("Range of repetition_penalty should be (0.0, +inf)")

    presence, frequency = (_penalty(params, name) for name in ("presence_penalty", "frequency_penalty"))

    incremental = params.get("incremental_output", False)
    if incremental is None:
        incremental = False
    if not isinstance(incremental, bool):
        raise _bad("Parameter incremental_output should be true or false.")

    logprobs = params.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise _bad("Parameter logprobs should be true or false.")
    top_logprobs = _integer(params, "top_logprobs")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise _bad(f"Range of top_logprobs should be [0, {MAX_TOP_LOGPROBS}]")
    if top_logprobs and not logprobs:
        raise _bad("Parameter top_logprobs needs logprobs set to true.")

    return Options(
        sampling=SamplingParams(
            max_new_tokens=max_new,
            min_new_tokens=min(min_new, max_new),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            repetition_penalty=penalty,
            presence_penalty=presence,
            frequency_penalty=frequency,
            logprobs=(top_logprobs or 0) if logprobs else None,
            stop=_stop(params.get("stop")),
        ),
        incremental_output=incremental,
    )
