"""A client of the Files and Batch APIs (OpenAI's, as the hosted compatible mode and llamascope serve them).

httpx, not the ``openai`` SDK: the SDK is not among llamascope's dependencies, and these are six plain calls.
Every failure is ``native.APIError``, as for the chat client, so that the command shows it and never a
traceback. Nothing here imports the server's packages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamascope.client.native import APIError, HttpApi, TranslatedErrors, error_of

# The compatible mode's root, beside the native API's ``/api/v1``.
COMPATIBLE_PATH = "/compatible-mode/v1"
CHAT_ENDPOINT = "/v1/chat/completions"
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


def compatible_base(base_url: str) -> str:
    """The compatible mode's base URL from the one the other commands take (the native ``.../api/v1``); a URL
    that already names the compatible mode (``.../compatible-mode/v1``, or an OpenAI-style ``.../v1``) as it is."""
    base = base_url.rstrip("/")
    if base.endswith("/api/v1"):
        return base.removesuffix("/api/v1") + COMPATIBLE_PATH
    if base.endswith("/v1"):
        return base
    return base + COMPATIBLE_PATH


@dataclass(frozen=True)
class Batch:
    """What the command reads of a batch object (``raw``: the whole object, as the API sent it)."""

    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def status(self) -> str:
        return str(self.raw.get("status", ""))

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def count(self, name: str) -> int:
        """``total``, ``completed`` or ``failed`` of ``request_counts``."""
        return int((self.raw.get("request_counts") or {}).get(name) or 0)

    def tokens(self, name: str = "total_tokens") -> int:
        return int((self.raw.get("usage") or {}).get(name) or 0)

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Why the input failed its checks, line by line."""
        return list((self.raw.get("errors") or {}).get("data") or [])


class BatchClient(HttpApi):
    """The Files and Batch APIs at ``base_url`` (the compatible mode's, see ``compatible_base``), one key."""

    AGENT = "llamascope-batch"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with TranslatedErrors(self.base_url):
            response = self.http.request(method, path, **kwargs)
        if response.status_code != 200:
            raise error_of(response, response.text)
        try:
            return response.json()
        except ValueError:
            raise error_of(response, response.text) from None

    def upload(self, path: Path, name: str | None = None) -> dict[str, Any]:
        """``POST /files`` with ``purpose=batch``: the file streams from disk."""
        with path.open("rb") as source:
            files = {"file": (name or path.name, source, "application/jsonl")}
            result: dict[str, Any] = self._call("POST", "files", data={"purpose": "batch"}, files=files)
        return result

    def create(
        self,
        input_file_id: str,
        endpoint: str = CHAT_ENDPOINT,
        window: str = "24h",
        metadata: dict[str, str] | None = None,
    ) -> Batch:
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": window}
        if metadata:
            body["metadata"] = metadata
        return Batch(self._call("POST", "batches", json=body))

    def retrieve(self, batch_id: str) -> Batch:
        return Batch(self._call("GET", f"batches/{batch_id}"))

    def list(self, limit: int = 20, after: str | None = None) -> list[Batch]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return [Batch(b) for b in self._call("GET", "batches", params=params).get("data", [])]

    def cancel(self, batch_id: str) -> Batch:
        return Batch(self._call("POST", f"batches/{batch_id}/cancel"))

    def content(self, file_id: str) -> Iterator[bytes]:
        """``GET /files/{id}/content``, streamed."""
        with TranslatedErrors(self.base_url), self.http.stream("GET", f"files/{file_id}/content") as response:
            if response.status_code != 200:
                raise error_of(response, response.read().decode(errors="replace"))
            yield from response.iter_bytes()

    def lines(self, file_id: str | None) -> Iterator[str]:
        """A result file's lines (none for a file the batch did not make)."""
        if file_id is None:
            return
        pending = b""
        for chunk in self.content(file_id):
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                if line.strip():
                    yield line.decode()
        if pending.strip():
            yield pending.decode()


__all__ = ["APIError", "Batch", "BatchClient", "compatible_base"]
