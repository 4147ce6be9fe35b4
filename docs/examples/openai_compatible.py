import base64
import os

from openai import OpenAI

client = OpenAI(api_key=os.environ["DASHSCOPE_API_KEY"], base_url="http://127.0.0.1:8000/compatible-mode/v1")
with open("red.png", "rb") as f:
    image = "data:image/png;base64," + base64.b64encode(f.read()).decode()  # or an http(s) URL
messages = [
    {"role": "developer", "content": "Answer in one sentence."},  # or "system"
    {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}],
    },
]
r = client.chat.completions.create(
    model="llama3.2-11b-vision", messages=messages, max_tokens=64, extra_body={"top_k": 20}
)
print(r.choices[0].message.content)

stream = client.chat.completions.create(
    model="llama3.2-11b-vision",
    messages=messages,
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},  # a last chunk with the usage
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="")
    elif chunk.usage:
        print("\n", chunk.usage.total_tokens, "tokens")
print([model.id for model in client.models.list()])
