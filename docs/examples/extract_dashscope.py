import os
from typing import Literal

import dashscope
from pydantic import BaseModel, ConfigDict, Field


class Receipt(BaseModel):
    model_config = ConfigDict(extra="forbid")  # these fields and no others
    merchant: str = Field(max_length=40)
    total: float = Field(ge=0, le=100_000, multiple_of=0.01)  # whole cents: bounds the decimals
    currency: Literal["CNY", "USD", "EUR"]


response = dashscope.MultiModalConversation.call(
    api_key=os.getenv("DASHSCOPE_API_KEY"),
    model="llama3.2-90b-vision-instruct",
    messages=[
        {
            "role": "user",
            "content": [{"image": os.path.abspath("photo.jpg")}, {"text": "Read this receipt."}],
        }
    ],
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "receipt", "schema": Receipt.model_json_schema()},
    },
    max_tokens=512,
)
if response.status_code != 200:
    raise SystemExit(f"{response.code}: {response.message}")
receipt = Receipt.model_validate_json(response.output.choices[0].message.content[0]["text"])
print(repr(receipt))

# The same fields as a tool the model must call: its arguments are held to the tool's parameters.
response = dashscope.MultiModalConversation.call(
    api_key=os.getenv("DASHSCOPE_API_KEY"),
    model="llama3.2-90b-vision-instruct",
    messages=[
        {
            "role": "user",
            "content": [{"image": os.path.abspath("photo.jpg")}, {"text": "Record this receipt."}],
        }
    ],
    tools=[
        {
            "type": "function",
            "function": {
                "name": "record_receipt",
                "description": "Store a receipt in the books.",
                "parameters": Receipt.model_json_schema(),
            },
        }
    ],
    tool_choice="required",
    parallel_tool_calls=False,
    max_tokens=512,
)
call = response.output.choices[0].message.tool_calls[0]
print(call["function"]["name"], Receipt.model_validate_json(call["function"]["arguments"]))
