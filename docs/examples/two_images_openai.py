import base64
import os

from openai import OpenAI
from PIL import Image

Image.new("RGB", (640, 480), (200, 30, 30)).save("before.png")  # or pictures of your own
Image.new("RGB", (640, 480), (30, 120, 200)).save("after.png")


def data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()  # or an http(s) URL


client = OpenAI(api_key=os.environ["DASHSCOPE_API_KEY"], base_url="http://127.0.0.1:8000/compatible-mode/v1")
messages = [
    {
        "role": "user",
        "content": [  # two images in one message, in order, then the question about both
            {"type": "image_url", "image_url": {"url": data_uri("before.png")}},
            {"type": "image_url", "image_url": {"url": data_uri("after.png")}},
            {"type": "text", "text": "Compare the first picture with the second."},
        ],
    }
]
r = client.chat.completions.create(model="llama3.2-11b-vision", messages=messages, max_tokens=32)
print(r.choices[0].message.content)

# Compatible mode also takes a conversation with no image at all (a health check, a chat UI's first line).
r = client.chat.completions.create(
    model="llama3.2-11b-vision", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
)
print(r.choices[0].message.content)
