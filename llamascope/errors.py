"""The one error type of llamascope.

Everything below the HTTP surfaces raises ``ServiceError`` with a DashScope
code and an HTTP status; each surface turns it into its own wire shape in one
place (``llamascope.api.errors``). Messages are written for the person who sent
the request: they say what was wrong and, where it helps, what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServiceError(Exception):
    status: int
    code: str
    message: str
    # Extra response headers, e.g. Retry-After for throttling.
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.status} {self.code}: {self.message}")


ALGO_PREFIX = "<400> InternalError.Algo.InvalidParameter: "


def invalid_parameter(message: str) -> ServiceError:
    return ServiceError(400, "InvalidParameter", message)


def invalid_api_key() -> ServiceError:
    return ServiceError(401, "InvalidApiKey", "Invalid API-key provided.")


def model_not_found() -> ServiceError:
    return ServiceError(400, "InvalidParameter", "Model not exist.")


def input_too_long(max_input: int) -> ServiceError:
    return ServiceError(400, "InvalidParameter", f"{ALGO_PREFIX}Range of input length should be [1, {max_input}]")


def image_download_failed(detail: str) -> ServiceError:
    return ServiceError(400, "InvalidParameter", f"{ALGO_PREFIX}Failed to download multimodal content: {detail}")


def image_unreadable(detail: str) -> ServiceError:
    return ServiceError(
        400,
        "InvalidParameter.DataInspection",
        f"The media format is not supported or incorrect for the data inspection. {detail}",
    )


def image_bad_size(detail: str) -> ServiceError:
    return ServiceError(
        400, "InvalidParameter", f"{ALGO_PREFIX}The image length and width do not meet the model restrictions. {detail}"
    )


def internal_error() -> ServiceError:
    return ServiceError(
        500,
        "InternalError.Algo",
        "An internal error has occured during execution, please try again later or contact service support.",
    )


def throttled(retry_after: int, busy: str = "") -> ServiceError:
    """The server is full (the engine's queue; with ``busy``, what else is: its image decoders, its fetches):
    come back later."""
    message = f"Requests throttling triggered: {busy}; try again shortly." if busy else "Requests throttling triggered."
    return ServiceError(429, "Throttling", message, headers={"Retry-After": str(retry_after)})


def request_timed_out() -> ServiceError:
    """A request waited in the engine's queue longer than the server allows."""
    return ServiceError(408, "RequestTimeOut", "Request timed out, please try again later.")


def store_unavailable() -> ServiceError:
    """The accounts store does not answer: a request that cannot be authorised or charged is not served."""
    return ServiceError(
        503,
        "ServiceUnavailable",
        "The accounts store is not reachable, so usage cannot be recorded; please try again later.",
        headers={"Retry-After": "5", "x-should-retry": "true"},
    )
