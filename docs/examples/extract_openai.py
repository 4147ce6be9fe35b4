import base64
import os
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field


class Receipt(BaseModel):
    model_config = ConfigDict(extra="forbid")  # these fields and no others
    merchant: str = Field(max_length=40)
    total: float = Field(ge=0, le=100_000, multiple_of=0.01)  # whole cents: bounds the decimals
    currency: Literal["CNY", "USD", "EUR"]


client = OpenAI(api_key=os.environ["DASHSCOPE_API_KEY"], base_url="http://127.0.0.1:8000/compatible-mode/v1")
with open("photo.jpg", "rb") as f:  # a photo of a receipt
    image = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
completion = client.chat.completions.parse(
    model="llama3.2-11b-vision",
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "Read this receipt."},
            ],
        }
    ],
    response_format=Receipt,  # the answer is held to Receipt's JSON Schema as it is made
    max_tokens=512,
)
receipt = completion.choices[0].message.parsed  # a validated Receipt
print(repr(receipt))
