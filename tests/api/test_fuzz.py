"""Schemathesis over the served /openapi.json, against a real server: no 5xx, every answer as documented.

Bounded for CI (a fixed number of examples per operation, a fixed seed, no example database) and kept
cheap: the served model has a short context (so every answer is short), and valid images are a small
data: URI, so that the fuzzer's valid requests reach the model instead of an image fetch.
``LLAMASCOPE_FUZZ_EXAMPLES`` raises the number of examples for a longer run.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import schemathesis.engine
from schemathesis.engine import Status, events

from llamascope.api.native.protocol import EXAMPLE_IMAGE
from llamascope.settings import BUILTIN
from tests.conftest import ADMIN_KEY, API_KEY, SEED_MODEL, Server, start_server

pytestmark = pytest.mark.server
EXAMPLES = int(os.environ.get("LLAMASCOPE_FUZZ_EXAMPLES", "8"))
CONTEXT_LENGTH = 46  # the documents' examples (41 tokens of prompt) then generate 5 at most
SACRIFICE = "sacrifice"  # a key the admin operations may revoke or re-grant in place of the fuzzer's own


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # A short context keeps every answer short: max_tokens is documented (and fuzzed) up to it.
    config = tmp / "llamascope.toml"
    config.write_text(f'[models."{SEED_MODEL}"]\npath = "{BUILTIN}"\ncontext_length = {CONTEXT_LENGTH}\n')
    env = {"LLAMASCOPE_IMAGE_FETCH_TIMEOUT": "2", "LLAMASCOPE_IMAGE_FETCH_CONNECT_TIMEOUT": "1"}
    srv = start_server(tmp, args=["--config", str(config)], env=env)
    answer = httpx.post(
        srv.base + "/admin/keys", json={"name": SACRIFICE}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    srv.extra["sacrifice"] = str(answer.json()["data"]["id"])
    own = next(k for k in _keys(srv) if API_KEY.startswith(k["prefix"]))
    srv.extra["own"], srv.extra["prefix"] = str(own["id"]), own["prefix"]
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()[-5000:]


def _keys(server: Server) -> list[dict[str, Any]]:
    answer = httpx.get(server.base + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return answer.json()["data"]


def bounded(document: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """The served document, narrowed where valid requests would otherwise stop short of the model: served
    model names and an image that decodes (others still come as the fuzzer's invalid cases)."""
    document = copy.deepcopy(document)
    # /v1/... is /compatible-mode/v1/... under a second prefix (one handler): fuzzed once, by that name.
    for path in [p for p in document["paths"] if p.startswith("/v1/")]:
        del document["paths"][path]
    schemas = document["components"]["schemas"]
    for name in ("GenerationBody", "OpenAIChatBody", "OpenAIChatInput"):
        schemas[name]["properties"]["model"] = {"enum": models}
        for example in schemas[name]["examples"]:
            example["model"] = models[0]
    schemas["ImageContent"]["properties"]["image"] = {"enum": [EXAMPLE_IMAGE]}
    schemas["OpenAIImageURL"]["properties"]["url"] = {"enum": [EXAMPLE_IMAGE]}
    return document


def run(server: Server, document: dict[str, Any]) -> list[str]:
    """Every operation through Schemathesis's phases (its examples, coverage of each keyword's edges, and
    random cases, valid and not); the failures, each with the curl command that repeats it."""
    config = schemathesis.Config.from_dict(
        {
            "seed": 20261130,
            "base-url": server.base,
            "request-timeout": 60,
            "workers": 1,
            "max-stream-events": 8,  # then hang up: streams are cut short too
            "output": {"sanitization": {"enabled": False}},
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            # Valid by the schema is not enough to be served: the conversation rules (an image in the first user
            # turn, at most max_images; a user turn last) are more than JSON Schema says, so 400s are expected.
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "auth": {"openapi": {"apiKey": {"bearer": API_KEY}, "adminKey": {"bearer": ADMIN_KEY}}},
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)

    @schema.hook("map_path_parameters")
    def spare_own_key(context: schemathesis.HookContext, parameters: dict[str, Any]) -> dict[str, Any]:
        ref = str((parameters or {}).get("ref", ""))
        if ref and (ref.strip() == server.extra["own"] or server.extra["prefix"].startswith(ref[:16])):
            return {**parameters, "ref": server.extra["sacrifice"]}  # the fuzzer's own key stays as it is
        return parameters

    failures = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: {event.info.format()}")
        if isinstance(event, events.FatalError):
            failures.append(f"fatal: {event.exception!r}")
        if isinstance(event, events.ScenarioFinished) and event.status == Status.FAILURE:
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(
                            f"{event.label} [{check.name}] {failure.title}: {failure.message}\n"
                            f"    {check.failure_info.code_sample}"
                        )
    return failures


def test_every_operation_survives_the_fuzzer(fuzz_server: Server) -> None:
    document = httpx.get(fuzz_server.base + "/openapi.json").json()
    models = [m["model"] for m in httpx.get(fuzz_server.api + "/models", headers=_auth(API_KEY)).json()["data"]]
    failures = run(fuzz_server, bounded(document, models))
    assert not failures, "\n".join(dict.fromkeys(failures))


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
