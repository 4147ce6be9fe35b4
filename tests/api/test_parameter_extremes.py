"""Every valid parameter value generates, at the ends of the documented ranges too, on both surfaces."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Server, generation_body

PATH = "/api/v1/services/aigc/multimodal-generation/generation"

# Each once made the sampler divide into NaN or remove every token: a 500 from a valid request.
EXTREMES = [
    {"temperature": 1e-40, "top_k": 5},
    {"temperature": 5e-324},
    {"temperature": 1e300, "top_k": 100},
    {"temperature": 1.7976931348623157e308, "top_p": 1.0},
    {"top_p": 5e-324},
    {"top_p": 1e-300, "temperature": 1e-300},
    {"repetition_penalty": 1e-300, "temperature": 0.5, "top_k": 5},
    {"repetition_penalty": 1e300},
    {"repetition_penalty": 5e-324, "temperature": 0},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("params", EXTREMES, ids=[json.dumps(p) for p in EXTREMES])
def test_extreme_valid_parameters_generate(server: Server, image_host, params: dict, stream: bool) -> None:
    body = generation_body(image_host.url("/red.png"), max_tokens=3, min_new_tokens=3, seed=1, **params)
    headers = {"Authorization": f"Bearer {server.key}"} | ({"X-DashScope-SSE": "enable"} if stream else {})
    r = httpx.post(server.base + PATH, json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")] if stream else []
    last = events[-1] if stream else r.json()
    assert last["output"]["choices"][0]["finish_reason"] == "length" and last["usage"]["output_tokens"] == 3


@pytest.mark.parametrize("name", ["max_completion_tokens", "max_tokens"])
def test_openai_surface_names_the_parameter_sent(server: Server, image_host, name: str) -> None:
    import openai

    client = openai.OpenAI(api_key=server.key, base_url=server.base + "/v1", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": image_host.url("/red.png")}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="llama3.2-11b-vision", messages=[{"role": "user", "content": [image]}], **{name: 0}
        )
    assert f"Range of {name} should be [1, 8192]" in str(refused.value)
