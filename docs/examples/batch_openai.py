import base64
import json
import os
import time

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/compatible-mode/v1", api_key=os.environ["DASHSCOPE_API_KEY"])
with open("red.png", "rb") as f:
    image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
with open("requests.jsonl", "w") as f:  # the input file: one request a line
    for i, question in enumerate(["Caption this photo.", "What colour is it?"]):
        body = {
            "model": "llama3.2-11b-vision",
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}],
                }
            ],
        }
        f.write(
            json.dumps({"custom_id": f"photo-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            + "\n"
        )

with open("requests.jsonl", "rb") as f:
    file = client.files.create(file=f, purpose="batch")
batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(1)
    batch = client.batches.retrieve(batch.id)  # status, request_counts, usage
print(batch.status, batch.request_counts)
print(client.files.content(batch.output_file_id).text)  # one line a request, in input order
