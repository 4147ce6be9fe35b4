import os
from http import HTTPStatus

import dashscope
from PIL import Image

Image.new("RGB", (640, 480), (200, 30, 30)).save("red.png")  # or use a picture of your own
messages = [
    {
        "role": "user",
        "content": [{"image": os.path.abspath("red.png")}, {"text": "这是什么,请用中文回答?"}],
    }
]
response = dashscope.MultiModalConversation.call(
    api_key=os.getenv("DASHSCOPE_API_KEY"), model="llama3.2-90b-vision-instruct", messages=messages, max_tokens=64
)
if response.status_code == HTTPStatus.OK:
    print(response.output.choices[0].message.content[0]["text"])
else:
    print(response.request_id, response.status_code, response.code, response.message)
