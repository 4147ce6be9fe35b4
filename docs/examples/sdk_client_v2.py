import os

import dashscope

client = dashscope.Client(base_url="http://127.0.0.1:8000/api/v1", api_key=os.environ["DASHSCOPE_API_KEY"])
completion = client.multimodal.chat.create(
    model="llama3.2-11b-vision",
    messages=[
        {
            "role": "user",
            "content": [{"type": "image", "url": os.path.abspath("red.png")}, {"type": "text", "text": "What is it?"}],
        }
    ],
    max_tokens=64,
)
print(completion.output_text)
