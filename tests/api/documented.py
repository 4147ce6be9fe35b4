"""Real answers held against the served OpenAPI document, with jsonschema_rs (the validator Schemathesis uses).

A JSON answer is checked against the schema documented for its path, method, status and media type. A
stream is checked event by event as any SSE parser reads it (``event``, ``id``, ``data``): each event must
be one of the documented events, its ``data`` (JSON) valid against that event's ``contentSchema``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs
from httpx_sse import ServerSentEvent


class Document:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.raw
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def response_schema(self, path: str, method: str, status: int, media: str) -> dict[str, Any]:
        responses = self.raw["paths"][path][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {path}: status {status} is not documented"
        content = self.resolve(responses[str(status)]).get("content", {})
        assert media in content, f"{method} {path} {status}: {media} is not documented ({list(content)})"
        return content[media]["schema"]

    def errors(self, schema: dict[str, Any], instance: Any) -> list[str]:
        validator = jsonschema_rs.validator_for({**schema, "components": self.raw["components"]})
        return [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(instance)]

    def check(self, path: str, method: str, response: httpx.Response) -> Any:
        """The JSON answer, after checking it against the document."""
        media = response.headers.get("content-type", "").split(";")[0].strip()
        body = response.json()
        problems = self.errors(self.response_schema(path, method, response.status_code, media), body)
        assert not problems, f"{method} {path} {response.status_code}: {problems}\n{body}"
        assert response.headers.get("x-request-id")
        return body

    def check_events(self, path: str, method: str, events: list[ServerSentEvent]) -> list[tuple[str, Any]]:
        """Every event of a stream against the documented events; their (event, decoded data)."""
        schema = self.response_schema(path, method, 200, "text/event-stream")
        variants = [self.resolve(v) for v in schema.get("anyOf", [schema])]
        read = []
        assert events, f"{method} {path}: an empty stream"
        for event in events:
            instance: dict[str, Any] = {"event": event.event, "data": event.data}
            if event.id:
                instance["id"] = event.id
            fits = [v for v in variants if not self.errors(v, instance)]
            problems = []
            for variant in fits:
                data_schema = variant["properties"]["data"]
                if "contentSchema" not in data_schema:
                    break
                try:
                    data = json.loads(event.data)
                except ValueError:
                    problems.append(f"data is not JSON: {event.data[:80]!r}")
                    continue
                found = self.errors(data_schema["contentSchema"], data)
                if not found:
                    break
                problems += found
            else:
                raise AssertionError(f"{method} {path}: event {instance} is none of the documented: {problems}")
            read.append((event.event, json.loads(event.data) if event.data.startswith("{") else event.data))
        return read
