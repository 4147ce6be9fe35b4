import os

import dashscope
from PIL import Image

Image.new("RGB", (640, 480), (200, 30, 30)).save("red.png")  # or pictures of your own
Image.new("RGB", (800, 600), (30, 120, 200)).save("blue.png")
model = "llama3.2-11b-vision"
messages = [{"role": "user", "content": [{"image": os.path.abspath("red.png")}, {"text": "What colour is this?"}]}]
response = dashscope.MultiModalConversation.call(
    api_key=os.getenv("DASHSCOPE_API_KEY"), model=model, messages=messages, max_tokens=32
)
if response.status_code != 200:
    raise SystemExit(f"{response.code}: {response.message}")
answer = response.output.choices[0].message.content[0]["text"]
print(answer)

# A later turn adds a second image: the conversation holds both, each in the message that brought it (the
# new question looks at the new image; to compare two, send them together in one message).
messages += [
    {"role": "assistant", "content": [{"text": answer}]},
    {"role": "user", "content": [{"image": os.path.abspath("blue.png")}, {"text": "And this one: what colour is it?"}]},
]
response = dashscope.MultiModalConversation.call(
    api_key=os.getenv("DASHSCOPE_API_KEY"), model=model, messages=messages, max_tokens=32
)
if response.status_code != 200:
    raise SystemExit(f"{response.code}: {response.message}")
print(response.output.choices[0].message.content[0]["text"])
print(response.usage["image_tokens"], "image tokens: both images")
