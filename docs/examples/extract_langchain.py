import base64
from typing import Literal

from langchain_community.chat_models.tongyi import ChatTongyi
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, ConfigDict, Field


class Receipt(BaseModel):
    """A shop receipt."""

    model_config = ConfigDict(extra="forbid")  # these fields and no others
    merchant: str = Field(max_length=40)
    total: float = Field(ge=0, le=100_000, multiple_of=0.01)  # whole cents: bounds the decimals
    currency: Literal["CNY", "USD", "EUR"]


with open("photo.jpg", "rb") as f:
    image = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
# with_structured_output binds Receipt as a tool; tool_choice "required" makes every answer that call.
llm = ChatTongyi(model="llama3.2-11b-vision", model_kwargs={"max_tokens": 512, "tool_choice": "required"})
receipt = llm.with_structured_output(Receipt).invoke(
    [HumanMessage(content=[{"image": image}, {"text": "Read this receipt."}])]
)
print(repr(receipt))
